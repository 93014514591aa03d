"""How the native backend hands the hyperparameters to the CUDA kernels: never through a
host-to-device copy (a copy from pageable memory waits for the device, and cannot be captured
in a CUDA graph). Numbers stay on the CPU as launch arguments; device values stay on the device."""
import pytest
import torch

from sadam.backends import native
from sadam.backends.step import GroupStep

CUDA = torch.device("cuda")


def step_with(**hyper):
    values = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=1e-2, damping=0.5)
    values.update(hyper)
    return GroupStep(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], max_exp_avg_sqs=[],
                     steps=[], stats=torch.zeros(1, 21), scope_rows=[], tensor_ids=[],
                     offsets=[], eps=1e-8, amsgrad=False, maximize=False, probes=8,
                     probe_beta=0.9, window=0, seed=0, **values)


def test_numbers_for_cuda_kernels_stay_on_the_host():
    # no CUDA call is made: this runs on machines without a GPU
    hyper = native._hyper(step_with(), CUDA)
    assert hyper.device.type == "cpu" and hyper.dtype == torch.float64
    assert hyper.tolist() == [1e-3, 0.9, 0.999, 1e-2, 0.5]  # float64: no fp32 rounding


def test_cpu_tensor_hyperparameters_are_numbers_too():
    hyper = native._hyper(step_with(lr=torch.tensor(3e-4, dtype=torch.float64),
                                    damping=torch.tensor(2.0)), CUDA)
    assert hyper.device.type == "cpu"
    assert hyper.tolist() == [3e-4, 0.9, 0.999, 1e-2, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-resident lr needs a GPU")
def test_device_tensor_lr_is_gathered_on_the_device_without_sync():
    lr = torch.tensor(3e-4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        hyper = native._hyper(step_with(lr=lr), CUDA)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hyper.device.type == "cuda"
    expected = [float(torch.tensor(3e-4, dtype=torch.float32)), 0.9, 0.999, 1e-2, 0.5]
    assert hyper.cpu().tolist() == expected
