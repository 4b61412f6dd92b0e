"""What the unmasking tier can check of a cell's decoded sum without seeing any one update.

Under secure aggregation no tier sees an individual update, so a device that follows the protocol but
encodes something harmful (values beyond the clip, a random vector of the ring, an example count beyond
``n_max``) cannot be singled out. What can be checked is the cell's *sum*, against what its ``k`` clients'
honestly encoded updates could add up to (:func:`sum_violation`):

- the example count: ``k <= N <= k * n_max`` (each count slot holds ``min(n_u, n_max)``);
- every coordinate of tensor ``x`` (clip ``c``): an honest update encodes ``w_u * clip(x_u)`` with
  ``w_u = n_u / n_max``, rounded by less than one step, so ``|sum_u n_u clip(x_u)| <= c * N + k * step * n_max``;
- with updates norm-bounded to ``B`` (``strategy.norm_bound``, or ``privacy.clip_norm`` under secagg_dp), the
  L2 norm: ``||sum_u n_u x_u|| <= B * N`` plus the rounding, ``k * n_max * sqrt(sum_x size_x * step_x^2)``.

A cell that breaks a bound is refused (dropped with the reason, the round goes on: :meth:`SecureRound.unmask`
with ``bound_check``). What this cannot see: anything inside the bounds -- a sign-flipped, rescaled or
otherwise crafted update whose values and norm stay within what an honest one could have, or a count
inflated up to ``n_max`` (docs/robust.md).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

from fedlora.secure.encoding import DecodedSum

# Relative slack for float rounding in the decoded totals (their values are exact multiples of one step).
_FLOAT_SLACK = 1e-9


def sum_violation(decoded: DecodedSum, *, norm_bound: float = 0.0, unbounded: Collection[str] = ()) -> str | None:
    """Why ``decoded`` (one cell's sum of ``decoded.clients`` updates) cannot be a sum of honestly encoded
    updates, or None. ``norm_bound > 0``: also the L2 bound over every tensor not in ``unbounded`` (e.g. the
    training-loss coordinate, which is not part of the update)."""
    enc, k, n = decoded.config, decoded.clients, decoded.examples
    if not k <= n <= k * enc.max_examples:
        return f"example count {n} is impossible for {k} clients with 1..n_max={enc.max_examples} examples each"
    rounding_sq = 0.0
    for name, value in sorted(decoded.total.items()):
        step = enc.step(name)
        limit = (enc.clip_for(name) * n + k * step * enc.max_examples) * (1 + _FLOAT_SLACK)
        top = float(np.max(np.abs(value))) if np.size(value) else 0.0
        if top > limit:
            return (f"sum of {name!r} reaches {top:.6g}, more than {k} clients' clipped updates could add up to "
                    f"({limit:.6g} = clip {enc.clip_for(name):g} x {n} examples + rounding)")
        if name not in unbounded:
            rounding_sq += np.size(value) * step * step
    if norm_bound > 0:
        norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for name, v in decoded.total.items()
                             if name not in unbounded))
        limit = (norm_bound * n + k * enc.max_examples * math.sqrt(rounding_sq)) * (1 + _FLOAT_SLACK)
        if norm > limit:
            return (f"sum has L2 norm {norm:.6g}, more than {k} clients' updates bounded to norm {norm_bound:g} "
                    f"could add up to ({limit:.6g} = {norm_bound:g} x {n} examples + rounding)")
    return None
