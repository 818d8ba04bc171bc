"""A simulated accelerometer on a rotating machine.

A shaft at ``shaft_hz`` with harmonics and broadband noise; after ``fault_at`` seconds, a
bearing fault: impacts at the outer-race frequency (3.58x shaft speed) ringing at a
structural resonance (3 kHz) - the signature the demo model was trained to flag.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VibrationSimulator", "RATE", "FRAME"]

RATE = 12_800
FRAME = 2_048


class VibrationSimulator:
    def __init__(self, seed: int = 0, shaft_hz: float = 25.0, noise: float = 0.3) -> None:
        self.rng = np.random.default_rng(seed)
        self.shaft_hz = shaft_hz
        self.noise = noise
        self.t0 = 0.0

    def frame(self, fault: float = 0.0) -> np.ndarray:
        """The next ``FRAME`` samples; ``fault`` is the impact severity (0: healthy)."""
        rng = self.rng
        t = self.t0 + np.arange(FRAME) / RATE
        self.t0 += FRAME / RATE
        shaft = self.shaft_hz * rng.uniform(0.99, 1.01)
        x = sum(a * np.sin(2 * np.pi * k * shaft * t + ph)
                for k, a, ph in ((1, 1.0, 0.3), (2, 0.4, 1.1), (3, 0.2, 2.0)))
        x = x + rng.normal(0, self.noise, FRAME)
        if fault > 0:
            period = 1.0 / (3.58 * shaft)
            local = t - t[0]
            for start in np.arange(rng.uniform(0, period), local[-1], period):
                k = (local >= start) & (local < start + 0.004)
                tau = local[k] - start
                x[k] += fault * np.exp(-tau * 1500) * np.sin(2 * np.pi * 3000 * tau)
        return x.astype(np.float32)
