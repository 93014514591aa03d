"""Straight-through fake quantization (uniform grid, fixed per-tensor scale) and QAT layers.

The forward pass rounds to the grid ``scale * {qmin, ..., qmax}``; the backward pass is the
straight-through estimator: the gradient passes unchanged where ``qmin <= x / scale <= qmax`` and
is zero where the value was clipped. Scales are buffers fixed before training (not learned), so
every optimizer sees the same grid and weight flips are comparable across optimizers.
"""
import torch
from torch import nn
from torch.nn import functional as F


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        scaled = x / scale
        ctx.save_for_backward((scaled >= qmin) & (scaled <= qmax))
        return torch.clamp(torch.round(scaled), qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None


def fake_quantize(x, scale, qmin: int, qmax: int):
    """``clamp(round(x / scale), qmin, qmax) * scale`` with the straight-through gradient."""
    return _FakeQuantize.apply(x, scale, qmin, qmax)


def signed_range(bits: int):
    """Integer grid of a signed ``bits``-bit weight: [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def integer_weights(weight, scale, bits: int):
    """The integer grid index each weight rounds to (what a weight flip changes)."""
    qmin, qmax = signed_range(bits)
    return torch.clamp(torch.round(weight.detach() / scale), qmin, qmax)


class _QuantWeight:
    """Mixin: a layer whose weight is fake-quantized to ``bits`` with a scale fixed at init."""

    def _init_quant(self, bits: int):
        self.bits = bits
        _, qmax = signed_range(bits)
        # LSQ's initial step size; kept fixed so the grid is the same for every optimizer.
        scale = 2 * self.weight.detach().abs().mean() / qmax ** 0.5
        self.register_buffer("w_scale", scale.clamp_min(1e-8))

    def quantized_weight(self):
        return fake_quantize(self.weight, self.w_scale, *signed_range(self.bits))

    def integer_weight(self):
        return integer_weights(self.weight, self.w_scale, self.bits)


class QuantConv2d(nn.Conv2d, _QuantWeight):
    def __init__(self, *args, bits: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(bits)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(nn.Linear, _QuantWeight):
    def __init__(self, *args, bits: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(bits)

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantReLU(nn.Module):
    """ReLU whose output is fake-quantized to the unsigned grid ``scale * {0, ..., 2^b - 1}``.

    The scale is calibrated once (:func:`calibrate_activations`) from the 99.9th percentile of the
    activations on a training batch.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("a_scale", torch.ones(()))
        self.calibrating = False

    def forward(self, x):
        if self.calibrating:
            top = torch.quantile(F.relu(x).detach().flatten().float(), 0.999)
            self.a_scale.fill_(float(top.clamp_min(1e-3)) / (2 ** self.bits - 1))
        return fake_quantize(x, self.a_scale, 0, 2 ** self.bits - 1)


@torch.no_grad()
def calibrate_activations(model: nn.Module, x):
    """Set every QuantReLU's scale from one forward pass over ``x``."""
    layers = [m for m in model.modules() if isinstance(m, QuantReLU)]
    for m in layers:
        m.calibrating = True
    try:
        model(x)
    finally:
        for m in layers:
            m.calibrating = False


def quantized_layers(model: nn.Module, bits: int):
    """The layers whose weights are quantized to exactly ``bits`` (the ones oscillation counts)."""
    return [m for m in model.modules() if isinstance(m, _QuantWeight) and m.bits == bits]
