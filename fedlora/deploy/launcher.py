"""``fedlora client --config FOLDER``: start an END device from its folder of a deployment plan.

1. Reads the folder (``node.yaml``: which edge, which partition id; ``config.yaml``: the
   federation's config; its certificates and keys) -- :func:`fedlora.deploy.plan.read_node`.
2. Checks the device (free memory, CPU architecture, Python, torch, AES instructions) and
   picks the least degraded training settings that fit (base precision, gradient
   checkpointing, batch, ``max_seq_len``, a quantised base last; never the LoRA rank: its profile's) --
   :func:`fedlora.deploy.device.pick_settings`; refuses with the reason when the device
   cannot train the model. What it picked is written to ``state/device.json``.
3. Starts the device's SuperNode: TLS with the plan's CA, SuperNode authentication with its
   own key, node config carrying the folder (its Ed25519 secure-aggregation key), the
   picked settings and its own data file in ``data/`` -- and keeps it running (restarted
   when its edge restarts) until Ctrl-C / SIGTERM. A device that knows several edges (its
   candidate cells) attaches to one at a time and moves when ``state/cell`` names another
   (``--cell X`` to choose at the start): :mod:`fedlora.deploy.attach`.
4. Starts, before the SuperNode, the device's resident process (:mod:`fedlora.deploy.resident`):
   the model stays loaded in it for the whole run, and Flower's per-message ClientApp only
   forwards each message to it over ``state/device.sock`` (node config ``device-socket``);
   started again if it dies (a round it misses is a dropout). ``warm=False``
   (``fedlora client --cold``): none, every message's ClientApp loads the model itself.

The private data stays in the folder; under secure aggregation what leaves the device is
keys, encrypted shares and its masked update (``--audit`` keeps a copy of every reply in
``logs/sent/`` to check that for yourself).
"""

from __future__ import annotations

import json
import logging
import sys

from fedlora.deploy.attach import Attachment
from fedlora.deploy.channel import socket_path
from fedlora.deploy.device import bf16_copy_cached, describe, device_rank, pick_settings, read_facts
from fedlora.deploy.plan import NodeFolder, read_node
from fedlora.deploy.processes import Security, run_end

log = logging.getLogger("fedlora")


def device_node_config(node: NodeFolder, *, audit: bool = False) -> tuple[dict, dict]:
    """(the SuperNode's extra node config, what was checked and picked) for an END folder."""
    cfg = node.config()
    facts = read_facts()
    # DeviceError: this device cannot train the model (at its profile's LoRA rank, which the cloud gives it too)
    settings = pick_settings(cfg, facts, rank=device_rank(cfg, node.doc.get("device_profile")),
                             bf16_cached=bf16_copy_cached(cfg.model))
    data_file = node.data_file()
    picked = {"device": describe(facts), "settings": settings.as_dict(), "data_file": data_file or None}
    state = node.path("state")
    state.mkdir(exist_ok=True)
    (state / "device.json").write_text(json.dumps(picked, indent=2) + "\n")
    log.info("device %s: %s, %.0f of %.0f MiB available -> %s base, checkpointing %s, batch %d x %d, max_seq_len %d "
             "(predicted peak %.0f MiB)%s", node.name, facts.arch, facts.mem_available_mib, facts.mem_total_mib,
             settings.dtype + ("" if settings.quantize == "none" else f" {settings.quantize}-quantised"),
             "on" if settings.gradient_checkpointing else "off", settings.batch_size, settings.grad_accum,
             settings.max_seq_len, settings.predicted_peak_mib,
             f"; changed: {'; '.join(settings.changed)}" if settings.changed else "")
    if data_file:
        log.info("device %s: training on its own data %s", node.name, data_file)
    else:
        log.warning("device %s: no data file in %s; training on partition %s of the federation's configured dataset "
                    "(a demo: put this device's own examples there)", node.name, node.path("data"), node.doc["partition_id"])
    # Train on every core of the device (torch threads; a simulation's default is 1 per virtual client).
    local = [*settings.overrides(), f"simulation.threads_per_client={max(1, facts.cpu_count)}"]
    # state-dir: what the device keeps across rounds (a personal strategy's state, state/personal/), never sent.
    extra = {"node-dir": str(node.folder), "device-settings": " ".join(local), "data-file": data_file,
             "state-dir": str(state)}
    if audit:
        extra["audit-dir"] = str(node.path("logs") / "sent")
    return extra, picked


def launch(folder, *, audit: bool = False, warm: bool = True, cell: str | None = None) -> None:
    """Check the device, pick its settings, run its resident process (``warm``) and its SuperNode until
    stopped, attached to the edge of ``cell`` (default: ``state/cell``, else its home cell)."""
    node = read_node(folder, "end")
    attached = Attachment(node, cell)
    extra, _ = device_node_config(node, audit=audit)
    resident = None
    if warm:
        extra["device-socket"] = str(socket_path(node.folder))
        resident = [sys.executable, "-m", "fedlora.deploy.resident", str(node.folder),
                    "--device-settings", extra["device-settings"], "--data-file", extra["data-file"]]
    up = node.doc["supernode"]
    run_end(int(node.doc["partition_id"]), int(node.doc["num_partitions"]), attached.superlink, node.folder,
            Security.from_node(node), node_config={**extra, **attached.node_config()}, port=int(up["runtime_port"]),
            resident=resident, moves=attached.poll if attached.roams else None)
