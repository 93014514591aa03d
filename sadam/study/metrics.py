"""Per-step measurements: QAT weight flips and oscillations, rho / gamma of S-Adam."""
import torch


class OscillationMeter:
    """Counts, per step, the quantized weights whose integer value changed (flips) and those whose
    change reverses the direction of their previous change (oscillations, Nagel et al. 2022,
    "Overcoming oscillations in quantization-aware training").

    Feed it the integer grid indices after every step; the first call only records the start.
    """

    def __init__(self):
        self._last = None
        self._direction = None  # sign of each weight's last integer change, 0 before any change

    def update(self, integers: torch.Tensor):
        """Returns (flip fraction, oscillation fraction) of this step; (0, 0) on the first call."""
        integers = integers.detach().flatten()
        if self._last is None:
            self._last = integers.clone()
            self._direction = torch.zeros_like(integers)
            return 0.0, 0.0
        change = torch.sign(integers - self._last)
        flipped = change != 0
        oscillated = flipped & (change == -self._direction)
        self._direction = torch.where(flipped, change, self._direction)
        self._last = integers.clone()
        n = integers.numel()
        return float(flipped.sum()) / n, float(oscillated.sum()) / n


def probe_values(optimizer):
    """(rho, gamma) of an S-Adam optimizer's last step as lists of floats (one per scope of its
    first param group), or (None, None) for any other optimizer."""
    if not hasattr(optimizer, "lgi"):
        return None, None
    rho = optimizer.lgi()[0].reshape(-1).tolist()
    gamma = optimizer.damping_factors()[0].reshape(-1).tolist()
    return rho, gamma
