"""Learning-rate schedules: the multiplier on a base learning rate at a step of a run of steps.

One function for both uses: the optimiser steps of a client's local round (``train.lr_schedule``,
``train.warmup_steps``; :func:`fedlora.train.train_local`) and the rounds of a federation
(``federation.lr_schedule``, ``federation.lr_warmup_rounds``: the cloud sends each round's client
learning rate in the round settings, :meth:`fedlora.run_settings.RunSettings.round_settings`).
"""

from __future__ import annotations

import math


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier on the base learning rate at step ``step`` (0-based) of ``total``: linear warm-up
    from ``1 / warmup`` over the first ``warmup`` steps, then constant, linear or cosine decay (never
    reaching 0 within ``total`` steps for cosine)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
