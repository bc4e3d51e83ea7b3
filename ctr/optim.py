"""Learning-rate schedules shared by the project's Lightning modules."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup: int, total: float, start: int = 0) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: 0 before ``start``, then a linear warm-up over ``warmup`` steps, then
    cosine decay to 0 at step ``total``; constant 1 after the warm-up when ``total`` is unknown
    (not finite) or leaves no room for the decay."""
    def f(step: int) -> float:
        if step < start:
            return 0.0
        s, span = step - start, total - start
        if warmup and s < warmup:
            return (s + 1) / warmup
        if not math.isfinite(total) or span <= warmup:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (span - warmup))))
    return f
