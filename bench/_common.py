"""Helpers shared by the fedlora benchmarks: the CPU lock, memory readings, tables, JSON.

Timing on the shared 2-core development machine is only meaningful while nobody else
computes, so every heavy benchmark holds an exclusive ``flock`` on
``/tmp/fedlora-bench.lock`` (the lock other people on the project use too) while it
measures. The scripts take the lock themselves; running them under
``flock /tmp/fedlora-bench.lock python bench/...`` works as well (a lock already held by an
ancestor process is recognised, so there is no self-deadlock).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LOCK = "/tmp/fedlora-bench.lock"
# The project's shared data sits next to the checkout (../shared/data/ from the repo root) and is
# read in place, never copied into the repo.
SHARED_DATA = REPO.parent / "shared" / "data"
MEDICAL = str(SHARED_DATA / "medical_meadow_dev.jsonl")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------ lock


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        # The command name may hold spaces and parentheses: the ppid follows the last ')'.
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _holders(path: str) -> set[int]:
    """Pids that /proc/locks says hold a lock on ``path``'s inode."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return set()
    out = set()
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        try:
            pid, dev_inode = int(parts[4]), parts[5]
        except (IndexError, ValueError):
            continue
        if dev_inode.rsplit(":", 1)[-1] == str(st.st_ino):
            out.add(pid)
    return out


@contextlib.contextmanager
def bench_lock(path: str | None = DEFAULT_LOCK, *, what: str = "benchmark") -> Iterator[None]:
    """Hold the exclusive benchmark lock (wait for it); no-op when ``path`` is None/empty."""
    if not path:
        yield
        return
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _holders(path) & _ancestors():
                # `flock <path> python bench/...`: our own wrapper holds it.
                yield
                return
            print(f"[{what}] waiting for the benchmark lock {path} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            fcntl.flock(fh, fcntl.LOCK_EX)
            print(f"[{what}] got the lock after {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- memory


def maxrss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident set size of this process (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------- environment


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_count": os.cpu_count(),
        "mem_total_gib": mem_gib,
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
    with contextlib.suppress(Exception):
        import transformers

        info["transformers"] = transformers.__version__
    return info


def code_version() -> dict[str, Any]:
    """The fedlora commit measured, and which of its files differ from it (others edit them)."""
    import subprocess

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=str(REPO))
        return r.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": git("status", "--short", "--", "fedlora", "server", "clients", "conf").splitlines()}


def provenance(benchmark: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The head of every result JSON: which benchmark, the command, the machine, the code measured."""
    return {"benchmark": benchmark, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": info if info is not None else machine(), "code": code_version()}


def require_medical(path: str) -> str:
    """``path`` as an absolute path, or exit with a clear message when it is missing."""
    p = Path(path).expanduser()
    if not p.is_file():
        sys.exit(
            f"error: the medical data file {p} does not exist.\n"
            "This benchmark needs the Medical Meadow dev file (read-only, shared; never copied into "
            f"the repo), by default in the shared data folder next to the checkout ({SHARED_DATA}). "
            "Put the shared folder there or point --data-path at the file."
        )
    return str(p.resolve())


# ------------------------------------------------------------------- output helpers


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.{digits}f}"
    return str(x)


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], digits: int = 2) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    body = [[fmt(c, digits) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(list(headers)), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in body]
    return "\n".join(out)


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return path


def compose_all_available(overrides: list[str]):
    """``fedlora.config.compose(overrides)`` with every device profile's availability set
    to 1, so fraction 1.0 really means every client trains in every round (the topology's
    device profiles otherwise drop clients at random, e.g. rpi4 availability 0.95).
    Returns (cfg, the overrides used)."""
    from fedlora.config import compose

    cfg = compose(overrides)
    profiles = getattr(getattr(cfg, "topology", None), "profiles", None) or {}
    extra = [f"topology.profiles.{name}.availability=1.0" for name in sorted(profiles)]
    full = [*overrides[:1], *extra, *overrides[1:]] if extra else list(overrides)
    # User overrides come last so an explicit availability still wins.
    return (compose(full) if extra else cfg), full
