"""The server's round loop, independent of how messages travel.

One round: sample clients, send them the global adapter, collect their deltas, drop
any reply that is an error or malformed (wrong tensors, shapes, dtype, NaN/inf, bad
example count) and go on with the rest, aggregate, evaluate the new global adapter on
held-out data, write the round's record and a checkpoint. A :class:`Transport` delivers
messages: Flower's Grid in ``server/app.py``, or :class:`InProcessTransport` for tests.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from fedlora import adapters
from fedlora.runs import report
from fedlora.adapters import AdapterState
from fedlora.aggregate.strategies import make_strategy
from fedlora.roles.neighbourhood import (AggregatorKeys, CellRequest, CellResult, ClientReply, LateCallback, ReplyCallback, Transport,
                          reject_reason, run_cells)
from fedlora.config import FederationConfig, FedLoraConfig, max_examples, privacy_mode, save_yaml, secure_modes
from fedlora.data import eval_examples, tokenize
from fedlora.aggregate.dp import FederatedDP
from fedlora.roles.device import initial_adapter, lora_model, round_settings, secure_step, train_round
from fedlora.world.mobility import assignment_at, next_assignment
from fedlora.model import resolve_model_dir
from fedlora.world.netsim import simulate_round, unavailable
from fedlora.world.topology import CLOUD, build_tree
from fedlora.roles.hierfavg import CellModels
from fedlora.roles.local import LocalCellRunner
from fedlora.roles.suburban import TreeSums, merge_up
from fedlora.runs.progress import Progress
from fedlora.seeds import round_seed
from fedlora.secure.encoding import EncodingConfig
from fedlora.secure.identities import Identities, SimulatedIdentities
from fedlora.secure.rounds import (ACCEPTED, CELL_ABORTED, CELL_REFUSED, DROPPED, LATE, LOSS_KEY, SecureRound, SecureSettings,
                                   secure_layout)
from fedlora.train import evaluate

log = logging.getLogger("fedlora")

class FederationError(RuntimeError):
    """The run cannot go on (not enough clients, inconsistent run directory)."""


class CellRunner(Protocol):
    """Runs the round's neighbourhood cells and returns their results, one per request, in order.

    :class:`LocalCellRunner` runs them in this process; a deployment sends each request to
    the cell's edge-aggregator process, which calls :func:`fedlora.roles.neighbourhood.run_cell` there.
    ``late`` and ``on_reply`` are hints a remote runner may apply on its side or ignore.
    """

    def run(self, requests: list[CellRequest], *, late: LateCallback | None = None,
            on_reply: ReplyCallback | None = None, keys: AggregatorKeys | None = None) -> list[CellResult]: ...


def sample_clients(available: list[int], fed: FederationConfig, seed: int, server_round: int) -> list[int]:
    """The clients asked to train in a round: a seeded sample, same on resume."""
    k = min(len(available), max(fed.min_clients, math.ceil(fed.fraction * len(available))))
    rng = np.random.default_rng(round_seed(seed, "sample", server_round))
    return sorted(int(c) for c in rng.choice(sorted(available), size=k, replace=False))


def run_federation(
    cfg: FedLoraConfig,
    run_dir: str | Path,
    transport: Transport,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    runner: CellRunner | None = None,
    identities: Identities | None = None,
) -> dict:
    """Run (or resume) the configured rounds; fill ``run_dir``; return the summary.

    ``transport`` names the clients that can train; ``runner`` runs each round's cells
    (default: :class:`LocalCellRunner` over ``transport``, in this process);
    ``identities``: the secure rounds' keys (default: derived from the seed, simulation only;
    a deployed cloud passes the plan's, :class:`~fedlora.secure.identities.PlannedIdentities`).
    """
    run_dir = Path(run_dir)
    runner = runner or LocalCellRunner(transport)
    identities = identities or SimulatedIdentities(cfg.seed)
    run_id = run_dir.resolve().name
    progress = progress or Progress()
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = report.load_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise FederationError(f"{run_dir} has no checkpoint to resume from (checkpoints/latest.json)")
    if not resume:
        if report.read_rounds(run_dir):
            raise FederationError(f"{run_dir} already holds rounds; use `fedlora resume {run_dir}` to continue it")
        save_yaml(cfg, run_dir / "config.yaml")

    strategy = make_strategy(cfg.strategy)
    client_settings = strategy.client_settings()
    model, tokenizer = lora_model(cfg, freeze_a=bool(client_settings["freeze_a"]))
    global_state = initial_adapter(cfg, freeze_a=bool(client_settings["freeze_a"]))
    trainable = list(adapters.get_state(model, trainable_only=True))
    expected = {k: global_state[k].shape for k in trainable}
    held_out = tokenize(eval_examples(cfg.data, cfg.federation.num_clients, cfg.seed), tokenizer, cfg.train.max_seq_len)

    def eval_loss(state: AdapterState) -> float:
        adapters.set_state(model, state)
        return evaluate(model, held_out, cfg.train.eval_batch_size, pad_id=tokenizer.pad_token_id)[0]

    if ckpt is not None:
        done, arrays, meta = ckpt
        global_state = {k[len("adapter/"):]: v for k, v in arrays.items() if k.startswith("adapter/")}
        strategy.load_state({k[len("strategy/"):]: v for k, v in arrays.items() if k.startswith("strategy/")})
        base_loss, wall_before = meta["base_eval_loss"], meta["wall_s"]
        report.truncate_rounds(run_dir, done)
        progress.note(f"resuming {run_dir} after round {done}")
    else:
        done, wall_before = 0, 0.0
        base_loss = eval_loss(global_state)
        progress.note(f"held-out loss of the base model: {base_loss:.4f} ({len(held_out)} examples)")
        _checkpoint(run_dir, 0, global_state, strategy, base_loss, 0.0)

    available = sorted(transport.clients())
    if len(available) < cfg.federation.min_clients:
        raise FederationError(
            f"only {len(available)} client(s) connected, federation.min_clients={cfg.federation.min_clients}"
        )
    tree = build_tree(cfg.topology, cfg.federation.num_clients, cfg.seed)
    hierfavg = tree.kind != "flat" and tree.cloud_sync_every > 1
    cells = CellModels(tree)
    if ckpt is not None:
        cells.load_state({k[len("cells/"):]: v for k, v in ckpt[1].items() if k.startswith("cells/")})
    cell_of = assignment_at(tree, done + 1, cfg.seed)
    sent = {k: global_state[k] for k in trainable}
    secure = _secure_settings(cfg, expected) if privacy_mode(cfg) in secure_modes() else None
    p = cfg.privacy
    dp = FederatedDP(p.noise_multiplier, p.clip_norm, p.delta, weight=max_examples(cfg)) if privacy_mode(cfg) == "secagg_dp" else None
    if dp is not None and ckpt is not None:
        dp.load_state({k[len("dp/"):]: v for k, v in ckpt[1].items() if k.startswith("dp/")})
    progress.start(cfg.federation.rounds, done + 1)
    for server_round in range(done + 1, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        if server_round > done + 1:
            cell_of = next_assignment(tree, cell_of, server_round, cfg.seed)  # handovers between rounds
        selected = sample_clients(available, cfg.federation, cfg.seed, server_round)
        if secure is not None:
            selected = top_up_cells(selected, available, tree, cell_of, cfg.privacy.min_cell_clients, cfg.seed, server_round)
        off = unavailable(tree, selected, server_round, cfg.seed)
        training = [c for c in selected if c not in off]
        progress.start_round(server_round, training)
        sent = {k: global_state[k] for k in trainable}

        def on_reply(reply: ClientReply) -> None:
            if isinstance(reply.update, bytes) or (secure is not None and reply.error):  # a secure stage reply
                done_s = f"trained in {reply.metrics.get('train_seconds', 0):.1f}s, keys advertised"
                progress.client_done(reply.client, reply.error is None, reply.error or done_s)
                return
            reason = reject_reason(reply, expected)
            detail = reason or f"loss {reply.metrics.get('train_loss', float('nan')):.4f} in {reply.metrics.get('train_seconds', 0):.1f}s"
            progress.client_done(reply.client, reason is None, detail)

        settings = round_settings(cfg, server_round, client_settings)
        sync = not hierfavg or tree.syncs_with_cloud(server_round) or server_round == cfg.federation.rounds

        def late(usable: dict[int, ClientReply], server_round=server_round, cell_of=cell_of, sync=sync, sent=sent):
            """The network model's deadline verdict on one cell's usable replies."""
            net = simulate_round(tree, cell_of, server_round, selected=list(usable),
                                 train_s={c: float(r.metrics.get("train_seconds", 0.0)) for c, r in usable.items()},
                                 adapter_bytes=adapters.nbytes(sent), up_bytes={c: r.bytes_up for c, r in usable.items()},
                                 seed=cfg.seed, cloud_sync=sync)
            return {c: why for c, why in net.stragglers.items() if c in usable}

        groups = _cell_groups(training, cell_of, cells, sent, trainable, hierfavg)
        sr, refused, keys = None, {}, None
        if secure is not None:
            sr = SecureRound(identities=identities, run_id=run_id, server_round=server_round, clients=available,
                             cells_above={cell: tree.cells[cell].parent or CLOUD for cell, _, _ in groups},
                             settings=secure, layout=secure_layout(expected))
            keys = AggregatorKeys.of(identities, cloud=True)
        requests = []
        for cell, group, start in groups:
            data = sr.cell(cell, group, start) if sr is not None else None
            if isinstance(data, str):
                refused[cell] = (group, data)
                continue
            requests.append(CellRequest(run_id, server_round, cell, group, start, settings, expected, data))
        results = runner.run(requests, late=late, on_reply=on_reply, keys=keys)
        secure_record = None
        if sr is not None:
            results, cell_sums, metric_sums, secure_record = _unmask_round(sr, results, refused, hierfavg, dp)
        else:
            cell_sums = {res.cell: res.plain for res in results if res.plain is not None}
            metric_sums = {k: sum(res.metrics.get(k, 0.0) for res in results) for k in ("num_examples", "train_loss")}
        dropped = [{"client": c, "reason": why} for c, why in off.items()]
        statuses = {c: st for res in results for c, st in res.clients.items()}
        dropped += [{"client": c, "reason": st.reason} for c, st in statuses.items() if st.status != ACCEPTED]
        for c, st in sorted(statuses.items()):
            if st.status not in (ACCEPTED, LATE):
                log.warning("round %d: dropped client %d: %s", server_round, c, st.reason)
        usable = {c: st for c, st in statuses.items() if st.status in (ACCEPTED, LATE) or st.train_seconds is not None and sr is not None}
        net = simulate_round(
            tree, cell_of, server_round, selected=selected,
            train_s={c: float(st.train_seconds or 0.0) for c, st in usable.items()},
            adapter_bytes=adapters.nbytes(sent), up_bytes={c: st.bytes_up for c, st in usable.items()},
            aggregate_bytes=4 * secure_layout(expected).size if sr is not None else None,
            seed=cfg.seed, cloud_sync=sync,
        )
        kept = [c for c, st in sorted(statuses.items()) if st.status == ACCEPTED]
        if hierfavg:
            cells.absorb(TreeSums(cells=cell_sums), global_state)
            total = cells.sync(global_state) if sync else None
        else:
            total = merge_up(tree, cell_sums).cloud
        aggregated = total is not None and total.count >= cfg.federation.min_clients
        if aggregated:
            global_state = strategy.apply(global_state, total.mean())
        elif total is not None:
            log.warning(
                "round %d: only %d usable update(s), federation.min_clients=%d: global adapter unchanged",
                server_round, total.count, cfg.federation.min_clients,
            )
        participants = sorted(kept)
        t_eval = time.perf_counter()
        round_eval_loss = eval_loss(global_state)
        eval_s = time.perf_counter() - t_eval
        record = {
            "round": server_round,
            "train_loss": metric_sums["train_loss"] / metric_sums["num_examples"] if kept and dp is None else None,
            "eval_loss": round_eval_loss,
            "participants": participants,
            "dropped": sorted(dropped, key=lambda d: d["client"]),
            "aggregated": aggregated,
            "cloud_sync": sync,
            "num_examples": metric_sums["num_examples"],
            "cell_of": {str(c): cell_of[c] for c in participants},
            **({"secure": secure_record} if secure_record is not None else {}),
            **({"dp": _dp_record(dp, len(selected) / len(available))} if dp is not None else {}),
            **net.record(),
            "client_train_s": {str(c): st.train_seconds for c, st in sorted(statuses.items()) if st.train_seconds is not None},
            "eval_s": eval_s,
            "wall_s": time.perf_counter() - t0,
        }
        report.append_round(run_dir, record)
        _checkpoint(run_dir, server_round, global_state, strategy, base_loss, wall_before + time.perf_counter() - started, cells,
                    dp)
        progress.end_round(record)
        if cfg.federation.round_pause_s > 0 and server_round < cfg.federation.rounds:
            progress.note(f"next round in {cfg.federation.round_pause_s:.0f}s (federation.round_pause_s)")
            time.sleep(cfg.federation.round_pause_s)

    adapters.export_peft(model, global_state, run_dir / "adapter", resolve_model_dir(cfg.model))
    report.plot(run_dir, base_loss, tree=tree)
    wall = wall_before + time.perf_counter() - started
    summary = report.summarise(
        run_dir,
        base_loss,
        wall,
        extra={
            "strategy": cfg.strategy.name,
            "adapter_parameters_sent": adapters.num_parameters(sent),
            "adapter_bytes_per_client": adapters.nbytes(sent),
        },
    )
    progress.note(
        f"done: held-out loss {base_loss:.4f} -> {summary['final_eval_loss']:.4f} "
        f"(perplexity {summary['base_perplexity']:.2f} -> {summary['final_perplexity']:.2f}); adapter in {run_dir / 'adapter'}"
    )
    return summary


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


def _secure_settings(cfg: FedLoraConfig, expected: dict) -> SecureSettings:
    p = cfg.privacy
    clips = {name: v for name in expected for key, v in p.clip_per_tensor.items() if key in name}
    clips[LOSS_KEY] = p.loss_clip
    encoding = EncodingConfig(bits=p.bits, clip=p.clip, clip_per_tensor=clips,
                              max_examples=max_examples(cfg))
    return SecureSettings(encoding, p.threshold, p.unmasker, p.prg, p.complete_graph_up_to)


def _unmask_round(sr: SecureRound, results: list[CellResult], refused: dict, per_cell: bool, dp: FederatedDP | None = None):
    """The cloud's part of a secure round: unmask, decode (adding the DP noise once to each
    released sum under ``secagg_dp``), and say per cell what happened.

    -> (results with clients of aborted cells marked dropped, {cell or cloud: WeightedSum},
    metric sums, the round record's ``secure`` field)."""
    from fedlora.aggregate.sums import WeightedSum
    from fedlora.roles.neighbourhood import ClientStatus

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


def _dp_record(dp: FederatedDP, sample_rate: float) -> dict:
    """Account this round's release and say what was spent (client-level DP)."""
    epsilon = dp.account(sample_rate)
    return {"epsilon": epsilon if math.isfinite(epsilon) else None, "delta": dp.delta, "sample_rate": sample_rate,
            "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm, "rounds_accounted": dp.rounds}


def _checkpoint(run_dir: Path, server_round: int, state: AdapterState, strategy, base_loss: float, wall_s: float,
                cells: CellModels | None = None, dp: FederatedDP | None = None) -> None:
    arrays = {f"adapter/{k}": v for k, v in state.items()}
    if dp is not None:
        arrays.update({f"dp/{k}": v for k, v in dp.state().items()})
    arrays.update({f"strategy/{k}": v for k, v in strategy.state().items()})
    if cells is not None:
        arrays.update({f"cells/{k}": v for k, v in cells.state().items()})
    report.save_checkpoint(run_dir, server_round, arrays, {"base_eval_loss": base_loss, "wall_s": wall_s})
