"""The server's round loop, independent of how messages travel.

:func:`run_federation` reads top to bottom; each round is one phase after another:

1. :func:`sample_participants`: a seeded sample of the connected clients (topped up per
   neighbourhood under secure aggregation), less the devices that are off this round.
2. :func:`dispatch`: one :class:`CellRequest` per neighbourhood cell with a training client (with
   its secure session under secure aggregation), run by the :class:`CellRunner`. The cells drop
   any reply that is an error or malformed (wrong tensors, shapes, dtype, NaN/inf, bad example
   count) or late, and go on with the rest.
3. :func:`aggregate_up`: the cells' sums up the tree -- unmasked and decoded under secure
   aggregation, merged tier by tier, or under HierFAVG absorbed into the neighbourhoods' cell
   models and synced with the cloud every ``topology.cloud_sync_every`` rounds.
4. :func:`apply_strategy`: the strategy moves the global adapter by the mean update.
5. :func:`evaluate_global`: the new global adapter on held-out data.
6. :func:`round_network`, :func:`round_record`, :func:`save_round`: the network model's bytes and
   times, the round's record in ``rounds.jsonl`` and a checkpoint.

Around the rounds, :func:`start_run` sets up a new run or resumes one from its checkpoint, and
:func:`finish_run` exports the adapter, plots and summarises. A :class:`Transport` delivers
messages: Flower's Grid in ``server/app.py``, or :class:`InProcessTransport` for tests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedlora import adapters
from fedlora.adapters import AdapterState
from fedlora.aggregate.dp import FederatedDP
from fedlora.aggregate.strategies import Strategy, make_strategy
from fedlora.aggregate.sums import WeightedSum
from fedlora.config import FederationConfig, FedLoraConfig, save_yaml
from fedlora.data import eval_examples, tokenize
from fedlora.model import resolve_model_dir
from fedlora.roles.device import initial_adapter, lora_model
from fedlora.roles.hierfavg import CellModels
from fedlora.roles.local import LocalCellRunner
from fedlora.roles.lone import host_lone_devices, left_out
from fedlora.roles.neighbourhood import (
    AggregatorKeys,
    CellRequest,
    CellResult,
    ClientReply,
    ClientStatus,
    LateCallback,
    ReplyCallback,
    Transport,
    reject_reason,
    split_status,
)
from fedlora.roles.personal import ADAPTER, NONE, PERSONAL_DIR
from fedlora.roles.personal_eval import personal_report
from fedlora.roles.split import SPLIT_NOTE
from fedlora.roles.suburban import TreeSums, merge_up
from fedlora.run_settings import RunSettings, resolve_run
from fedlora.runs import report
from fedlora.runs.progress import Progress
from fedlora.secure.identities import Identities, SimulatedIdentities
from fedlora.secure.rounds import (
    ACCEPTED,
    CELL_ABORTED,
    CELL_REFUSED,
    DROPPED,
    LATE,
    LOSS_KEY,
    SecureRound,
    SecureSettings,
    secure_layout,
)
from fedlora.seeds import round_seed
from fedlora.split import model_shape
from fedlora.tasks import advice_line, run_advice_accuracy
from fedlora.train import evaluate
from fedlora.world.attachments import EdgeReport, place_devices
from fedlora.world.mobility import assignment_at, next_assignment
from fedlora.world.netsim import RoundNetwork, SplitTraffic, simulate_round, unavailable
from fedlora.world.splitplan import ModelShape, SplitChoice, plan_round
from fedlora.world.topology import CLOUD, CellTree

log = logging.getLogger("fedlora")

class FederationError(RuntimeError):
    """The run cannot go on (not enough clients, inconsistent run directory)."""


class CellRunner(Protocol):
    """Runs the round's neighbourhood cells and returns their results, one per request, in order.

    :class:`LocalCellRunner` runs them in this process; a deployment sends each request to
    the cell's edge-aggregator process, which calls :func:`fedlora.roles.neighbourhood.run_cell` there.
    ``late`` and ``on_reply`` are hints a remote runner may apply on its side or ignore.
    A runner whose ``hosts_lone_devices`` is true can run a cell with a client from another
    neighbourhood (every client is reachable from where the cells run); without it a device alone
    in its cell is refused (:mod:`fedlora.roles.lone`).
    """

    def run(self, requests: list[CellRequest], *, late: LateCallback | None = None,
            on_reply: ReplyCallback | None = None, keys: AggregatorKeys | None = None) -> list[CellResult]: ...


class DeviceLocator(Protocol):
    """Where the END devices of a deployment are: before each round, every edge's report of
    the devices connected to it (:mod:`fedlora.world.attachments`)."""

    def reports(self, server_round: int) -> list[EdgeReport]: ...


def run_federation(
    cfg: FedLoraConfig | RunSettings,
    run_dir: str | Path,
    transport: Transport,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    runner: CellRunner | None = None,
    identities: Identities | None = None,
    locator: DeviceLocator | None = None,
) -> dict:
    """Run (or resume) the configured rounds; fill ``run_dir``; return the summary.

    ``transport`` names the clients that can train; ``runner`` runs each round's cells
    (default: :class:`LocalCellRunner` over ``transport``, in this process);
    ``identities``: the secure rounds' keys (default: derived from the seed, simulation only;
    a deployed cloud passes the plan's, :class:`~fedlora.secure.identities.PlannedIdentities`).
    ``locator``: a deployment whose devices move between edges; each round then places every
    device in the cell its edge reports it in (:func:`locate_devices`), not by the mobility model.
    ``cfg``: the run's config, or its settings already resolved (:func:`~fedlora.run_settings.resolve_run`).
    """
    resolved = cfg if isinstance(cfg, RunSettings) else resolve_run(cfg)
    cfg = resolved.config
    run = start_run(resolved, Path(run_dir), transport, resume=resume, progress=progress or Progress(),
                    runner=runner or LocalCellRunner(transport), identities=identities or SimulatedIdentities(cfg.seed))
    sent = run.sent()
    run.progress.start(cfg.federation.rounds, run.done + 1)
    for server_round in range(run.done + 1, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        if locator is not None:  # a deployment: the devices are where their edges see them
            run.cell_of = locate_devices(run, server_round, locator)
        elif server_round > run.done + 1:
            run.cell_of = next_assignment(run.tree, run.cell_of, server_round, cfg.seed)  # handovers between rounds
        who = sample_participants(run, server_round)
        run.progress.start_round(server_round, who.training)
        sent = run.sent()
        sync = run.syncs_with_cloud(server_round)
        replies = dispatch(run, server_round, who, sent, sync)
        up = aggregate_up(run, server_round, replies, sync)
        aggregated = apply_strategy(run, server_round, up.total)
        eval_loss, eval_s = evaluate_global(run)
        net = round_network(run, server_round, who, up, sent, sync)
        record = round_record(run, server_round, who, up, net, aggregated=aggregated, sync=sync, eval_loss=eval_loss,
                              eval_s=eval_s, wall_s=time.perf_counter() - t0, plan=replies.split_plan)
        save_round(run, server_round, record)
        pause_between_rounds(run, server_round)
    return finish_run(run, sent)


# -- the run: set-up or resume, and what lasts across its rounds -------------------------------------------------


@dataclass
class HeldOut:
    """The cloud's own copy of the model and the held-out data it evaluates each global adapter on."""

    config: FedLoraConfig
    freeze_a: bool
    tokenizer: Any
    examples: list
    batch_size: int
    personal: bool = False  # with FedDPA's local adapter beside the shared one (the per-client report uses both)

    @property
    def model(self) -> Any:
        """The process's PEFT model at the global adapter's rank: fetched each time, as devices trained in this
        process (simulation, tests) may have re-wrapped the shared base for their own rank or base."""
        return lora_model(self.config, freeze_a=self.freeze_a, personal=self.personal)[0]

    def loss(self, state: AdapterState) -> float:
        model = self.model
        adapters.set_state(model, state)
        return evaluate(model, self.examples, self.batch_size, pad_id=self.tokenizer.pad_token_id)[0]


@dataclass
class Run:
    """What lasts across the rounds of one run: set up by :func:`start_run`, moved on by each round."""

    cfg: FedLoraConfig
    resolved: RunSettings  # privacy mode, n_max and the cell tree, resolved once for the run
    run_dir: Path
    run_id: str  # the run directory's name: every secure session is bound to it
    progress: Progress
    runner: CellRunner
    identities: Identities
    strategy: Strategy
    client_settings: dict[str, Any]  # the strategy's part of every round's settings (freeze_a)
    held_out: HeldOut
    trainable: list[str]  # the adapter tensors clients train and send back
    expected: dict[str, tuple]  # trainable tensor -> the shape a reply must have
    global_state: AdapterState
    base_loss: float  # held-out loss of the base model (round 0)
    done: int  # rounds finished before this session
    wall_before: float  # run seconds spent before this session
    started: float  # perf_counter() when this session started
    available: list[int]  # connected clients, in id order
    tree: CellTree
    hierfavg: bool  # neighbourhood cell models between cloud syncs (topology.cloud_sync_every > 1)
    cells: CellModels
    cell_of: dict[int, str]  # client -> the leaf cell it is in this round
    secure: SecureSettings | None  # None: plain sums
    dp: FederatedDP | None  # None: no DP noise (privacy is not secagg_dp)
    shape: ModelShape | None = None  # the split planner's view of the model (train.mode split|auto), else None

    def sent(self) -> AdapterState:
        """The trainable part of the global adapter: what a round sends down."""
        return {k: self.global_state[k] for k in self.trainable}

    def syncs_with_cloud(self, server_round: int) -> bool:
        """Whether this round's sums reach the cloud: always, but under HierFAVG every k-th round and the last."""
        return not self.hierfavg or self.tree.syncs_with_cloud(server_round) or server_round == self.cfg.federation.rounds

    def wall_s(self) -> float:
        """Run seconds so far, sessions before this one included."""
        return self.wall_before + time.perf_counter() - self.started


def start_run(resolved: RunSettings, run_dir: Path, transport: Transport, *, resume: bool, progress: Progress,
              runner: CellRunner, identities: Identities) -> Run:
    """A new run (config saved, base model evaluated, round-0 checkpoint) or one resumed from its last checkpoint."""
    started = time.perf_counter()
    cfg = resolved.config
    ckpt = _open_run_dir(cfg, run_dir, resume)
    strategy = make_strategy(cfg.strategy)
    client_settings = strategy.client_settings()
    if strategy.personal != NONE:  # simulated devices keep their own part in the run directory (a resume reads it)
        client_settings["personal_dir"] = str((run_dir / PERSONAL_DIR).resolve())
    dual = strategy.personal == ADAPTER
    model, tokenizer = lora_model(cfg, freeze_a=bool(client_settings["freeze_a"]), personal=dual)
    global_state = initial_adapter(cfg, freeze_a=bool(client_settings["freeze_a"]), personal=dual)
    trainable = strategy.shared_keys(list(adapters.get_state(model, trainable_only=True)))
    expected = {k: global_state[k].shape for k in trainable}
    examples = tokenize(eval_examples(cfg.data, cfg.federation.num_clients, cfg.seed), tokenizer, cfg.train.max_seq_len)
    held_out = HeldOut(cfg, bool(client_settings["freeze_a"]), tokenizer, examples, cfg.train.eval_batch_size, dual)
    if ckpt is not None:
        done, arrays, meta = ckpt
        global_state = _section(arrays, "adapter/")
        strategy.load_state(_section(arrays, "strategy/"))
        base_loss, wall_before = meta["base_eval_loss"], meta["wall_s"]
        report.truncate_rounds(run_dir, done)
        progress.note(f"resuming {run_dir} after round {done}")
    else:
        done, wall_before = 0, 0.0
        base_loss = held_out.loss(global_state)
        progress.note(f"held-out loss of the base model: {base_loss:.4f} ({len(examples)} examples)")
        _checkpoint(run_dir, 0, global_state, strategy, base_loss, 0.0)
    available = _connected_clients(cfg, transport)
    tree = resolved.tree
    cells = CellModels(tree)
    if ckpt is not None:
        cells.load_state(_section(ckpt[1], "cells/"))
    cell_of = assignment_at(tree, done + 1, cfg.seed)
    secure, dp = _privacy(resolved, expected, ckpt)
    shape = model_shape(model, cfg.model) if cfg.train.mode != "full" else None
    return Run(cfg=cfg, resolved=resolved, run_dir=run_dir, run_id=run_dir.resolve().name, progress=progress, runner=runner,
               identities=identities, strategy=strategy, client_settings=client_settings, held_out=held_out,
               trainable=trainable, expected=expected, global_state=global_state, base_loss=base_loss, done=done,
               wall_before=wall_before, started=started, available=available, tree=tree,
               hierfavg=tree.kind != "flat" and tree.cloud_sync_every > 1, cells=cells, cell_of=cell_of, secure=secure, dp=dp,
               shape=shape)


def _open_run_dir(cfg: FedLoraConfig, run_dir: Path, resume: bool) -> tuple[int, dict, dict] | None:
    """The checkpoint to resume from (None for a new run, whose config is saved here); raises
    :class:`FederationError` when the directory does not fit the request."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = report.load_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FederationError(f"{run_dir} has no checkpoint to resume from (checkpoints/latest.json)")
    if not resume:
        if report.read_rounds(run_dir):
            raise FederationError(f"{run_dir} already holds rounds; use `fedlora resume {run_dir}` to continue it")
        save_yaml(cfg, run_dir / "config.yaml")
    return ckpt


def _connected_clients(cfg: FedLoraConfig, transport: Transport) -> list[int]:
    available = sorted(transport.clients())
    if len(available) < cfg.federation.min_clients:
        raise FederationError(
            f"only {len(available)} client(s) connected, federation.min_clients={cfg.federation.min_clients}"
        )
    return available


def _privacy(resolved: RunSettings, expected: dict, ckpt) -> tuple[SecureSettings | None, FederatedDP | None]:
    """The run's secure-aggregation settings and DP accountant (resumed from ``ckpt``), each None when off."""
    secure = resolved.secure_settings(expected)
    p = resolved.config.privacy
    dp = (FederatedDP(p.noise_multiplier, p.clip_norm, p.delta, weight=resolved.max_examples)
          if resolved.privacy == "secagg_dp" else None)
    if dp is not None and ckpt is not None:
        dp.load_state(_section(ckpt[1], "dp/"))
    return secure, dp


def _section(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The checkpoint arrays under ``prefix`` (``adapter/``, ``strategy/``, ``cells/``, ``dp/``), prefix removed."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def locate_devices(run: Run, server_round: int, locator: DeviceLocator) -> dict[int, str]:
    """The round's placement from the edges' reports (:func:`~fedlora.world.attachments.place_devices`)."""
    placed = place_devices(run.tree, run.cell_of, locator.reports(server_round))
    for client, (before, now) in sorted(placed.moved.items()):
        run.progress.note(f"round {server_round}: client {client} moved from {before} to {now} (its edge reports it)")
    for client, cells in sorted(placed.several.items()):
        log.warning("round %d: client %d is reported by the edges of %s; placed in %s", server_round, client,
                    ", ".join(cells), placed.cell_of[client])
    return placed.cell_of


# -- 1. sample participants ---------------------------------------------------------------------------------------


@dataclass
class Participants:
    """Who takes part in one round."""

    selected: list[int]  # sampled (and topped up per neighbourhood under secure aggregation), in id order
    off: dict[int, str]  # selected clients whose device is off this round -> why; they receive nothing
    training: list[int]  # selected and on: sent the round's adapter


def sample_participants(run: Run, server_round: int) -> Participants:
    """The round's clients: a seeded sample (same on resume), topped up under secure aggregation, less those off."""
    cfg = run.cfg
    selected = sample_clients(run.available, cfg.federation, cfg.seed, server_round)
    if run.secure is not None:
        selected = top_up_cells(selected, run.available, run.tree, run.cell_of, cfg.privacy.min_cell_clients, cfg.seed,
                                server_round)
    off = unavailable(run.tree, selected, server_round, cfg.seed)
    return Participants(selected, off, [c for c in selected if c not in off])


def sample_clients(available: list[int], fed: FederationConfig, seed: int, server_round: int) -> list[int]:
    """The clients asked to train in a round: a seeded sample, same on resume."""
    k = min(len(available), max(fed.min_clients, math.ceil(fed.fraction * len(available))))
    rng = np.random.default_rng(round_seed(seed, "sample", server_round))
    return sorted(int(c) for c in rng.choice(sorted(available), size=k, replace=False))


def top_up_cells(selected: list[int], available: list[int], tree, cell_of, minimum: int, seed: int,
                 server_round: int) -> list[int]:
    """Secure mode: every neighbourhood with a sampled client gets at least ``minimum`` sampled
    clients (as many as it has), drawn by seed, so a cell can lose some and stay at or above t."""
    if tree.kind == "flat":
        cell_of = {c: CLOUD for c in available}
    hood = {c: CLOUD if tree.kind == "flat" else tree.neighbourhood_of(cell_of[c]) for c in available}
    chosen = set(selected)
    rng = np.random.default_rng(round_seed(seed, "secagg-top-up", server_round))
    for cell in sorted({hood[c] for c in selected}):
        members = sorted(c for c in available if hood[c] == cell)
        missing = min(minimum, len(members)) - sum(1 for c in members if c in chosen)
        if missing > 0:
            extra = [c for c in members if c not in chosen]
            chosen.update(int(c) for c in rng.choice(extra, size=missing, replace=False))
    return sorted(chosen)


# -- 2. dispatch to the cells -------------------------------------------------------------------------------------


@dataclass
class CellReplies:
    """What the round's cells handed back."""

    results: list[CellResult]  # one per request, in cell order
    secure_round: SecureRound | None  # the round's secure session (None: plain sums)
    refused: dict[str, tuple[list[int], str]]  # cell -> (its clients, why it cannot run a secure session)
    split_plan: dict[int, SplitChoice] = field(default_factory=dict)  # client -> how it trains (train.mode split|auto)
    hosted: dict[int, tuple[str, str]] = field(default_factory=dict)  # lone client -> (its cell, the host cell)


def dispatch(run: Run, server_round: int, who: Participants, sent: AdapterState, sync: bool) -> CellReplies:
    """Send every neighbourhood cell with a training client its request and run the cells (``runner.run``)."""
    settings = run.resolved.round_settings(server_round, run.client_settings)
    groups = _cell_groups(who.training, run.cell_of, run.cells, sent, run.trainable, run.hierfavg)
    groups, hosted, lone_note = _host_lone_devices(run, groups)
    sr, keys = _secure_round(run, server_round, groups) if run.secure is not None else (None, None)
    plan = plan_round(run.tree, run.cell_of, who.training, run.shape, run.cfg.train) if run.shape is not None else {}
    requests, refused = [], {}
    for cell, group, start in groups:
        data = sr.cell(cell, group, start) if sr is not None else None
        if isinstance(data, str):
            refused[cell] = (group, data + lone_note)
            continue
        cuts = {c: (plan[c].cut.k, plan[c].cut.m) for c in group if c in plan and plan[c].cut is not None}
        requests.append(CellRequest(run.run_id, server_round, cell, group, start, settings, run.expected, data, cuts))
    late = _deadline_verdict(run, server_round, sent, sync)
    results = run.runner.run(requests, late=late, on_reply=_reply_reporter(run), keys=keys)
    for client, (own, host) in sorted(hosted.items()):
        run.progress.note(f"round {server_round}: client {client} is alone in {own}: it joins {host}'s secure session")
    return CellReplies(results, sr, refused, plan, hosted)


def _host_lone_devices(run: Run, groups):
    """Secure mode: the groups with each device alone in its cell merged into another cell's session
    (``privacy.lone_devices=merge``, where the runner can), the merged clients, and what a refusal adds."""
    if run.secure is None or run.cfg.privacy.lone_devices != "merge":
        return groups, {}, ""
    if not getattr(run.runner, "hosts_lone_devices", False):
        return groups, {}, ("; edge processes cannot merge a lone device into another cell's session yet, each reaches "
                            "only its own devices (privacy.lone_devices=merge works in simulation and on a single server)")
    merged, hosted = host_lone_devices(groups, run.tree)
    return merged, hosted, "; no other neighbourhood cell trains this round to host it"


def _cell_groups(clients, cell_of, cells: CellModels, sent: AdapterState, trainable: list[str], hierfavg: bool):
    """(neighbourhood cell, its clients, the adapter they start from) for every cell with a
    client this round: the global adapter (one shared object), or under HierFAVG the
    neighbourhood's cell model. Flat: one cell, the cloud."""
    groups: dict[str, list[int]] = {}
    tree = cells.tree
    for c in sorted(clients):
        cell = CLOUD if tree.kind == "flat" else tree.neighbourhood_of(cell_of[c])
        groups.setdefault(cell, []).append(c)
    out = []
    for cell, group in sorted(groups.items()):
        start = sent
        if hierfavg:
            model = cells.start_from(cell, sent)
            start = sent if model is sent else {k: model[k] for k in trainable}
        out.append((cell, group, start))
    return out


def _secure_round(run: Run, server_round: int, groups) -> tuple[SecureRound, AggregatorKeys]:
    """The cloud's side of this round's secure session over the cells in ``groups``, and the keys it aggregates with."""
    sr = SecureRound(identities=run.identities, run_id=run.run_id, server_round=server_round, clients=run.available,
                     cells_above={cell: run.tree.cells[cell].parent or CLOUD for cell, _, _ in groups},
                     settings=run.secure, layout=secure_layout(run.expected),
                     # packing's ring: HierFAVG unmasks each cell alone, else one sum holds every training client
                     sum_clients=0 if run.hierfavg else sum(len(group) for _, group, _ in groups))
    return sr, AggregatorKeys.of(run.identities, cloud=True)


def _deadline_verdict(run: Run, server_round: int, sent: AdapterState, sync: bool) -> LateCallback:
    """The network model's deadline verdict on one cell's usable replies: client -> why it is late."""
    tree, cell_of, seed = run.tree, run.cell_of, run.cfg.seed

    def late(usable: dict[int, ClientReply]) -> dict[int, str]:
        net = simulate_round(tree, cell_of, server_round, selected=list(usable),
                             train_s={c: float(r.metrics.get("train_seconds", 0.0)) for c, r in usable.items()},
                             adapter_bytes=adapters.nbytes(sent), up_bytes={c: r.bytes_up for c, r in usable.items()},
                             seed=seed, cloud_sync=sync,
                             split=_split_traffic(run, usable, lambda r: split_status(r.metrics)) or None)
        return {c: why for c, why in net.stragglers.items() if c in usable}

    return late


def _split_traffic(run: Run, replies: Mapping[int, Any], split_of: Callable[[Any], Mapping | None]
                   ) -> dict[int, SplitTraffic]:
    """The split clients' exchanges with their edges, from their split records (:func:`split_status`)."""
    out = {}
    for c, r in replies.items():
        m = split_of(r)
        if m:
            out[c] = SplitTraffic(int(m["exchanges"]), int(m["bytes_up"]), int(m["bytes_down"]), float(m["edge_seconds"]),
                                  run.cfg.train.split.edge_speed)
    return out


def _reply_reporter(run: Run) -> ReplyCallback:
    """Tells the progress display about each client's reply as it arrives."""

    def on_reply(reply: ClientReply) -> None:
        if isinstance(reply.update, bytes) or (run.secure is not None and reply.error):  # a secure stage reply
            done_s = f"trained in {reply.metrics.get('train_seconds', 0):.1f}s, keys advertised"
            run.progress.client_done(reply.client, reply.error is None, reply.error or done_s)
            return
        whole = reply if reply.edge_update is None else ClientReply(reply.client, {**reply.update, **reply.edge_update},
                                                                    reply.metrics)  # a split client's two halves
        reason = reject_reason(whole, run.expected)
        detail = reason or (f"loss {reply.metrics.get('train_loss', float('nan')):.4f} "
                            f"in {reply.metrics.get('train_seconds', 0):.1f}s")
        run.progress.client_done(reply.client, reason is None, detail)

    return on_reply


# -- 3. aggregate up the tree -------------------------------------------------------------------------------------


@dataclass
class RoundSums:
    """The round's updates summed up the tree, and what became of each client's."""

    statuses: dict[int, ClientStatus]  # every client a cell answered for, by cell
    metric_sums: dict[str, float]  # num_examples and (example-weighted) train_loss summed over the cells
    secure_record: dict | None  # the round record's ``secure`` field (None: plain sums)
    total: WeightedSum | None  # the cloud's sum (None: a HierFAVG round without a cloud sync)


def aggregate_up(run: Run, server_round: int, replies: CellReplies, sync: bool) -> RoundSums:
    """Unmask the cells' sums (secure aggregation) or take them as they are, then sum them up to the cloud."""
    secure_record = None
    results = replies.results
    if replies.secure_round is not None:
        results, cell_sums, metric_sums, secure_record = _unmask_round(replies.secure_round, results, replies.refused,
                                                                       run.hierfavg, run.dp)
        if replies.hosted:  # only when a device was alone: a round without one keeps its record as it was
            secure_record["hosted"] = {str(c): {"cell": own, "session": host}
                                       for c, (own, host) in sorted(replies.hosted.items())}
    else:
        cell_sums = {res.cell: _with_edge(res) for res in results if res.plain is not None}
        metric_sums = {k: sum(res.metrics.get(k, 0.0) for res in results) for k in ("num_examples", "train_loss")}
    statuses = {c: st for res in results for c, st in res.clients.items()}
    for c, st in sorted(statuses.items()):
        if st.status not in (ACCEPTED, LATE):
            log.warning("round %d: dropped client %d: %s", server_round, c, st.reason)
    if run.hierfavg:
        run.cells.absorb(TreeSums(cells=cell_sums), run.global_state)
        total = run.cells.sync(run.global_state) if sync else None
    else:
        total = merge_up(run.tree, cell_sums).cloud
    return RoundSums(statuses, metric_sums, secure_record, total)


def _with_edge(res: CellResult) -> WeightedSum:
    """A cell's sum with its edge's part of its split clients' updates (the blocks the edge trained)."""
    if res.edge is None:
        return res.plain  # type: ignore[return-value]
    total = WeightedSum()
    total.merge(res.plain)  # type: ignore[arg-type]
    total.merge(res.edge)
    return total


def _unmask_round(sr: SecureRound, results: list[CellResult], refused: dict, per_cell: bool, dp: FederatedDP | None = None):
    """The cloud's part of a secure round: unmask, decode (adding the DP noise once to each
    released sum under ``secagg_dp``), and say per cell what happened.

    -> (results with clients of aborted cells marked dropped, {cell or cloud: WeightedSum},
    metric sums, the round record's ``secure`` field)."""
    sums, aborted = sr.unmask({res.cell: res.secure for res in results}, per_cell=per_cell)
    record_cells = {}
    for res in results:
        why = aborted.get(res.cell)
        if why is not None:
            for st in res.clients.values():
                if st.status == ACCEPTED:
                    st.status, st.reason = DROPPED, f"{CELL_ABORTED}: {why}"
        record_cells[res.cell] = {"ok": why is None, "reason": why, "survivors": res.accepted,
                                  "dropped": {k: sorted(v) for k, v in res.secure.dropped.items()}}
    for cell, (group, why) in refused.items():
        results.append(CellResult(cell, {c: ClientStatus(c, DROPPED, f"{CELL_REFUSED}: {why}") for c in group}))
        record_cells[cell] = {"ok": False, "reason": why, "survivors": [], "dropped": {}}
    cell_sums, metric_sums, bound = {}, {"num_examples": 0.0, "train_loss": 0.0}, 0.0
    for key, decoded in sums.items():
        total = {k: v for k, v in decoded.total.items() if k != LOSS_KEY}
        if dp is not None:
            total = dp.noisy(total)
        cell_sums[key] = WeightedSum(total=total, weight=float(decoded.examples), count=decoded.clients)
        metric_sums["num_examples"] += float(decoded.examples)
        metric_sums["train_loss"] += float(decoded.total[LOSS_KEY][0])
        bound = max([bound] + [decoded.mean_error_bound(k) for k in total])
    record = {"cells": dict(sorted(record_cells.items())), "clients_in_sum": sum(s.count for s in cell_sums.values()),
              "decode_error_bound": bound, "unmasker": sr.settings.unmasker}
    return results, cell_sums, metric_sums, record


# -- 4. apply the strategy, 5. evaluate ---------------------------------------------------------------------------


def apply_strategy(run: Run, server_round: int, total: WeightedSum | None) -> bool:
    """Move the global adapter by the mean update when at least ``federation.min_clients`` are behind it;
    -> whether it moved."""
    aggregated = total is not None and total.count >= run.cfg.federation.min_clients
    if aggregated:
        run.global_state = run.strategy.apply(run.global_state, total.mean())
    elif total is not None:
        log.warning(
            "round %d: only %d usable update(s), federation.min_clients=%d: global adapter unchanged",
            server_round, total.count, run.cfg.federation.min_clients,
        )
    return aggregated


def evaluate_global(run: Run) -> tuple[float, float]:
    """-> (held-out loss of the global adapter, seconds it took)."""
    t_eval = time.perf_counter()
    loss = run.held_out.loss(run.global_state)
    return loss, time.perf_counter() - t_eval


# -- 6. record and checkpoint -------------------------------------------------------------------------------------


def round_network(run: Run, server_round: int, who: Participants, up: RoundSums, sent: AdapterState,
                  sync: bool) -> RoundNetwork:
    """The network model's bytes and times of the round, over every client whose training time is known."""
    secure = run.secure is not None
    usable = {c: st for c, st in up.statuses.items()
              if st.status in (ACCEPTED, LATE) or st.train_seconds is not None and secure}
    return simulate_round(
        run.tree, run.cell_of, server_round, selected=who.selected,
        train_s={c: float(st.train_seconds or 0.0) for c, st in usable.items()},
        adapter_bytes=adapters.nbytes(sent), up_bytes={c: st.bytes_up for c, st in usable.items()},
        aggregate_bytes=4 * secure_layout(run.expected).size if secure else None,
        seed=run.cfg.seed, cloud_sync=sync, split=_split_traffic(run, usable, lambda st: st.split) or None,
    )


def round_record(run: Run, server_round: int, who: Participants, up: RoundSums, net: RoundNetwork, *, aggregated: bool,
                 sync: bool, eval_loss: float, eval_s: float, wall_s: float,
                 plan: Mapping[int, SplitChoice] | None = None) -> dict:
    """The round's line in ``rounds.jsonl`` (accounts the round's DP release under ``secagg_dp``)."""
    statuses, metric_sums = up.statuses, up.metric_sums
    dropped = [{"client": c, "reason": why} for c, why in who.off.items()]
    dropped += [{"client": c, "reason": st.reason} for c, st in statuses.items() if st.status != ACCEPTED]
    participants = sorted(c for c, st in sorted(statuses.items()) if st.status == ACCEPTED)
    outside = left_out(statuses)
    dp = run.dp
    return {
        "round": server_round,
        "train_loss": metric_sums["train_loss"] / metric_sums["num_examples"] if participants and dp is None else None,
        "eval_loss": eval_loss,
        "participants": participants,
        "dropped": sorted(dropped, key=lambda d: d["client"]),
        "aggregated": aggregated,
        "cloud_sync": sync,
        "num_examples": metric_sums["num_examples"],
        "cell_of": {str(c): run.cell_of[c] for c in participants},
        **({"left_out": outside} if outside else {}),  # present only when a device was left out (aim: never)
        **({"secure": up.secure_record} if up.secure_record is not None else {}),
        **({"dp": _dp_record(dp, len(who.selected) / len(run.available))} if dp is not None else {}),
        **net.record(),
        **({"split": _split_record(run, up, net, plan)} if plan else {}),
        "client_train_s": {str(c): st.train_seconds for c, st in sorted(statuses.items()) if st.train_seconds is not None},
        "eval_s": eval_s,
        "wall_s": wall_s,
    }


def _split_record(run: Run, up: RoundSums, net: RoundNetwork, plan: Mapping[int, SplitChoice]) -> dict:
    """The round record's ``split`` field: who trained split at which cut with which edge, what crossed."""
    clients = {}
    hosted = (up.secure_record or {}).get("hosted", {})  # a lone device trains with its host cell's edge
    for c, choice in sorted(plan.items()):
        entry = choice.record()
        if choice.cut is not None:
            entry["edge"] = hosted[str(c)]["session"] if str(c) in hosted else run.tree.neighbourhood_of(run.cell_of[c])
            st = up.statuses.get(c)
            if st is not None and st.split is not None:
                entry.update({k: st.split[k] for k in ("exchanges", "steps", "bytes_up", "bytes_down", "edge_seconds")})
            if c in net.split_s:
                entry["sim_split_s"] = net.split_s[c]
        clients[str(c)] = entry
    return {"mode": run.cfg.train.mode, "note": SPLIT_NOTE, "clients": clients,
            "split_clients": sorted(c for c, ch in plan.items() if ch.cut is not None),
            "activation_bytes": {"up": dict(net.activation_up), "down": dict(net.activation_down)}}


def _dp_record(dp: FederatedDP, sample_rate: float) -> dict:
    """Account this round's release and say what was spent (client-level DP)."""
    epsilon = dp.account(sample_rate)
    return {"epsilon": epsilon if math.isfinite(epsilon) else None, "delta": dp.delta, "sample_rate": sample_rate,
            "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm, "rounds_accounted": dp.rounds}


def save_round(run: Run, server_round: int, record: dict) -> None:
    """Append the round's record, checkpoint everything a resume needs, report the round."""
    report.append_round(run.run_dir, record)
    _checkpoint(run.run_dir, server_round, run.global_state, run.strategy, run.base_loss, run.wall_s(), run.cells, run.dp)
    run.progress.end_round(record)


def _checkpoint(run_dir: Path, server_round: int, state: AdapterState, strategy, base_loss: float, wall_s: float,
                cells: CellModels | None = None, dp: FederatedDP | None = None) -> None:
    arrays = {f"adapter/{k}": v for k, v in state.items()}
    if dp is not None:
        arrays.update({f"dp/{k}": v for k, v in dp.state().items()})
    arrays.update({f"strategy/{k}": v for k, v in strategy.state().items()})
    if cells is not None:
        arrays.update({f"cells/{k}": v for k, v in cells.state().items()})
    report.save_checkpoint(run_dir, server_round, arrays, {"base_eval_loss": base_loss, "wall_s": wall_s})


def pause_between_rounds(run: Run, server_round: int) -> None:
    """Wait ``federation.round_pause_s`` before the next round (none after the last)."""
    fed = run.cfg.federation
    if fed.round_pause_s > 0 and server_round < fed.rounds:
        run.progress.note(f"next round in {fed.round_pause_s:.0f}s (federation.round_pause_s)")
        time.sleep(fed.round_pause_s)


# -- the finish -----------------------------------------------------------------------------------------------------


def finish_run(run: Run, sent: AdapterState) -> dict:
    """Export the global adapter (PEFT format), plot the rounds, write and return the summary."""
    cfg, run_dir, base_loss = run.cfg, run.run_dir, run.base_loss
    adapters.export_peft(run.held_out.model, run.global_state, run_dir / "adapter", resolve_model_dir(cfg.model))
    personal = None
    if run.strategy.personal != NONE:  # each client's own held-out loss: global vs personal (vs local-only)
        personal = personal_report(run.cfg, run.held_out.model, run.held_out.tokenizer, run.global_state,
                                   run.strategy.personal, run_dir / PERSONAL_DIR)
    model = run.held_out.model
    adapters.set_state(model, run.global_state)
    accuracy = run_advice_accuracy(cfg, model, run.held_out.tokenizer)
    report.plot(run_dir, base_loss, tree=run.tree)
    summary = report.summarise(
        run_dir,
        base_loss,
        run.wall_s(),
        extra={
            "strategy": cfg.strategy.name,
            "adapter_parameters_sent": adapters.num_parameters(sent),
            "adapter_bytes_per_client": adapters.nbytes(sent),
            **({"personal": personal} if personal is not None else {}),
            **({"advice_accuracy": accuracy} if accuracy is not None else {}),
        },
    )
    if accuracy is not None:
        run.progress.note(advice_line(accuracy))
    run.progress.note(
        f"done: held-out loss {base_loss:.4f} -> {summary['final_eval_loss']:.4f} "
        f"(perplexity {summary['base_perplexity']:.2f} -> {summary['final_perplexity']:.2f}); adapter in {run_dir / 'adapter'}"
    )
    run.progress.note(f"sampled devices left out other than by dropping out: {summary['left_out_total']} of "
                      f"{summary['sampled_total']} sampled")
    return summary
