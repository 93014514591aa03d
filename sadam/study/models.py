"""The study's models: a small QAT CNN and a plain ReLU MLP."""
from torch import nn

from .quant import QuantConv2d, QuantLinear, QuantReLU

EDGE_BITS = 8  # first and last layer weights stay at 8 bits, the usual QAT practice


def qat_cnn(bits: int, image_size: int, num_classes: int) -> nn.Module:
    """conv-conv-pool-fc-fc with weights of the inner conv and fc, and every activation, at
    ``bits``; large inputs (MNIST) are downsampled by a stride-2 first conv."""
    stride = 2 if image_size >= 16 else 1
    side = (image_size // stride) // 2
    return nn.Sequential(
        QuantConv2d(1, 16, 3, padding=1, stride=stride, bits=EDGE_BITS), QuantReLU(bits),
        QuantConv2d(16, 32, 3, padding=1, bits=bits), QuantReLU(bits),
        nn.MaxPool2d(2), nn.Flatten(),
        QuantLinear(32 * side * side, 64, bits=bits), QuantReLU(bits),
        QuantLinear(64, num_classes, bits=EDGE_BITS),
    )


def relu_mlp(in_features: int, num_classes: int, width: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )
