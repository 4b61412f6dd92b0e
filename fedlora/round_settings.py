"""What an END device receives with each round's request: :class:`RoundSettings`, typed and versioned.

The cloud makes it from the run's resolved settings (:meth:`fedlora.run_settings.RunSettings.round_settings`);
it travels as JSON in a Flower message (:mod:`fedlora.protocol`) and inside a cell request on the wire
(:mod:`fedlora.roles.neighbourhood`). It carries exactly what a device needs to train and to take part in
the round's secure session -- never the whole run config, so a device does not re-validate the
federation's config (nor look for its files). :meth:`RoundSettings.from_dict` refuses a document of
another version, an unknown or missing key, or a malformed value, naming the field.

A deployed device may change HOW it trains, never WHAT it trains: :func:`apply_device_settings` applies
its own ``key=value`` settings (:data:`LOCAL_KEYS`) through the same schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from fedlora.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    omegaconf_message,
    validate_data,
    validate_lora,
    validate_model,
    validate_train,
)

# 2: personal strategies (personal, personal_dir), a LoRA rank per device (lora_ranks), train.mode/split,
#    model.quantize -- a version-1 device would misread these, so it is refused by name.
VERSION = 2
# Effective privacy modes (``privacy=auto`` is resolved by the cloud before settings travel).
PRIVACY_MODES = ("none", "secagg", "secagg_dp")
# What a device keeps for itself under a personal strategy (fedlora.roles.personal): nothing, its own
# LoRA B tensors (FedSA-LoRA), or a whole local adapter beside the shared one (FedDPA).
PERSONAL_KINDS = ("none", "lora_b", "adapter")
# How a cell sums its devices' updates (fedlora.aggregate.robust.RULES).
AGGREGATION_RULES = ("mean", "median", "trimmed_mean")


class RoundSettingsError(ValueError):
    """Round settings a device cannot use; the message names the field."""


@dataclass(frozen=True)
class RoundSettings:
    """One round's settings for the devices (and the cell aggregators) below the cloud."""

    # Format of this document; a device refuses any other (RoundSettings.from_dict).
    version: int
    round: int
    # The run's seed: the LoRA initialisation, each device's training order, data partition, simulated keys.
    seed: int
    # The federation's data is split this many ways (federation.num_clients); a device trains on its partition.
    num_partitions: int
    model: ModelConfig
    lora: LoraConfig
    train: TrainConfig
    data: DataConfig
    # The strategy's client side: A frozen and not sent (FFA-LoRA), FedProx's proximal term.
    freeze_a: bool
    proximal_mu: float
    # What the device keeps and never sends (PERSONAL_KINDS), and where a simulated device keeps it (the
    # run directory's personal/; a deployed device uses its own folder's state/ instead; "" when none).
    personal: str
    personal_dir: str
    # Effective privacy mode (none | secagg | secagg_dp); secagg_dp: each device clips its update to
    # L2 norm clip_norm and reports max_examples (n_max) as its count.
    privacy: str
    clip_norm: float
    max_examples: int
    # Torch threads a device trains with (simulation.threads_per_client, else simulation.cpus_per_client).
    threads: int
    # Seconds a cell aggregator waits for its devices' replies (federation.round_timeout_s).
    round_timeout_s: float
    # How a plain cell sums its devices' updates (fedlora/aggregate/robust.py): mean | median | trimmed_mean
    # (cutting trim_fraction at each end); norm_bound > 0 clips each update to that L2 norm (by the cell in plain
    # mode, by the device itself under secure aggregation); 0 = off.
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    norm_bound: float = 0.0
    # Devices that train a lower LoRA rank than lora.r (their profile's lora_r): partition id -> rank.
    # Such a device trains the first r components of the global adapter and returns its update
    # zero-padded to lora.r (fedlora/aggregate/ranks.py); a device not listed trains lora.r.
    lora_ranks: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_version(self.version)
        try:  # every value against its field's type, exactly (a constructor on the wire converts nothing)
            typed = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(type(self)), dataclasses.asdict(self)))
        except Exception as exc:  # omegaconf raises several types; all mean "bad type"
            raise RoundSettingsError(f"round settings: {omegaconf_message(exc)}") from None
        for name, value in dataclasses.asdict(self).items():
            if typed[name] != value or type(typed[name]) is not type(value):
                raise RoundSettingsError(f"round settings: {name}={value!r} is not of the field's type")
        try:
            validate_model(self.model, files=False)
            validate_lora(self.lora)
            validate_train(self.train)
            validate_data(self.data, files=False)
        except ConfigError as exc:
            raise RoundSettingsError(f"round settings: {exc}") from None
        bounds = {"round": 1, "num_partitions": 1, "max_examples": 1, "threads": 1, "proximal_mu": 0.0}
        for name, low in bounds.items():
            if getattr(self, name) < low:
                raise RoundSettingsError(f"round settings: {name}={getattr(self, name)} must be >= {low}")
        for name in ("clip_norm", "round_timeout_s"):
            if getattr(self, name) <= 0:
                raise RoundSettingsError(f"round settings: {name}={getattr(self, name)} must be > 0")
        if self.personal not in PERSONAL_KINDS:
            raise RoundSettingsError(f"round settings: personal={self.personal!r} is not one of: {', '.join(PERSONAL_KINDS)}")
        for device, rank in self.lora_ranks.items():
            if not device.isdigit() or not 1 <= rank <= self.lora.r:
                raise RoundSettingsError(f"round settings: lora_ranks[{device!r}]={rank} must be a partition id -> "
                                         f"a rank in [1, lora.r={self.lora.r}]")
        if self.aggregation not in AGGREGATION_RULES:
            raise RoundSettingsError(f"round settings: aggregation={self.aggregation!r} is not one of: "
                                     f"{', '.join(AGGREGATION_RULES)}")
        if not 0 <= self.trim_fraction < 0.5 or self.norm_bound < 0:
            raise RoundSettingsError(f"round settings: trim_fraction={self.trim_fraction} must be in [0, 0.5) and "
                                     f"norm_bound={self.norm_bound} >= 0")
        if self.privacy not in PRIVACY_MODES:
            raise RoundSettingsError(f"round settings: privacy={self.privacy!r} is not one of: {', '.join(PRIVACY_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document; :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> RoundSettings:
        """Round settings from a document (:meth:`to_dict`); :class:`RoundSettingsError` naming the field for
        another version, an unknown or missing key, or a value of the wrong type or out of range."""
        if not isinstance(doc, Mapping):
            raise RoundSettingsError(f"round settings must be a mapping, got {type(doc).__name__}")
        _check_version(doc.get("version"))  # first: another version may have other fields
        where = _interpolation(doc)
        if where:  # omegaconf would resolve it on this device: its environment (oc.env), or an error
            raise RoundSettingsError(f"round settings: {where} is an interpolation (${{...}}); settings carry plain values")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), dict(doc))
            missing = _missing_keys(OmegaConf.to_container(merged), doc)
            if missing:
                raise RoundSettingsError(f"round settings lack {', '.join(missing)}")
            return OmegaConf.to_object(merged)  # type: ignore[return-value]
        except RoundSettingsError:
            raise
        except Exception as exc:  # omegaconf raises several types; all mean "bad key/type"
            raise RoundSettingsError(f"round settings: {omegaconf_message(exc)}") from None


# What a deployed device may set for itself (``fedlora client`` picks them from its memory,
# fedlora/deploy/device.py): HOW it trains, never WHAT it trains (model, LoRA shape, steps,
# learning rate stay the federation's, so every update has the same shape and meaning).
# Config key (what the launcher writes) -> the round settings' field it sets.
LOCAL_KEYS = {"model.dtype": "model.dtype", "train.gradient_checkpointing": "train.gradient_checkpointing",
              "train.batch_size": "train.batch_size", "train.grad_accum": "train.grad_accum",
              "train.max_seq_len": "train.max_seq_len", "simulation.threads_per_client": "threads",
              # a quantised frozen base (fedlora/quantize.py): the adapter it trains is the same fp32 shape
              "model.quantize": "model.quantize"}


def apply_device_settings(settings: RoundSettings, device_settings: str, data_file: str = "") -> RoundSettings:
    """``settings`` with a deployed device's own: ``device_settings`` is ``"model.dtype=bfloat16
    train.batch_size=2"`` (a SuperNode's node config; keys of :data:`LOCAL_KEYS`), parsed and checked by
    the round settings' schema; ``data_file``: the device's own examples (all of them are its data), in
    place of the federation's partition. ValueError naming the device setting that cannot apply."""
    items = device_settings.split()
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or key not in LOCAL_KEYS:
            raise ValueError(f"device setting {item!r}: only {', '.join(sorted(LOCAL_KEYS))} may be set per device")
    doc = settings.to_dict()
    if data_file:
        doc["data"].update(source="file", path=data_file, partitioner="iid", partition_by="")
    fields = [f"{LOCAL_KEYS[item.partition('=')[0]]}={item.partition('=')[2]}" for item in items]
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(doc, OmegaConf.from_dotlist(fields)))
    except Exception as exc:  # omegaconf (and the YAML parser under it) raise several types; all mean "bad value"
        raise ValueError(f"device settings {device_settings!r}: {omegaconf_message(exc)}") from None
    try:
        return RoundSettings.from_dict(merged)
    except RoundSettingsError as exc:  # it names the field
        raise ValueError(f"device settings {device_settings!r}: {exc}") from None


def _check_version(version: Any) -> None:
    if version != VERSION or type(version) is not int:
        raise RoundSettingsError(f"round settings version={version!r}: this fedlora reads version {VERSION} only "
                                 f"(the cloud and its devices must run the same fedlora)")


def _interpolation(doc: Any, prefix: str = "") -> str:
    """The first key of ``doc`` (nested) whose string value holds an omegaconf interpolation ("" when none)."""
    if isinstance(doc, str):
        return (prefix or "a value") if "${" in doc else ""
    items = doc.items() if isinstance(doc, Mapping) else enumerate(doc) if isinstance(doc, (list, tuple)) else ()
    for key, value in items:
        found = _interpolation(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return ""


def _missing_keys(schema: Mapping, doc: Mapping, prefix: str = "") -> list[str]:
    """Keys of ``schema`` (nested) that ``doc`` does not have: a device never fills in a default."""
    out = []
    for key, value in schema.items():
        if key not in doc:
            out.append(prefix + key)
        elif isinstance(value, Mapping) and isinstance(doc[key], Mapping):
            out += _missing_keys(value, doc[key], f"{prefix}{key}.")
    return out
