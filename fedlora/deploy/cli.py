"""``fedlora deploy``: plan a deployment, check a device.

    fedlora deploy plan OUT_DIR [overrides] [--cloud-host H]... [--edge-host CELL=H[,H]]... [--candidate-cells all]
    fedlora deploy check [--config NODE_FOLDER] [overrides] [--json]

  fedlora deploy plan --help | fedlora deploy check --help: every option
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedlora.config import compose, load_yaml
from fedlora.deploy.device import DeviceError, bf16_copy_cached, describe, device_rank, pick_settings, read_facts
from fedlora.deploy.plan import LOOPBACK, DeploySettings, PlanError, read_node, write_plan
from fedlora.usage import UserError


def _edge_host(text: str) -> tuple[str, list[str]]:
    cell, sep, hosts = text.partition("=")
    if not sep or not cell or not hosts:
        raise argparse.ArgumentTypeError(f"--edge-host wants CELL=HOST[,HOST...], got {text!r}")
    return cell, [h for h in hosts.split(",") if h]


def cmd_plan(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fedlora deploy plan",
                                description="Write one folder per machine (cloud, edges, END clients) from one config.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for `fedlora run`")
    p.add_argument("--cloud-host", action="append", default=[],
                   help="host name/IP of the cloud SuperLink (repeatable; the first is the address clients use; "
                        "default 127.0.0.1 and localhost)")
    p.add_argument("--edge-host", action="append", type=_edge_host, default=[],
                   help="CELL=HOST[,HOST...] for an edge SuperLink (default loopback)")
    p.add_argument("--base-port", type=int, default=DeploySettings.base_port)
    p.add_argument("--runtime-port-base", type=int, default=DeploySettings.runtime_port_base)
    p.add_argument("--bind-host", default="",
                   help="interface SuperLinks bind to (default: loopback if all hosts are, else 0.0.0.0)")
    p.add_argument("--cert-days", type=int, default=DeploySettings.cert_days)
    p.add_argument("--candidate-cells", choices=["mobility", "all"], default=DeploySettings.candidate_cells,
                   help="the edges each END device may attach to (and is registered with): its home cell plus the "
                        "cells topology.mobility can move it to (default), or every neighbourhood cell")
    args = p.parse_args(argv)
    settings = DeploySettings(cloud_hosts=args.cloud_host or list(LOOPBACK), edge_hosts=dict(args.edge_host),
                              base_port=args.base_port, runtime_port_base=args.runtime_port_base,
                              bind_host=args.bind_host, cert_days=args.cert_days, candidate_cells=args.candidate_cells)
    cfg = compose(args.overrides)
    try:
        nodes = write_plan(cfg, args.out_dir, settings, overrides=args.overrides)
    except PlanError as exc:
        raise UserError(str(exc)) from None
    roles = {r: sum(n.role == r for n in nodes.values()) for r in ("cloud", "edge", "end")}
    print(f"plan written to {args.out_dir}: {roles['cloud']} cloud, {roles['edge']} edge, {roles['end']} END folders\n"
          f"  copy each folder to its machine; keep {args.out_dir}/_ca/ca.key offline (no machine needs it)\n"
          f"  each machine: ./start.sh in its folder (= fedlora cloud|edge|client --config .), or sudo ./install.sh "
          f"for a systemd service\n"
          f"  END devices: fedlora deploy check --config <folder> first; own data goes in <folder>/data/")


def cmd_check(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="fedlora deploy check",
                                description="Inspect this device and pick safe training settings for the model.")
    p.add_argument("--config", type=Path, help="a node folder from `fedlora deploy plan` (uses its config.yaml)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (without --config)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.config:
        if args.overrides:
            raise UserError("give either --config NODE_FOLDER or overrides, not both")
        if not (args.config / "config.yaml").is_file():
            raise UserError(f"{args.config} is not a node folder of a plan (no config.yaml)")
        cfg = load_yaml(args.config / "config.yaml")
        # a plan's END folder names its device profile, whose rank the device trains (the launcher's rank)
        profile = read_node(args.config).doc.get("device_profile") if (args.config / "node.yaml").is_file() else None
    else:
        cfg, profile = compose(args.overrides), None
    facts = read_facts()
    try:
        settings = pick_settings(cfg, facts, rank=device_rank(cfg, profile), bf16_cached=bf16_copy_cached(cfg.model))
    except DeviceError as exc:
        if args.json:
            print(json.dumps({"device": describe(facts), "error": str(exc)}, indent=2))
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps({"device": describe(facts), "settings": settings.as_dict()}, indent=2))
        return
    d = describe(facts)
    print(f"device: {d['arch']}, {d['cpu_count']} CPUs, {d['mem_available_mib']:.0f} of {d['mem_total_mib']:.0f} MiB "
          f"available, Python {d['python']}, torch {d['torch']}, AES instructions: {'yes' if d['aes'] else 'no'} "
          f"-> mask PRG {d['mask_prg']}")
    whose = (f"device profile {profile}'s" if settings.lora_r != cfg.lora.r else
             f"the federation's lora.r{f', device profile {profile}' if profile else ''}")
    print(f"model {settings.model}, LoRA r={settings.lora_r} ({whose}; set by the federation, not changed by this check)")
    print(f"base bf16 copy cached: {'yes' if settings.bf16_cached else 'no (its one-off conversion peak counts)'}")
    print(f"settings: {settings.dtype} base, gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}, "
          f"batch {settings.batch_size} x accumulation {settings.grad_accum}, max_seq_len {settings.max_seq_len}")
    print(f"predicted peak {settings.predicted_peak_mib:.0f} MiB; needs {settings.needed_mib:.0f} MiB with margin; "
          f"{settings.available_mib:.0f} MiB available")
    print("changed from the config: " + ("; ".join(settings.changed) or "nothing"))
    print("overrides: " + " ".join(settings.overrides()))


COMMANDS = {"plan": cmd_plan, "check": cmd_check}


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"usage: fedlora deploy {{{'|'.join(COMMANDS)}}} ...  ({__doc__.strip().splitlines()[0]})")
    COMMANDS[argv[0]](argv[1:])
