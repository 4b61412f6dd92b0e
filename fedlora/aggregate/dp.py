"""Client-level differential privacy for federated LoRA: clipping, Gaussian noise, RDP accounting.

Pure numpy + ``math`` (no torch, Flower, scipy). The mechanism is DP-FedAvg (McMahan et al.
2018, "Learning differentially private recurrent language models") on top of secure
aggregation:

1. every device clips its whole update to global L2 norm ``C`` (:func:`clip_update`);
2. the sum of the clipped updates of the sampled clients gets Gaussian noise of standard
   deviation ``z * C`` (``z`` = noise multiplier) -- either **central** noise, added once per
   round to the unmasked SUM at the unmasking tier (:func:`add_central_noise`), or
   **distributed** noise, each client adding its share before masking
   (:func:`distributed_noise`);
3. an RDP accountant for the Poisson-subsampled Gaussian mechanism turns ``z``, the sampling
   rate ``q`` and the number of rounds into ``(epsilon, delta)`` (:class:`RDPAccountant`,
   :func:`federated_epsilons`).

Neighbouring datasets differ in one CLIENT (add/remove one client's whole data), so the
sensitivity of the sum is ``C``. That holds only if each client's contribution to the sum is
its clipped update times a weight <= 1: fedlora.secure's ``n_u / n_max`` weighting is fine
(weights <= 1), an average weighted by unbounded example counts is not.

Noise randomness -- why a cryptographically seeded generator
-------------------------------------------------------------
The DP guarantee assumes the adversary cannot predict the noise. A generator seeded with a
fixed, small or guessable seed (``np.random.seed(0)``, the round number, a 32-bit
``RandomState`` seed that can be brute-forced in minutes) lets anyone who sees the noisy
sum regenerate the exact noise and subtract it: the "private" release is then the exact
sum and epsilon is infinite, whatever the accountant says. :func:`noise_generator` therefore
seeds numpy's PCG64 with 256 bits from ``os.urandom``. Limits, stated honestly: PCG64 itself
is not a CSPRNG (its state could in principle be recovered from enough raw outputs, which an
observer never sees here -- only their sum with the data), and floating-point Gaussian
sampling has the least-significant-bit leakage of Mironov 2012 ("On significance of the
least significant bits for differential privacy"); neither is addressed here. Central noise
also trusts the unmasking tier to really add it: it sees the plain sum first.

Distributed noise and dropouts
------------------------------
With distributed noise each of ``n`` clients adds ``N(0, (z C)^2 / n)`` so that the sum
carries ``N(0, (z C)^2)`` -- but only if all ``n`` upload. With ``d`` dropouts the survivors'
noise has variance ``(z C)^2 (n - d) / n``: the effective noise multiplier falls to
``z sqrt((n - d) / n)`` and the accountant's epsilon is no longer valid. Pass
``min_survivors`` (e.g. the secure-aggregation threshold ``t``) to calibrate each share to
``(z C)^2 / t`` instead: any surviving set of at least ``t`` clients then carries at least
the target noise (more noise than needed when everyone survives);
:func:`effective_noise_multiplier` gives the real multiplier of a round afterwards.

With secure aggregation (fedlora.secure)
----------------------------------------
Clip on the device BEFORE encoding. Central noise is added at the unmasking tier after
``decode_sum`` (float domain): no interaction with the fixed-point encoding. Distributed noise
is added by each client before encoding, so the encoding's clip range must cover it: a share
has per-coordinate std ``z C / sqrt(t)`` -- e.g. 0.45 for z = 1, C = 1, t = 5, far above the
default encoding clip of 0.05 (it would be clipped, i.e. the noise destroyed) -- and the clip
and bits must be chosen for update + noise. Scale check for LoRA: an update of 460,800
entries of ~1e-3 has a global norm ~0.7, so with C = 0.7 and z = 1 the noise on each
coordinate of the SUM (std 0.7) dwarfs the summed signal (~n * 1e-3) unless n is in the
thousands: client-level DP pays off with many clients per round (as in McMahan et al. 2018).

Accounting
----------
The RDP of the sampled Gaussian mechanism follows Mironov, Talwar, Zhang 2019 ("Renyi
differential privacy of the sampled Gaussian mechanism", arXiv:1908.10530): the exact
binomial series for integer orders and the two-sided erfc series for fractional orders, the
computation used by TF-Privacy / Google dp_accounting and Opacus (``compute_rdp``). RDP ->
(epsilon, delta) uses the improved conversion of Balle et al. 2020 ("Hypothesis testing
interpretations and Renyi differential privacy", Prop. 12 / Canonne, Kamath, Steinke 2020),
as Opacus' and dp_accounting's ``get_privacy_spent``/``compute_epsilon`` do; the classic
conversion of Mironov 2017 (``eps = rdp + log(1/delta) / (alpha - 1)``) is available with
``conversion="classic"`` (what the old TF-Privacy tutorials reported).

Federated runs sample a fixed number of clients per round; the accountant treats that as
Poisson sampling with ``q = clients_per_round / total_clients``, the usual approximation
(McMahan et al. 2018; TF-Federated, Opacus do the same).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

AdapterUpdate = dict[str, np.ndarray]

# The orders Opacus' RDPAccountant (and the TF-Privacy tutorials) use.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
CONVERSIONS = ("improved", "classic")


# ------------------------------------------------------------------------------ clipping


def global_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors of ``update`` together (float64 accumulation)."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in update.values()))


def clip_update(update: Mapping[str, np.ndarray], max_norm: float) -> tuple[AdapterUpdate, float]:
    """Scale ``update`` so its global L2 norm is at most ``max_norm``; return (clipped, pre-clip norm).

    Every tensor is scaled by the same factor ``min(1, max_norm / norm)`` (the direction is
    kept); dtypes are kept; the input is not modified.
    """
    _check_positive("max_norm", max_norm)
    if not update:
        raise ValueError("clip_update: the update has no tensors")
    for name, value in update.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"clip_update: tensor {name!r} holds NaN or inf")
    norm = global_norm(update)
    factor = 1.0 if norm <= max_norm else max_norm / norm
    clipped = {name: (np.asarray(v) * factor).astype(np.asarray(v).dtype, copy=False) for name, v in update.items()}
    return clipped, norm


# ------------------------------------------------------------------------------- noise


def noise_generator(seed: bytes | None = None) -> np.random.Generator:
    """A numpy Generator seeded with 256 secret bits (``os.urandom``), or from ``seed`` (tests only).

    See the module docstring for why the seed must be secret and unguessable.
    """
    if seed is None:
        seed = os.urandom(32)
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise ValueError("noise_generator: seed must be at least 16 random bytes (128 bits)")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(seed, "big"))))


def _gaussian_like(template: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> AdapterUpdate:
    return {name: rng.normal(0.0, std, size=np.shape(v)) for name, v in template.items()}


def add_central_noise(summed: Mapping[str, np.ndarray], noise_multiplier: float, clip_norm: float, *,
                      rng: np.random.Generator | None = None) -> AdapterUpdate:
    """``summed`` + N(0, (noise_multiplier * clip_norm)^2) per coordinate (float64 noise, input dtype kept).

    Call ONCE per round on the SUM of the clipped updates (at the unmasking tier, after the
    masks are removed and before averaging), never per client. ``rng`` defaults to a fresh
    :func:`noise_generator`.
    """
    _check_nonnegative("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    rng = rng if rng is not None else noise_generator()
    noise = _gaussian_like(summed, noise_multiplier * clip_norm, rng)
    return {name: (np.asarray(v, dtype=np.float64) + noise[name]).astype(np.asarray(v).dtype, copy=False)
            for name, v in summed.items()}


def distributed_noise_std(noise_multiplier: float, clip_norm: float, num_clients: int,
                          min_survivors: int | None = None) -> float:
    """Per-client noise std so that any ``>= min_survivors`` of ``num_clients`` carry ``z * C`` in their sum.

    ``min_survivors`` defaults to ``num_clients`` (exact only when nobody drops -- see the
    module docstring).
    """
    _check_nonnegative("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    m = num_clients if min_survivors is None else min_survivors
    if not isinstance(m, int) or not 1 <= m <= num_clients:
        raise ValueError(f"min_survivors must be an integer in [1, num_clients={num_clients}], got {min_survivors!r}")
    return noise_multiplier * clip_norm / math.sqrt(m)


def distributed_noise(update: Mapping[str, np.ndarray], noise_multiplier: float, clip_norm: float, num_clients: int, *,
                      min_survivors: int | None = None, rng: np.random.Generator | None = None) -> AdapterUpdate:
    """A client's clipped ``update`` plus its share of the round's noise (before encoding and masking)."""
    std = distributed_noise_std(noise_multiplier, clip_norm, num_clients, min_survivors)
    rng = rng if rng is not None else noise_generator()
    noise = _gaussian_like(update, std, rng)
    return {name: (np.asarray(v, dtype=np.float64) + noise[name]).astype(np.asarray(v).dtype, copy=False)
            for name, v in update.items()}


def effective_noise_multiplier(per_client_std: float, survivors: int, clip_norm: float) -> float:
    """The noise multiplier a sum of ``survivors`` distributed-noise shares really has."""
    _check_nonnegative("per_client_std", per_client_std)
    _check_positive("clip_norm", clip_norm)
    if not isinstance(survivors, int) or survivors < 0:
        raise ValueError(f"survivors must be a non-negative integer, got {survivors!r}")
    return per_client_std * math.sqrt(survivors) / clip_norm


# -------------------------------------------------------------------------- accounting


def _log_add(logx: float, logy: float) -> float:
    """log(exp(logx) + exp(logy))."""
    a, b = min(logx, logy), max(logx, logy)
    if a == -math.inf:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    """log(exp(logx) - exp(logy)), logx >= logy."""
    if logx < logy:
        raise ValueError("_log_sub: the result would be negative")
    if logy == -math.inf:
        return logx
    if logx == logy:
        return -math.inf
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _log_erfc(x: float) -> float:
    """log(erfc(x)), with the asymptotic series where erfc underflows."""
    r = math.erfc(x)
    if r > 0.0:
        return math.log(r)
    # Laurent series of log(erfc(x)) at +infinity (erfc(x) ~ exp(-x^2) / (x sqrt(pi)) ...).
    return (-math.log(math.pi) / 2 - math.log(x) - x**2 - 0.5 * x**-2 + 0.625 * x**-4
            - 37.0 / 24.0 * x**-6 + 353.0 / 64.0 * x**-8)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log(A_alpha) for integer alpha: sum_i C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2))."""
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = math.log(math.comb(alpha, i)) + i * math.log(q) + (alpha - i) * math.log1p(-q)
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log(A_alpha) for fractional alpha (Mironov, Talwar, Zhang 2019, Sec. 3.3): two erfc-weighted series."""
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    coef, i = 1.0, 0  # generalised binomial C(alpha, i), built by its recurrence
    while True:
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30:
            break
        coef *= (alpha - i) / (i + 1)
        i += 1
        if coef == 0.0:  # alpha was an integer after all: the series ended
            break
    return _log_add(log_a0, log_a1)


def _rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if math.isinf(alpha):
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        return _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_frac(q, sigma, float(alpha)) / (alpha - 1)


def compute_rdp(sample_rate: float, noise_multiplier: float, steps: int,
                orders: Sequence[float] | float = DEFAULT_ORDERS) -> np.ndarray:
    """RDP (one value per order) of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    _check_rate(sample_rate)
    _check_nonnegative("noise_multiplier", noise_multiplier)
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    orders = _check_orders(orders)
    return np.array([_rdp_one_step(sample_rate, noise_multiplier, a) * steps if steps else 0.0 for a in orders])


def rdp_to_epsilon(orders: Sequence[float] | float, rdp: Sequence[float] | float, delta: float, *,
                   conversion: str = "improved") -> tuple[float, float]:
    """(epsilon, best order) from RDP values at ``orders`` for a target ``delta``.

    ``improved`` (default): eps = rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)
    (Balle et al. 2020, as Opacus / dp_accounting); ``classic``: eps = rdp + log(1/delta) / (alpha - 1)
    (Mironov 2017, Prop. 3). Returns (inf, nan) when no order gives a finite epsilon.
    """
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    orders_v = _check_orders(orders)
    rdp_v = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if rdp_v.shape != orders_v.shape:
        raise ValueError(f"rdp has {rdp_v.size} values for {orders_v.size} orders")
    if np.any(rdp_v < 0):
        raise ValueError("rdp values must be non-negative")
    with np.errstate(divide="ignore", invalid="ignore"):
        if conversion == "classic":
            eps = rdp_v + math.log(1 / delta) / (orders_v - 1)
        else:
            eps = rdp_v - (math.log(delta) + np.log(orders_v)) / (orders_v - 1) + np.log((orders_v - 1) / orders_v)
    eps = np.where(np.isnan(eps), np.inf, eps)
    if np.all(np.isinf(eps)):
        return math.inf, math.nan
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders_v[best])


class RDPAccountant:
    """Privacy spent by repeated Poisson-subsampled Gaussian steps with fixed (z, q).

    ``step(num_steps)`` records steps (one per federated round at client level); ``epsilon()``
    gives epsilon at the accountant's ``delta``; ``rdp()`` the RDP curve over ``orders``.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float, *,
                 orders: Sequence[float] = DEFAULT_ORDERS, conversion: str = "improved"):
        _check_nonnegative("noise_multiplier", noise_multiplier)
        _check_rate(sample_rate)
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if conversion not in CONVERSIONS:
            raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.orders = _check_orders(orders)
        self.conversion = conversion
        self.steps = 0
        # RDP of one step, per order (the composition of k steps is k times it).
        self._rdp_step = compute_rdp(self.sample_rate, self.noise_multiplier, 1, self.orders)

    def step(self, num_steps: int = 1) -> None:
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
        self.steps += int(num_steps)

    def rdp(self) -> np.ndarray:
        return self._rdp_step * self.steps if self.steps else np.zeros_like(self._rdp_step)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon after the recorded steps (0 before any step)."""
        if self.steps == 0:
            return 0.0
        return rdp_to_epsilon(self.orders, self.rdp(), self.delta if delta is None else delta,
                              conversion=self.conversion)[0]

    def best_order(self) -> float:
        if self.steps == 0:
            return math.nan
        return rdp_to_epsilon(self.orders, self.rdp(), self.delta, conversion=self.conversion)[1]


def client_sample_rate(clients_per_round: int, total_clients: int) -> float:
    """Client-level sampling rate q = clients per round / clients in total."""
    for name, value in (("clients_per_round", clients_per_round), ("total_clients", total_clients)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if clients_per_round > total_clients:
        raise ValueError(f"clients_per_round ({clients_per_round}) exceeds total_clients ({total_clients})")
    return clients_per_round / total_clients


def federated_epsilons(noise_multiplier: float, clients_per_round: int, total_clients: int, rounds: int,
                       delta: float, *, orders: Sequence[float] = DEFAULT_ORDERS,
                       conversion: str = "improved") -> list[float]:
    """Cumulative epsilon after each of ``rounds`` rounds (client-level DP, one step per round)."""
    if not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    acc = RDPAccountant(noise_multiplier, client_sample_rate(clients_per_round, total_clients), delta,
                        orders=orders, conversion=conversion)
    out = []
    for _ in range(rounds):
        acc.step()
        out.append(acc.epsilon())
    return out


class FederatedDP:
    """Central DP of one federated run: the noise of each released sum, and the privacy spent.

    ``weight`` bounds one client's weight in the sums (fedlora.secure weighs every update by
    n_max under ``secagg_dp``, so a client moves a sum by at most ``weight * clip_norm``).
    The RDP curve is accumulated round by round with that round's sampling rate, so rounds
    with different numbers of clients compose correctly; :meth:`state` / :meth:`load_state`
    carry it across a resume.
    """

    def __init__(self, noise_multiplier: float, clip_norm: float, delta: float, *, weight: float = 1.0,
                 orders: Sequence[float] = DEFAULT_ORDERS):
        _check_nonnegative("noise_multiplier", noise_multiplier)
        _check_positive("clip_norm", clip_norm)
        _check_positive("weight", weight)
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.noise_multiplier, self.clip_norm, self.delta, self.weight = (
            float(noise_multiplier), float(clip_norm), float(delta), float(weight))
        self.orders = _check_orders(orders)
        self._rdp = np.zeros_like(self.orders)
        self.rounds = 0

    def noisy(self, summed: Mapping[str, np.ndarray], rng: np.random.Generator | None = None) -> AdapterUpdate:
        """One released sum with its Gaussian noise (std ``noise_multiplier * clip_norm * weight``)."""
        return add_central_noise(summed, self.noise_multiplier, self.clip_norm * self.weight, rng=rng)

    def account(self, sample_rate: float) -> float:
        """Record one round in which clients were sampled at ``sample_rate``; epsilon so far."""
        self._rdp = self._rdp + compute_rdp(sample_rate, self.noise_multiplier, 1, self.orders)
        self.rounds += 1
        return self.epsilon()

    def epsilon(self) -> float:
        return rdp_to_epsilon(self.orders, self._rdp, self.delta)[0] if self.rounds else 0.0

    def state(self) -> dict[str, np.ndarray]:
        return {"rdp": self._rdp.copy(), "rounds": np.array([self.rounds])}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if "rdp" in state:
            rdp = np.asarray(state["rdp"], dtype=np.float64)
            if rdp.shape != self.orders.shape:
                raise ValueError(f"checkpointed RDP has {rdp.size} orders, the accountant {self.orders.size}")
            self._rdp, self.rounds = rdp, int(np.asarray(state["rounds"])[0])


# ------------------------------------------------------------------------- validation


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float, np.floating)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_nonnegative(name: str, value: float) -> None:
    if not isinstance(value, (int, float, np.floating)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


def _check_rate(q: float) -> None:
    if not isinstance(q, (int, float, np.floating)) or not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {q!r}")


def _check_orders(orders: Iterable[float] | float) -> np.ndarray:
    v = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if v.size == 0:
        raise ValueError("orders must not be empty")
    if np.any(np.isnan(v)) or np.any(v <= 1):
        raise ValueError(f"every RDP order must be > 1, got {v[(v <= 1) | np.isnan(v)].tolist()}")
    return v
