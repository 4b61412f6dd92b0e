"""Strategies: how the cloud turns the round's average delta into the next global adapter.

Clients send *deltas* (their trained LoRA tensors minus the global ones) with an example
count; the tiers add them into a :class:`~fedlora.aggregate.sums.WeightedSum` on the way up
and the cloud hands the strategy its mean.

Strategies (``strategy.name``):
- ``fedavg``  FedIT: average A and B separately (approximate: mean(B)mean(A) != mean(BA)).
- ``fedprox`` fedavg on the server; clients add a proximal term ``mu/2 ||w - w_global||^2``.
- ``fedadam`` / ``fedyogi``: server optimiser on the average delta (Reddi et al., 2021),
  with bias correction so the first round's step is ``server_lr`` sized.
- ``fedavgm``: server momentum (Hsu et al., 2019, arXiv 1909.06335): ``v = server_momentum * v +
  mean delta``, next global = global + ``server_lr * v`` (momentum 0 and server_lr 1 is FedAvg).
- ``ffa_lora``: A frozen at its shared initialisation, only B trained and sent; averaging B
  is then exact (the product BA is linear in B).
- ``fedmedian`` / ``fedtrimmedavg`` (robust, plain mode only): each neighbourhood cell -- the tier that sees
  the individual updates -- takes their coordinate-wise median / trimmed mean (:mod:`fedlora.aggregate.robust`),
  and the cloud averages the cells' estimates like FedAvg. ``strategy.norm_bound`` (any strategy) clips
  each update to an L2 norm first.

Personal strategies keep part of the learning on each device (:mod:`fedlora.roles.personal`):
- ``fedsa_lora`` (FedSA-LoRA, arXiv 2410.01463): devices train A and B, send only A (averaged
  like FedAvg's), and keep their own B.
- ``feddpa`` (FedDPA, arXiv 2403.19211): the shared adapter is trained, sent and averaged like
  FedAvg's; each device also trains a local adapter that never leaves it, both active at inference.
"""

from __future__ import annotations

import numpy as np

from fedlora.adapters import AdapterState, is_lora_b
from fedlora.config import StrategyConfig


class Strategy:
    """FedAvg family: next global = global + average delta."""

    name = "fedavg"
    # What a device keeps for itself and never sends (fedlora.round_settings.PERSONAL_KINDS).
    personal = "none"

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg

    def client_settings(self) -> dict[str, float | bool | str]:
        """What clients must do differently under this strategy."""
        return {"proximal_mu": 0.0, "freeze_a": False}

    def shared_keys(self, trainable: list[str]) -> list[str]:
        """Of the adapter tensors a device trains, those it sends (and the cloud aggregates)."""
        return trainable

    def apply(self, global_state: AdapterState, mean_delta: AdapterState) -> AdapterState:
        out = dict(global_state)
        for key, delta in mean_delta.items():
            out[key] = (global_state[key] + delta).astype(np.float32)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Server-optimiser state to checkpoint (none for FedAvg)."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        del state


class FedProx(Strategy):
    name = "fedprox"

    def client_settings(self) -> dict[str, float | bool]:
        return {"proximal_mu": float(self.cfg.proximal_mu), "freeze_a": False}


class FFALoRA(Strategy):
    name = "ffa_lora"

    def client_settings(self) -> dict[str, float | bool]:
        return {"proximal_mu": 0.0, "freeze_a": True}


class FedSALoRA(Strategy):
    """A shared and aggregated, B personal: the device's reply holds only A."""

    name = "fedsa_lora"
    personal = "lora_b"

    def client_settings(self) -> dict[str, float | bool | str]:
        return {"proximal_mu": 0.0, "freeze_a": False, "personal": self.personal}

    def shared_keys(self, trainable: list[str]) -> list[str]:
        return [k for k in trainable if not is_lora_b(k)]


class FedDPA(Strategy):
    """A global adapter averaged like FedAvg's, and a personal adapter per device that is never sent."""

    name = "feddpa"
    personal = "adapter"

    def client_settings(self) -> dict[str, float | bool | str]:
        return {"proximal_mu": 0.0, "freeze_a": False, "personal": self.personal}


class FedMedian(Strategy):
    """Coordinate-wise median of each cell's updates (the cells apply it: fedlora/aggregate/robust.py), then
    FedAvg of the cells' medians. Plain mode only."""

    name = "fedmedian"


class FedTrimmedAvg(Strategy):
    """Coordinate-wise trimmed mean of each cell's updates (``strategy.trim_fraction`` cut at each end, applied
    by the cells: fedlora/aggregate/robust.py), then FedAvg of the cells' estimates. Plain mode only."""

    name = "fedtrimmedavg"


class FedOpt(Strategy):
    """FedAdam / FedYogi: adaptive server optimiser on the pseudo-gradient (average delta)."""

    def __init__(self, cfg: StrategyConfig, variant: str):
        super().__init__(cfg)
        self.name = variant
        self.m: AdapterState = {}
        self.v: AdapterState = {}
        self.t = 0

    def apply(self, global_state: AdapterState, mean_delta: AdapterState) -> AdapterState:
        c = self.cfg
        self.t += 1
        out = dict(global_state)
        for key, delta in mean_delta.items():
            d = delta.astype(np.float64)
            m = self.m.get(key, np.zeros_like(d))
            v = self.v.get(key, np.zeros_like(d))
            m = c.beta1 * m + (1 - c.beta1) * d
            if self.name == "fedyogi":
                v = v - (1 - c.beta2) * d * d * np.sign(v - d * d)
            else:
                v = c.beta2 * v + (1 - c.beta2) * d * d
            self.m[key], self.v[key] = m, v
            m_hat = m / (1 - c.beta1**self.t)
            v_hat = v / (1 - c.beta2**self.t)
            step = c.server_lr * m_hat / (np.sqrt(v_hat) + c.tau)
            out[key] = (global_state[key] + step).astype(np.float32)
        return out

    def state(self) -> dict[str, np.ndarray]:
        out = {f"m/{k}": v for k, v in self.m.items()}
        out.update({f"v/{k}": v for k, v in self.v.items()})
        out["t"] = np.array(self.t)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state.get("t", 0))
        self.m = {k[2:]: v for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: v for k, v in state.items() if k.startswith("v/")}


class FedAvgM(Strategy):
    """FedAvg with server momentum: the cloud keeps a velocity of past average deltas."""

    name = "fedavgm"

    def __init__(self, cfg: StrategyConfig):
        super().__init__(cfg)
        self.velocity: AdapterState = {}

    def apply(self, global_state: AdapterState, mean_delta: AdapterState) -> AdapterState:
        c = self.cfg
        out = dict(global_state)
        for key, delta in mean_delta.items():
            v = c.server_momentum * self.velocity.get(key, np.zeros_like(delta, np.float64)) + delta.astype(np.float64)
            self.velocity[key] = v
            out[key] = (global_state[key] + c.server_lr * v).astype(np.float32)
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {f"velocity/{k}": v for k, v in self.velocity.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.velocity = {k[len("velocity/"):]: v for k, v in state.items() if k.startswith("velocity/")}


def make_strategy(cfg: StrategyConfig) -> Strategy:
    classes = {"fedavg": Strategy, "fedprox": FedProx, "ffa_lora": FFALoRA, "fedsa_lora": FedSALoRA, "feddpa": FedDPA,
               "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "fedavgm": FedAvgM}
    if cfg.name in classes:
        return classes[cfg.name](cfg)
    if cfg.name in ("fedadam", "fedyogi"):
        return FedOpt(cfg, cfg.name)
    raise ValueError(f"strategy.name={cfg.name!r} is not a known strategy")
