"""Loss and gradient-norm anomalies: NaN/Inf, and spikes against a running median.

A loss spike is a loss above both `factor` x the median of the last `window` accepted losses and
the median plus `sigmas` x their spread (1.4826 x the median absolute deviation, a standard
deviation that the outliers it judges do not inflate). The ratio alone suits pre-training, where
the loss is large and steady; a fine-tuning loss is small and noisy from batch to batch (0.77
after a median of 0.46 is an ordinary SFT batch, and the ratio alone stopped such a run after four
"spikes" in 100 steps), and the spread term keeps such batches from counting. A grad-norm spike is
the ratio alone. No spike is called before `window` values are in, so the steep first steps of
training never trigger it. Values of steps that were rewound are not added: the statistic only
ever sees accepted steps.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional


class SpikeDetector:
    """Judges each step's loss and grad norm; `accept()` adds a judged-good step to the history."""

    def __init__(self, window: int = 20, loss_factor: float = 1.5, grad_factor: float = 20.0, sigmas: float = 6.0):
        self.window, self.loss_factor, self.grad_factor, self.sigmas = window, loss_factor, grad_factor, sigmas
        self.losses: deque = deque(maxlen=window)
        self.grad_norms: deque = deque(maxlen=window)

    @staticmethod
    def _median(values) -> float:
        ordered = sorted(values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    def judge(self, loss: float, grad_norm: float) -> Optional[str]:
        """None for a normal step, else why it is anomalous."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"grad norm is {grad_norm}"
        if len(self.losses) >= self.window:
            median = self._median(self.losses)
            if loss > self.loss_factor * median:  # the spread is only needed for a loss that passes the ratio
                spread = 1.4826 * self._median([abs(x - median) for x in self.losses])
                if loss > median + self.sigmas * spread:
                    return (f"loss {loss:.4f} > {self.loss_factor} x median {median:.4f} of the last {self.window} "
                            f"steps" + (f" and > median + {self.sigmas:g} x their spread {spread:.4f}"
                                        if self.sigmas else ""))
            g_median = self._median(self.grad_norms)
            if grad_norm > self.grad_factor * g_median:
                return (f"grad norm {grad_norm:.4g} > {self.grad_factor} x median {g_median:.4g} "
                        f"of the last {self.window} steps")
        return None

    def accept(self, loss: float, grad_norm: float) -> None:
        """Add a step that passed to the statistics."""
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)

    def state_dict(self) -> dict:
        """History, for checkpoints (a resumed run judges exactly as an uninterrupted one)."""
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.grad_norms = deque(state.get("grad_norms", []), maxlen=self.window)
