"""The 6G cell hierarchy in numbers: backhaul bytes (flat vs tree) and simulated round time.

Two sub-commands; both drive fedlora's own network model (``fedlora.world.netsim.simulate_round``)
over the trees ``fedlora.world.topology.build_tree`` builds from ``conf/topology/*.yaml``, with the
same client sampling (``fedlora.roles.cloud.sample_clients``), availability draws and
mobility (``fedlora.world.mobility``) the round loop uses. Pure Python, no training; both hold
the benchmark lock (``roundtime`` records netsim's own wall time).

``backhaul`` -- bytes on the backhaul per round, hierarchical vs flat, same clients
-------------------------------------------------------------------------------
For N in (8, 40, 200, 1000) END clients and a fixed sampled fraction per round
(``--fraction``, default 0.25), the same seed, profiles, selection and availability:

* flat (``topology=flat``): every update crosses ``end->cloud``: backhaul upload = one
  adapter per surviving client;
* tree (``topology=small6g``: 2 sub-urban x 2 neighbourhood cells, and ``topology=city``:
  4 x 10 with vehicle femto cells, N >= 40): each sub-urban cell forwards ONE sum on
  ``suburban->cloud`` (and each neighbourhood one on ``neighbourhood->suburban``).

Bytes use the real SmolLM2-135M adapter (LoRA r=8 on q,v: 460,800 fp32 = 1,843,200 B,
``--adapter-bytes``), averaged over ``--rounds`` rounds. How to read the table: the tree's
backhaul in adapters equals the number of sub-urban cells with an update below them
(<= the number of sub-urban cells, whatever N is); the flat backhaul equals the number of
surviving clients; so ``ratio`` = flat / tree = surviving clients per sub-urban cell and
grows with N while the tree column stays flat. ``access`` (``end->neighbourhood``, or
``end->cloud`` when flat) carries the same bytes in both: the tree saves backhaul, not
radio.

With ``--confirm`` (default on) the same comparison also runs for real, in process
(``fedlora.roles.cloud.run_federation`` + ``InProcessTransport``, ``model=tiny``, same
seed and clients, default N=40, 2 rounds; under the benchmark lock so the little
training it does cannot skew someone else's timing): every round's ``bytes`` in ``rounds.jsonl`` must
equal what the netsim-only computation predicts for the tiny adapter's size, and its
``participants`` the predicted survivors; the flat/tree ratio of the real run is printed
beside the netsim-only one.

``roundtime`` -- simulated round time vs clients per cell, two device mixes
------------------------------------------------------------------------
Pure netsim over ``small6g`` and ``city`` with ``--per-cell`` (1, 2, 5, 10, 25, 50, 100)
clients per neighbourhood cell, all of them asked every round (fraction 1), for device
mixes ``rpi4`` (Raspberry-Pi only), ``laptop+car`` (half each) and ``configured`` (the
topology's own mix: 40% Pi, 40% phone, 10% car, 10% laptop). netsim's access link of a
cell is one shared medium (processor sharing: concurrent transfers split the cell's
capacity max-min fairly, each capped by its device's rate; see fedlora/world/netsim.py), so the
round slows down as a cell fills up. Each mix runs at ``--access-mbps`` (default: the
configured 1 Gbit/s 6G cell, and 100 Mbit/s, a congested or 4G-class cell) with no
deadline and with ``--deadlines`` (default 60 s); the same points with the access link
NOT shared (``shared: false``, the per-message model fedlora had before) are the flat
reference. Training time is a reference measured on this machine, ``--local-steps`` x
``--step-s`` (5 x 5.5 s), divided inside netsim by each profile's ``compute_speed``.
Columns: simulated round time (the slowest surviving path, mean over rounds), clients
that survived / were reached, and netsim's own wall time per round. The plot goes to
``bench/results/hierarchy_roundtime.png``: top, round time without a deadline (solid
shared, dotted per message); bottom, the share of reached clients aggregated under the
deadline.

Run:

    .venv/bin/python bench/hierarchy.py backhaul
    .venv/bin/python bench/hierarchy.py backhaul --fraction 0.1 --no-confirm
    .venv/bin/python bench/hierarchy.py roundtime
    .venv/bin/python bench/hierarchy.py roundtime --deadlines 60 120 --step-s 4.0
    .venv/bin/python bench/hierarchy.py roundtime --access-mbps 0 100 20 --per-cell 1 10 100

Results: ``bench/results/hierarchy_backhaul.json``, ``bench/results/hierarchy_roundtime.json``
(+ ``.png``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_LOCK, RESULTS, bench_lock, provenance, table, write_json  # noqa: E402

SMOLLM2_ADAPTER_BYTES = 1_843_200  # 460,800 fp32 LoRA parameters (r=8, q_proj + v_proj, 30 layers)
MB = 1e6
MIXES = {
    "rpi4": {"rpi4": 1.0},
    "laptop+car": {"laptop": 0.5, "car": 0.5},
    "configured": None,  # the topology's own profile_mix
}


# ----------------------------------------------------------------------------- shared


def compose_cfg(topology: str, num_clients: int, fraction: float, seed: int, extra: list[str] | None = None):
    from fedlora.config import compose

    return compose([
        "model=tiny",
        f"topology={topology}",
        f"federation.num_clients={num_clients}",
        f"federation.fraction={fraction}",
        f"federation.min_clients={min(2, num_clients)}",
        f"seed={seed}",
        "progress=false",
        *(extra or []),
    ])


def netsim_rounds(cfg, rounds: int, adapter_bytes: int, train_s: float | dict[int, dict[int, float]]) -> list[dict]:
    """What the round loop's network model says, round by round, without training.

    ``train_s``: reference training seconds, one constant for every client, or
    ``{round: {client: seconds}}`` (e.g. the measured ones of a real run).
    """
    from fedlora.roles.cloud import sample_clients
    from fedlora.run_settings import resolve_run
    from fedlora.world.mobility import assignment_at, next_assignment
    from fedlora.world.netsim import simulate_round, unavailable

    n = cfg.federation.num_clients
    tree = resolve_run(cfg).tree
    hierfavg = tree.kind != "flat" and tree.cloud_sync_every > 1
    cell_of = assignment_at(tree, 1, cfg.seed)
    available = list(range(n))
    out = []
    for r in range(1, rounds + 1):
        if r > 1:
            cell_of = next_assignment(tree, cell_of, r, cfg.seed)
        selected = sample_clients(available, cfg.federation, cfg.seed, r)
        off = unavailable(tree, selected, r, cfg.seed)
        training = [c for c in selected if c not in off]
        if isinstance(train_s, dict):
            times = {c: float(train_s[r][c]) for c in training if c in train_s[r]}
        else:
            times = {c: float(train_s) for c in training}
        sync = not hierfavg or tree.syncs_with_cloud(r) or r == rounds
        t0 = time.perf_counter()
        net = simulate_round(tree, cell_of, r, selected=selected, train_s=times, adapter_bytes=adapter_bytes,
                             seed=cfg.seed, cloud_sync=sync)
        netsim_s = time.perf_counter() - t0
        active = {tier: sorted({c for s in net.survivors for c in tree.chain(cell_of[s]) if tree.cells[c].tier == tier})
                  for tier in ("suburban", "neighbourhood", "femto")}
        out.append({
            "round": r,
            "selected": len(selected),
            "reached": len(training),
            "survivors": net.survivors,
            "stragglers": net.stragglers,
            "bytes_up": net.bytes_up,
            "bytes_down": net.bytes_down,
            "sim_network_s": net.sim_network_s,
            "path_s": net.path_s,
            "cell_of": cell_of,
            "active_cells": {t: len(v) for t, v in active.items()},
            "netsim_wall_s": netsim_s,
            "tree": tree,
        })
    return out


def tier_counts(cfg) -> dict[str, int]:
    t = cfg.topology
    if t.kind == "flat":
        return {"suburban": 0, "neighbourhood": 0, "femto": 0}
    nb = t.suburban_cells * t.neighbourhoods_per_suburban
    return {"suburban": t.suburban_cells, "neighbourhood": nb, "femto": nb * t.femto.per_neighbourhood}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- backhaul


def backhaul_point(n: int, tree_name: str, args) -> dict:
    flat_cfg = compose_cfg("flat", n, args.fraction, args.seed)
    tree_cfg = compose_cfg(tree_name, n, args.fraction, args.seed)
    flat = netsim_rounds(flat_cfg, args.rounds, args.adapter_bytes, args.train_s)
    tree = netsim_rounds(tree_cfg, args.rounds, args.adapter_bytes, args.train_s)
    same = all(f["survivors"] == t["survivors"] for f, t in zip(flat, tree))
    up = lambda rs, link: mean(r["bytes_up"].get(link, 0) for r in rs)  # noqa: E731
    down = lambda rs, link: mean(r["bytes_down"].get(link, 0) for r in rs)  # noqa: E731
    flat_back, tree_back = up(flat, "end->cloud"), up(tree, "suburban->cloud")
    return {
        "num_clients": n,
        "tree": tree_name,
        "cells": tier_counts(tree_cfg),
        "selected_per_round": mean(r["selected"] for r in tree),
        "reached_per_round": mean(r["reached"] for r in tree),
        "survivors_per_round": mean(len(r["survivors"]) for r in tree),
        "same_survivors_flat_and_tree": same,
        "active_suburban_per_round": mean(r["active_cells"]["suburban"] for r in tree),
        "active_neighbourhood_per_round": mean(r["active_cells"]["neighbourhood"] for r in tree),
        "active_femto_per_round": mean(r["active_cells"]["femto"] for r in tree),
        "flat_backhaul_up_bytes": flat_back,
        "tree_backhaul_up_bytes": tree_back,
        "tree_neighbourhood_suburban_up_bytes": up(tree, "neighbourhood->suburban"),
        "tree_access_up_bytes": up(tree, "end->neighbourhood") + up(tree, "end->femto"),
        "flat_backhaul_down_bytes": down(flat, "end->cloud"),
        "tree_backhaul_down_bytes": down(tree, "suburban->cloud"),
        "ratio_up": flat_back / tree_back if tree_back else float("nan"),
        "ratio_down": down(flat, "end->cloud") / down(tree, "suburban->cloud") if down(tree, "suburban->cloud") else float("nan"),
        "per_round": [
            {"round": f["round"], "survivors": len(t["survivors"]),
             "flat_up": f["bytes_up"], "tree_up": t["bytes_up"], "tree_down": t["bytes_down"], "flat_down": f["bytes_down"],
             "active_cells": t["active_cells"]}
            for f, t in zip(flat, tree)
        ],
    }


def confirm_real(args) -> dict:
    """One real in-process run per topology (tiny model) vs the netsim-only prediction."""
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport
    from fedlora.runs import report
    from fedlora.runs.progress import quiet_libraries

    quiet_libraries()
    n = args.confirm_clients
    base = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="fedlora-hierarchy-"))
    extra = [f"federation.rounds={args.confirm_rounds}", f"train.local_steps={args.confirm_steps}",
             "data.records_per_client=16", "data.max_eval_examples=8"]
    out = {"num_clients": n, "fraction": args.fraction, "rounds": args.confirm_rounds, "run_base": str(base), "topologies": {}}
    for name in ["flat", *args.confirm_trees]:
        cfg = compose_cfg(name, n, args.fraction, args.seed, extra)
        run_dir = base / name
        print(f"[hierarchy] real in-process run: topology={name}, {n} clients, model=tiny -> {run_dir}",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        summary = run_federation(cfg, run_dir, InProcessTransport(n))
        wall = time.perf_counter() - t0
        rounds = report.read_rounds(run_dir)
        adapter_bytes = int(summary["adapter_bytes_per_client"])
        measured = {r["round"]: {int(c): float(s) for c, s in r["client_train_s"].items() if s is not None} for r in rounds}
        predicted = netsim_rounds(cfg, args.confirm_rounds, adapter_bytes, measured)
        checks = []
        for real, pred in zip(rounds, predicted):
            checks.append({
                "round": real["round"],
                "bytes_up_match": real["bytes"]["up"] == pred["bytes_up"],
                "bytes_down_match": real["bytes"]["down"] == pred["bytes_down"],
                "participants_match": real["participants"] == pred["survivors"],
                "cell_of_match": all(pred["cell_of"][int(c)] == cell for c, cell in real["cell_of"].items()),
                "real_up_adapters": {k: v / adapter_bytes for k, v in real["bytes"]["up"].items() if v},
                "sim_network_s": real["sim_network_s"],
                "participants": len(real["participants"]),
            })
        link = "end->cloud" if name == "flat" else "suburban->cloud"
        out["topologies"][name] = {
            "run_dir": str(run_dir),
            "wall_s": wall,
            "adapter_bytes": adapter_bytes,
            "backhaul_link": link,
            "real_backhaul_up_adapters_per_round": mean(r["bytes"]["up"][link] / adapter_bytes for r in rounds),
            "predicted_backhaul_up_adapters_per_round": mean(p["bytes_up"][link] / adapter_bytes for p in predicted),
            "real_neighbourhood_suburban_adapters_per_round": None if name == "flat" else mean(
                r["bytes"]["up"]["neighbourhood->suburban"] / adapter_bytes for r in rounds),
            "participants_per_round": mean(len(r["participants"]) for r in rounds),
            "rounds": checks,
            "all_match": all(c["bytes_up_match"] and c["bytes_down_match"] and c["participants_match"] and c["cell_of_match"]
                             for c in checks),
        }
    flat = out["topologies"]["flat"]
    for name in args.confirm_trees:
        t = out["topologies"][name]
        t["real_ratio_flat_over_tree"] = flat["real_backhaul_up_adapters_per_round"] / t["real_backhaul_up_adapters_per_round"]
        t["predicted_ratio_flat_over_tree"] = (flat["predicted_backhaul_up_adapters_per_round"]
                                               / t["predicted_backhaul_up_adapters_per_round"])
    return out


def cmd_backhaul(args) -> None:
    from fedlora.runs.progress import quiet_libraries

    quiet_libraries()
    t0 = time.perf_counter()
    points = []
    for n in args.clients:
        for tree_name in args.trees:
            cells = tier_counts(compose_cfg(tree_name, max(n, 40), args.fraction, args.seed))["neighbourhood"]
            if n < cells:
                print(f"[hierarchy] skip {tree_name} at N={n}: fewer clients than its {cells} neighbourhood cells",
                      file=sys.stderr)
                continue
            points.append(backhaul_point(n, tree_name, args))
    headers = ["N", "tree", "clients/round", "updates/round", "flat backhaul MB", "tree backhaul MB", "ratio",
               "sub-urban cells (active/all)", "nbhd->sub MB", "nbhd cells (active/all)", "access MB (both)"]
    rows = [[p["num_clients"], p["tree"], p["selected_per_round"], p["survivors_per_round"],
             p["flat_backhaul_up_bytes"] / MB, p["tree_backhaul_up_bytes"] / MB, p["ratio_up"],
             f"{p['active_suburban_per_round']:.2f}/{p['cells']['suburban']}",
             p["tree_neighbourhood_suburban_up_bytes"] / MB,
             f"{p['active_neighbourhood_per_round']:.2f}/{p['cells']['neighbourhood']}",
             p["tree_access_up_bytes"] / MB] for p in points]
    print(f"\nBackhaul upload per round (mean of {args.rounds} rounds), adapter {args.adapter_bytes:,} B, "
          f"fraction {args.fraction}, seed {args.seed}; flat = end->cloud, tree = suburban->cloud")
    print(table(rows, headers, digits=2))
    bad = [p for p in points if not p["same_survivors_flat_and_tree"]]
    if bad:
        print(f"NOTE: flat and tree kept different clients at N={[p['num_clients'] for p in bad]} (deadline?)")
    for p in points:
        p["tree_backhaul_adapters"] = p["tree_backhaul_up_bytes"] / args.adapter_bytes
    print("tree backhaul in adapters = active sub-urban cells: "
          + ", ".join(f"{p['tree']}@{p['num_clients']}: {p['tree_backhaul_adapters']:.2f} vs {p['active_suburban_per_round']:.2f}"
                      for p in points))

    confirm = None
    if args.confirm:
        # Not a timing run, but it trains on the CPU: hold the lock so it cannot skew another benchmark.
        with bench_lock(None if args.no_lock else args.lock, what="hierarchy"):
            confirm = confirm_real(args)
        rows = []
        for name, t in confirm["topologies"].items():
            # The netsim-only computation at the SmolLM2 adapter size, same N and rounds as the real run.
            if name != "flat":
                t["smollm2_netsim_ratio"] = backhaul_point(
                    confirm["num_clients"], name, argparse.Namespace(**{**vars(args), "rounds": args.confirm_rounds}))["ratio_up"]
            rows.append([name, t["adapter_bytes"], t["participants_per_round"], t["backhaul_link"],
                         t["real_backhaul_up_adapters_per_round"], t["predicted_backhaul_up_adapters_per_round"],
                         t.get("real_ratio_flat_over_tree"), t.get("predicted_ratio_flat_over_tree"),
                         t.get("smollm2_netsim_ratio"), t["all_match"]])
        print(f"\nReal in-process runs (model=tiny, {confirm['num_clients']} clients, fraction {args.fraction}, "
              f"{confirm['rounds']} rounds) vs netsim-only prediction for the same adapter size")
        print(table(rows, ["topology", "adapter B", "updates/round", "backhaul link", "real adapters/round",
                           "netsim adapters/round", "real ratio", "netsim ratio", "netsim ratio (SmolLM2 B)",
                           "rounds.jsonl == netsim"], digits=2))
    out = write_json(args.out, {
        **provenance("hierarchy.backhaul"),
        "adapter_bytes": args.adapter_bytes,
        "fraction": args.fraction,
        "rounds": args.rounds,
        "train_s": args.train_s,
        "seed": args.seed,
        "points": points,
        "confirm": confirm,
        "wall_s": time.perf_counter() - t0,
    })
    print(f"\nwrote {out}")


# ----------------------------------------------------------------------------- roundtime


def roundtime_point(tree_name: str, per_cell: int, mix_name: str, deadline: float, access_mbps: float | None,
                    shared: bool, args) -> dict:
    from fedlora.config import validate

    base = compose_cfg(tree_name, 40, 1.0, args.seed)
    nb = tier_counts(base)["neighbourhood"]
    n = per_cell * nb
    cfg = compose_cfg(tree_name, n, 1.0, args.seed)
    mix = MIXES[mix_name]
    if mix is not None:
        cfg.topology.profile_mix = {name: float(mix.get(name, 0.0)) for name in cfg.topology.profiles if name != "reference"}
    cfg.topology.deadline_s = float(deadline)
    links = cfg.topology.links
    for access in (links.end_neighbourhood, links.end_femto):  # a cell's END access medium
        if access_mbps is not None:
            access.bandwidth_mbps = float(access_mbps)
        access.shared = shared
    validate(cfg)
    train_s = args.local_steps * args.step_s
    rounds = netsim_rounds(cfg, args.rounds, args.adapter_bytes, train_s)
    paths = [s for r in rounds for s in r["path_s"].values()]
    busiest = [max(Counter(r["tree"].neighbourhood_of(r["cell_of"][c]) for c in r["survivors"]).values(), default=0)
               for r in rounds]
    return {
        "tree": tree_name,
        "mix": mix_name,
        "profile_mix": dict(cfg.topology.profile_mix),
        "deadline_s": deadline,
        "access_mbps": links.end_neighbourhood.bandwidth_mbps,
        "access_shared": shared,
        "clients_per_neighbourhood": per_cell,
        "num_clients": n,
        "reached_per_round": mean(r["reached"] for r in rounds),
        "survivors_per_round": mean(len(r["survivors"]) for r in rounds),
        "late_per_round": mean(sum(1 for c in r["stragglers"] if c in r["path_s"]) for r in rounds),
        "busiest_neighbourhood_survivors": mean(busiest),
        "sim_round_s": mean(r["sim_network_s"] for r in rounds),
        "sim_round_s_per_round": [r["sim_network_s"] for r in rounds],
        "path_s_median": statistics.median(paths) if paths else None,
        "path_s_min": min(paths) if paths else None,
        "path_s_max": max(paths) if paths else None,
        "netsim_wall_s_per_round": mean(r["netsim_wall_s"] for r in rounds),
    }


def plot_roundtime(points: list[dict], path: Path, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trees = list(dict.fromkeys(p["tree"] for p in points))
    fig, axes = plt.subplots(2, len(trees), figsize=(7 * len(trees), 9), squeeze=False, sharex=True)
    colours = {m: c for m, c in zip(MIXES, ("tab:red", "tab:blue", "tab:green"))}
    accesses = sorted({p["access_mbps"] for p in points}, reverse=True)
    markers = dict(zip(accesses, "osD^v"))
    deadlines = sorted({p["deadline_s"] for p in points if p["deadline_s"] > 0})

    def series(tree_name, mix, access, shared, deadline):
        return sorted((p for p in points if p["tree"] == tree_name and p["mix"] == mix and p["access_mbps"] == access
                       and p["access_shared"] == shared and p["deadline_s"] == deadline),
                      key=lambda p: p["clients_per_neighbourhood"])

    for j, tree_name in enumerate(trees):
        for mix in MIXES:
            for access in accesses:
                for shared in (True, False):
                    pts = series(tree_name, mix, access, shared, 0.0)
                    if pts:
                        axes[0][j].plot([p["clients_per_neighbourhood"] for p in pts], [p["sim_round_s"] for p in pts],
                                        linestyle="-" if shared else ":", marker=markers[access], color=colours[mix],
                                        alpha=0.9 if shared else 0.6,
                                        label=f"{mix}, access {access:g} Mbit/s " + ("shared" if shared else "per message"))
                    for deadline in deadlines if shared else []:
                        pts = series(tree_name, mix, access, True, deadline)
                        if pts:
                            axes[1][j].plot([p["clients_per_neighbourhood"] for p in pts],
                                            [p["survivors_per_round"] / p["reached_per_round"] if p["reached_per_round"] else 0
                                             for p in pts],
                                            linestyle="-", marker=markers[access], color=colours[mix], alpha=0.85,
                                            label=f"{mix}, access {access:g} Mbit/s, deadline {deadline:g} s")
        axes[0][j].set_title(f"{tree_name}: simulated round time, no deadline (train ref {args.local_steps} x {args.step_s:g} s)")
        axes[0][j].set_ylabel("simulated round s (slowest path)")
        axes[0][j].set_yscale("log")
        axes[1][j].set_title(f"{tree_name}: share of reached clients aggregated under a deadline (shared access)")
        axes[1][j].set_ylabel("aggregated / reached")
        axes[1][j].set_xlabel("END clients per neighbourhood cell (all asked each round)")
        axes[1][j].set_ylim(-0.05, 1.05)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_roundtime(args) -> None:
    from fedlora.runs.progress import quiet_libraries

    quiet_libraries()
    t0 = time.perf_counter()
    points = []
    # Pure netsim, but it times netsim itself: hold the lock so a training run cannot skew it.
    with bench_lock(None if args.no_lock else args.lock, what="hierarchy"):
        for tree_name in args.trees:
            for mix in args.mixes:
                for access in args.access_mbps:
                    for per_cell in args.per_cell:
                        for deadline in [0.0, *args.deadlines]:
                            points.append(roundtime_point(tree_name, per_cell, mix, deadline, access or None, True, args))
                        # The per-message model (access not shared) as the reference: no growth.
                        points.append(roundtime_point(tree_name, per_cell, mix, 0.0, access or None, False, args))
    headers = ["tree", "mix", "access Mbit/s", "shared", "deadline s", "clients/nbhd", "clients", "reached", "aggregated",
               "late", "sim round s", "median path s", "netsim ms"]
    rows = [[p["tree"], p["mix"], p["access_mbps"], "yes" if p["access_shared"] else "no", p["deadline_s"] or "-",
             p["clients_per_neighbourhood"], p["num_clients"], p["reached_per_round"], p["survivors_per_round"],
             p["late_per_round"], p["sim_round_s"], p["path_s_median"], 1e3 * p["netsim_wall_s_per_round"]] for p in points]
    print(f"\nSimulated round time (mean of {args.rounds} rounds), all clients asked; train reference "
          f"{args.local_steps} steps x {args.step_s:g} s = {args.local_steps * args.step_s:g} s / compute_speed; "
          f"adapter {args.adapter_bytes:,} B; access = end->neighbourhood and end->femto capacity per cell")
    print(table(rows, headers, digits=2))
    png = plot_roundtime(points, Path(args.plot), args)
    out = write_json(args.out, {
        **provenance("hierarchy.roundtime"),
        "network_model": "fedlora.world.netsim: access link per cell shared (processor sharing, max-min fair, device caps); "
                         "access_shared=false rows are the per-message model",
        "adapter_bytes": args.adapter_bytes,
        "train_reference_s": args.local_steps * args.step_s,
        "local_steps": args.local_steps,
        "step_s": args.step_s,
        "rounds": args.rounds,
        "seed": args.seed,
        "plot": str(png),
        "points": points,
        "wall_s": time.perf_counter() - t0,
    })
    print(f"\nwrote {out} and {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("backhaul", help="backhaul bytes per round, flat vs tree (netsim + one real tiny run each)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--clients", type=int, nargs="+", default=[8, 40, 200, 1000], help="numbers of END clients N")
    b.add_argument("--fraction", type=float, default=0.25, help="federation.fraction (clients sampled per round)")
    b.add_argument("--trees", nargs="+", default=["small6g", "city"], help="tree topologies to compare with flat")
    b.add_argument("--rounds", type=int, default=3, help="rounds to average over (mobility moves clients between them)")
    b.add_argument("--adapter-bytes", type=int, default=SMOLLM2_ADAPTER_BYTES, help="bytes of one adapter / update / sum")
    b.add_argument("--train-s", type=float, default=5 * 5.5,
                   help="reference training seconds per client (only matters with a deadline)")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=True,
                   help="also run run_federation in process (model=tiny) per topology and check rounds.jsonl against netsim")
    b.add_argument("--confirm-clients", type=int, default=40)
    b.add_argument("--confirm-rounds", type=int, default=2)
    b.add_argument("--confirm-steps", type=int, default=1, help="train.local_steps of the real tiny runs")
    b.add_argument("--confirm-trees", nargs="+", default=["small6g", "city"])
    b.add_argument("--run-dir", default="", help="where the real runs go (default: a new temp dir)")
    b.add_argument("--lock", default=DEFAULT_LOCK, help="benchmark lock held during the real runs")
    b.add_argument("--no-lock", action="store_true", help="do not take the lock for the real runs")
    b.add_argument("--out", default=str(RESULTS / "hierarchy_backhaul.json"))
    b.set_defaults(func=cmd_backhaul)

    r = sub.add_parser("roundtime", help="simulated round time vs clients per neighbourhood, per device mix (netsim)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--per-cell", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50, 100],
                   help="END clients per neighbourhood cell")
    r.add_argument("--trees", nargs="+", default=["small6g", "city"])
    r.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    r.add_argument("--deadlines", type=float, nargs="*", default=[60.0], help="deadline(s) in simulated s, besides none")
    r.add_argument("--access-mbps", type=float, nargs="+", default=[0.0, 100.0],
                   help="capacity of each cell's END access link (end->neighbourhood, end->femto); 0 = as configured (1000)")
    r.add_argument("--local-steps", type=int, default=5)
    r.add_argument("--step-s", type=float, default=5.5, help="seconds per SmolLM2 local step measured on the reference machine")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--adapter-bytes", type=int, default=SMOLLM2_ADAPTER_BYTES)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--plot", default=str(RESULTS / "hierarchy_roundtime.png"))
    r.add_argument("--out", default=str(RESULTS / "hierarchy_roundtime.json"))
    r.add_argument("--lock", default=DEFAULT_LOCK, help="benchmark lock held while it runs")
    r.add_argument("--no-lock", action="store_true", help="do not take the lock")
    r.set_defaults(func=cmd_roundtime)

    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
