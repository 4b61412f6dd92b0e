"""The resident process of a planned END device: the model stays loaded for the whole run.

``fedlora client --config FOLDER`` (:mod:`fedlora.deploy.launcher`) starts it next to the
device's SuperNode and starts it again if it dies::

    python -m fedlora.deploy.resident FOLDER --device-settings "..." --data-file PATH

It serves :mod:`fedlora.deploy.channel` requests on ``FOLDER/state/device.sock`` (0600, this
user only) with one :class:`fedlora.roles.warm_device.WarmDevice`: the device's own keys from
its folder, its picked settings and data file. It rewrites ``FOLDER/state/resident.json`` as
each request starts and ends -- pid, requests served, how many times this process built the
model, the request it is busy with, each request's timings and memory -- so the device's owner (and the
deployment test) can see it stayed warm. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from fedlora.deploy import channel
from fedlora.deploy.plan import read_node
from fedlora.deploy.split_session import device_trainer
from fedlora.roles.device import DeviceLocal
from fedlora.roles.warm_device import WarmDevice
from fedlora.runs.progress import quiet_libraries

STATUS = "state/resident.json"
MAX_TIMINGS = 400  # the last requests' timings kept in the status file (100 secure rounds)
log = logging.getLogger("fedlora")


def write_status(folder: Path, doc: dict) -> None:
    tmp = folder / (STATUS + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, folder / STATUS)


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and its peak so far (MiB; Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[f].split()[0]) / 1024 for k, f in (("rss_mib", "VmRSS"), ("peak_mib", "VmHWM")) if f in fields}


def read_status(folder: str | Path) -> dict | None:
    """What the device's resident process last reported (None before it started)."""
    path = Path(folder) / STATUS
    return json.loads(path.read_text()) if path.is_file() else None


def run(folder: str | Path, device_settings: str = "", data_file: str = "") -> None:
    """Serve the device's requests until SIGTERM/SIGINT."""
    node = read_node(folder, "end")
    partition = int(node.doc["partition_id"])
    local = DeviceLocal(device_settings, data_file, str(node.path("state")))
    device = WarmDevice(partition, local=local, identities=node.identities(),
                        split_trainer=device_trainer(node, partition, local))
    path = channel.socket_path(node.folder)
    stop = {"now": False}

    def on_signal(signum, frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.time()

    timings: list[dict] = []  # per request: ClientApp process age when it asked, time spent here

    def report(timing: dict | None = None, busy: dict | None = None) -> None:
        if timing is not None:
            timings.append({**timing, **memory_mib()})
            del timings[:-MAX_TIMINGS]
        write_status(node.folder, {**device.stats(), "started": started, "busy": busy, "timings": timings})

    listener = channel.listen(path)
    report()
    log.info("device %s: resident process %d serving %s", node.name, os.getpid(), path)
    try:
        channel.serve(listener, device.handle, stopping=lambda: stop["now"], received=lambda r: report(busy=r),
                      served=report)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        log.info("device %s: resident process stopped after %d request(s)", node.name, device.requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.deploy.resident", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the device's folder of a deployment plan")
    parser.add_argument("--device-settings", default="", help="the launcher's picked settings (key=value ...)")
    parser.add_argument("--data-file", default="", help="the device's own data file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    quiet_libraries()
    run(args.folder, args.device_settings, args.data_file)


if __name__ == "__main__":
    main()
