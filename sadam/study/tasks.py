"""The study's tasks: non-smooth training problems on offline data.

Each task fixes the data, the model, the loss, the batch size and the training length, so that every
optimizer faces exactly the same problem and only its learning rate and the seed vary.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .models import qat_cnn, relu_mlp


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    dataset: str
    model: str  # "cnn" (QAT) or "mlp"
    batch_size: int
    steps: int
    quick_steps: int
    bits: int = 0  # QAT bit width of weights and activations; 0 = full precision
    label_noise: float = 0.0
    loss: str = "ce"  # "ce" (cross-entropy) or "hinge" (multi-class hinge)

    def build_model(self, data) -> nn.Module:
        image = data.train.x.shape[-1]
        if self.model == "cnn":
            return qat_cnn(self.bits, image, data.num_classes)
        return relu_mlp(image * image, data.num_classes)

    def loss_fn(self):
        return nn.CrossEntropyLoss() if self.loss == "ce" else nn.MultiMarginLoss()


TASKS = {t.name: t for t in (
    Task("qat2_digits", "2-bit QAT (weights and activations), small CNN, digits",
         "digits", "cnn", batch_size=32, steps=400, quick_steps=300, bits=2),
    Task("qat4_digits", "4-bit QAT (weights and activations), small CNN, digits",
         "digits", "cnn", batch_size=32, steps=400, quick_steps=300, bits=4),
    Task("noisy_mlp", "ReLU MLP, batch 8, 20% label noise, MNIST-5k",
         "mnist5k", "mlp", batch_size=8, steps=800, quick_steps=400, label_noise=0.2),
    Task("hinge_mlp", "ReLU MLP, multi-class hinge loss, batch 16, digits",
         "digits", "mlp", batch_size=16, steps=600, quick_steps=300, loss="hinge"),
    Task("qat3_mnist", "3-bit QAT (weights and activations), small CNN, MNIST-5k",
         "mnist5k", "cnn", batch_size=32, steps=600, quick_steps=300, bits=3),
)}

QUICK_TASKS = ("qat2_digits",)
# the default full study; qat3_mnist runs with --tasks (it alone costs about as much as two others)
FULL_TASKS = ("qat2_digits", "qat4_digits", "noisy_mlp", "hinge_mlp")


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


def batches(n: int, batch_size: int, seed: int):
    """Endless minibatch indices: a fresh permutation of the training set every epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]
