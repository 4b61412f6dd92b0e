"""A run's derived settings, resolved once where the run starts: :func:`resolve_run` -> :class:`RunSettings`.

The config (:mod:`fedlora.config`) holds what the user chose and checks each of its own fields;
what follows from the choices as a whole is resolved here, once per run: the effective privacy
mode (``privacy=auto`` -> none or secagg), n_max (the public bound on a client's example count),
the cell tree, and whether the secure sums fit the encoding (a config whose sums could overflow
is refused here with a :class:`~fedlora.config.ConfigError`, before anything runs). The cloud
(:func:`fedlora.roles.cloud.run_federation`, ``server/app.py``), a deployment plan and
``fedlora status`` make one and pass it on; the devices get the part they need each round
(:meth:`RunSettings.round_settings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

from fedlora.config import PERSONAL_STRATEGIES, ROBUST_RULES, ConfigError, FedLoraConfig, TrainConfig
from fedlora.round_settings import VERSION, RoundSettings
from fedlora.schedule import lr_factor
from fedlora.secure.encoding import EncodingConfig, check_overflow
from fedlora.secure.errors import UnsafeEncoding
from fedlora.secure.rounds import LOSS_KEY, SecureSettings
from fedlora.world.topology import CellTree, build_tree

# Effective privacy modes that run secure aggregation.
SECURE_MODES = ("secagg", "secagg_dp")


@dataclass(frozen=True)
class RunSettings:
    """One run's config and what is derived from it (:func:`resolve_run`)."""

    config: FedLoraConfig
    # Effective privacy mode: none | secagg | secagg_dp (``privacy=auto`` resolved).
    privacy: str
    # n_max: the public bound on one client's example count under secure aggregation.
    max_examples: int
    # The cell tree between the END clients and the cloud (round 1's placement; mobility moves clients).
    tree: CellTree

    @property
    def secure(self) -> bool:
        """Whether the run's rounds use secure aggregation."""
        return self.privacy in SECURE_MODES

    def secure_settings(self, expected: Mapping[str, Any]) -> SecureSettings | None:
        """The secure sessions' settings for an adapter of these tensors (None without secure aggregation)."""
        if not self.secure:
            return None
        p = self.config.privacy
        clips = {name: v for name in expected for key, v in p.clip_per_tensor.items() if key in name}
        clips[LOSS_KEY] = p.loss_clip
        encoding = EncodingConfig(bits=p.bits, clip=p.clip, clip_per_tensor=clips, max_examples=self.max_examples)
        return SecureSettings(encoding, p.threshold, p.unmasker, p.prg, p.complete_graph_up_to, packing=p.packing,
                              bound_check=p.bound_check, norm_bound=self.norm_bound())

    def norm_bound(self) -> float:
        """The L2 norm every honest update is clipped to (0: none): ``strategy.norm_bound``, and under
        ``secagg_dp`` also ``privacy.clip_norm`` (the smaller of the two)."""
        bounds = [b for b in (self.config.strategy.norm_bound,
                              self.config.privacy.clip_norm if self.privacy == "secagg_dp" else 0.0) if b > 0]
        return min(bounds, default=0.0)

    def round_settings(self, server_round: int, client_settings: Mapping[str, Any]) -> RoundSettings:
        """What the devices get with round ``server_round``'s requests; ``client_settings``: the
        strategy's (``freeze_a``, ``proximal_mu``; a personal strategy's ``personal`` and ``personal_dir``)."""
        cfg = self.config
        return RoundSettings(
            version=VERSION, round=server_round, seed=cfg.seed, num_partitions=cfg.federation.num_clients,
            model=deepcopy(cfg.model), lora=deepcopy(cfg.lora), train=self.round_train(server_round), data=deepcopy(cfg.data),
            freeze_a=bool(client_settings["freeze_a"]), proximal_mu=float(client_settings["proximal_mu"]),
            personal=str(client_settings.get("personal", "none")), personal_dir=str(client_settings.get("personal_dir", "")),
            privacy=self.privacy, clip_norm=float(cfg.privacy.clip_norm), max_examples=self.max_examples,
            threads=cfg.simulation.threads_per_client or cfg.simulation.cpus_per_client,
            round_timeout_s=float(cfg.federation.round_timeout_s),
            aggregation=ROBUST_RULES.get(cfg.strategy.name, "mean"), trim_fraction=float(cfg.strategy.trim_fraction),
            norm_bound=float(cfg.strategy.norm_bound), lora_ranks=self.lora_ranks())

    def round_train(self, server_round: int) -> TrainConfig:
        """The local training settings of round ``server_round``: ``train`` with the round's learning rate
        under ``federation.lr_schedule`` / ``lr_warmup_rounds`` (fedlora/schedule.py; train.lr itself when constant)."""
        cfg = self.config
        train, f = deepcopy(cfg.train), cfg.federation
        if f.lr_schedule != "constant" or f.lr_warmup_rounds:
            train.lr = cfg.train.lr * lr_factor(f.lr_schedule, server_round - 1, f.rounds, f.lr_warmup_rounds)
        return train

    def lora_ranks(self) -> dict[str, int]:
        """Devices whose profile trains a lower LoRA rank than ``lora.r``: partition id -> rank (HetLoRA)."""
        r = self.config.lora.r
        ranks = {client: self.tree.profile(client).lora_r or r for client in self.tree.profile_of}
        return {str(client): rank for client, rank in sorted(ranks.items()) if rank != r}


def resolve_run(cfg: FedLoraConfig) -> RunSettings:
    """The run's settings from its (validated) config; :class:`ConfigError` when its secure sums could overflow."""
    privacy = _privacy_mode(cfg)
    n_max = cfg.privacy.max_examples or cfg.data.records_per_client
    if privacy in SECURE_MODES:
        p = cfg.privacy
        try:  # worst case: every client's update in one sum
            check_overflow(cfg.federation.num_clients, p.bits, n_max)
        except UnsafeEncoding as exc:
            raise ConfigError(f"privacy.bits={p.bits} with privacy.max_examples={n_max} and federation.num_clients="
                              f"{cfg.federation.num_clients} is unsafe: {exc}") from None
    _check_split(cfg, privacy)
    _check_robust(cfg, privacy)
    run = RunSettings(cfg, privacy, n_max, build_tree(cfg.topology, cfg.federation.num_clients, cfg.seed))
    _check_combinations(cfg, run)
    return run


def _check_combinations(cfg: FedLoraConfig, run: RunSettings) -> None:
    """Refuse the pairings of split learning, personal strategies and per-device ranks that are not built
    (each works alone; together they would train something nobody has checked)."""
    personal = cfg.strategy.name in PERSONAL_STRATEGIES
    ranks = run.lora_ranks()
    if personal and cfg.train.mode != "full":
        raise ConfigError(f"strategy={cfg.strategy.name} with train.mode={cfg.train.mode}: personal strategies "
                          "with split learning are not built yet; use train.mode=full or another strategy")
    if ranks and cfg.train.mode != "full":
        raise ConfigError(f"train.mode={cfg.train.mode} with per-device LoRA ranks (topology.profiles.*.lora_r: "
                          f"{len(ranks)} device(s) below lora.r={cfg.lora.r}): not built yet; use one rank or train.mode=full")
    if ranks and personal:
        raise ConfigError(f"strategy={cfg.strategy.name} with per-device LoRA ranks (topology.profiles.*.lora_r): "
                          "personal strategies at several ranks are not built yet; use one rank or another strategy")


def _check_robust(cfg: FedLoraConfig, privacy: str) -> None:
    """A median or trimmed mean needs the individual updates, which only a plain cell sees; norm bounding is
    built for full (not split) devices."""
    name = cfg.strategy.name
    if name in ROBUST_RULES and privacy != "none":
        raise ConfigError(f"strategy={name} with privacy={privacy} (privacy.mode={cfg.privacy.mode}): a "
                          f"{ROBUST_RULES[name].replace('_', ' ')} needs each update, which secure aggregation hides "
                          "from every tier; use privacy=none, or strategy.norm_bound with privacy.bound_check=true "
                          "under secure aggregation (docs/robust.md)")
    if (name in ROBUST_RULES or cfg.strategy.norm_bound > 0) and cfg.train.mode != "full":
        raise ConfigError(f"strategy={name} / strategy.norm_bound={cfg.strategy.norm_bound} with train.mode="
                          f"{cfg.train.mode}: robust aggregation of split updates is not built yet; use train.mode=full")


def _check_split(cfg: FedLoraConfig, privacy: str) -> None:
    """Split learning (``train.mode`` split|auto) is built for plain sums and secure aggregation without DP noise
    (with or without HierFAVG cell models)."""
    if cfg.train.mode == "full":
        return
    if privacy == "secagg_dp":
        raise ConfigError(f"train.mode={cfg.train.mode} with privacy=secagg_dp (privacy.mode={cfg.privacy.mode}): DP "
                          "clips each device's whole update to privacy.clip_norm, but a split device holds only its own "
                          "blocks' part (its edge trains the rest): not built yet; use privacy=secagg or privacy=none "
                          "(docs/split_learning.md)")


def _privacy_mode(cfg: FedLoraConfig) -> str:
    """The effective privacy mode. ``auto`` is secagg on tree topologies whose neighbourhood
    cells can hold a secure session (at least 2 clients per neighbourhood on average), and
    none on flat or on trees too sparse for one (a cell of 1 cannot hide its client's update,
    so it would never be aggregated)."""
    if cfg.privacy.mode == "auto":
        t = cfg.topology
        sparse = cfg.federation.num_clients < 2 * t.suburban_cells * t.neighbourhoods_per_suburban
        return "none" if t.kind == "flat" or sparse else "secagg"
    return cfg.privacy.mode
