"""Start fedlora's tiers as real Flower processes, and stop every one of them again.

Each tier is plain Flower processes (flwr 1.41: one HTTP port per SuperLink for the Fleet,
Control and runtime APIs):

- **cloud**: a ``flower-superlink`` and a run of this app (``server.app``) with
  ``mode="cloud"``: its "clients" are the edges' SuperNodes, one per neighbourhood cell.
- **edge** of neighbourhood cell X: its own ``flower-superlink`` for its END children, a
  long-lived run of this app on it with ``mode="edge"`` (``server.edge.serve``: takes cell
  requests from a spool directory and runs each with ``fedlora.roles.neighbourhood.run_cell`` over its
  Grid), and a ``flower-supernode`` connected upward to the parent's SuperLink with node
  config ``role="edge" cell="X" spool="..."`` (its ClientApp relays the parent's request
  through the spool and returns the cell's result).
- **END** client: a ``flower-supernode`` connected to its edge's SuperLink with node config
  ``partition-id=N num-partitions=M`` -- the same ClientApp as in simulation.

:class:`ProcessGroup` starts processes with their logs in one directory and stops them --
with every descendant (Flower's SuperLink starts a detached SuperExec, which starts
``flwr-serverapp``; a SuperNode starts ``flwr-clientapp`` processes) -- on exit, error or
signal. :class:`Security` is the one place that turns TLS/node-auth settings into Flower
arguments: from a plan's node folder (``fedlora cloud|edge|client --config``: TLS on every
hop, SuperNode authentication on every SuperLink, the children's keys registered on every
start) or ``--insecure`` (plain HTTP on a trusted lab network).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedlora.config import save_yaml
from fedlora.deploy import clientapp_fork, commands
from fedlora.deploy.commands import toml_pairs
from fedlora.deploy.spool import Spool
from fedlora.deploy.supernode_poll import POLL_S
from fedlora.run_settings import resolve_run

APP_DIR = Path(__file__).resolve().parents[2]  # the checkout: pyproject.toml, server/, clients/
CONNECTION = commands.CONNECTION  # the flwr CLI's name for this machine's own SuperLink
BIN = Path(sys.executable).parent
SUPEREXEC_POLL_S = 0.1
log = logging.getLogger("fedlora")


class DeployError(RuntimeError):
    """A tier could not be started (a process died, a port never opened, a run was refused)."""


@dataclass(frozen=True)
class Security:
    """How a machine's Flower processes authenticate and encrypt: the ONE place that turns
    the settings into Flower's flags (through :mod:`fedlora.deploy.commands`).

    ``insecure=True``: plain HTTP, no node authentication (a trusted lab network; the
    ``--insecure`` role commands). Else TLS on every hop -- ``ca`` verifies the SuperLinks
    this machine connects to, ``cert``/``key`` serve its own SuperLink -- and SuperNode
    authentication: ``auth_key`` signs this machine's SuperNode in, ``supernodes`` (name ->
    public key file) are the SuperNodes its SuperLink admits (registered on every start).
    :meth:`from_node` reads them from a plan's node folder."""

    insecure: bool = True
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    auth_key: Path | None = None
    supernodes: tuple[tuple[str, Path], ...] = ()

    def __post_init__(self) -> None:
        if not self.insecure and self.ca is None:
            raise DeployError("TLS needs the CA certificate (ca.pem of the plan); or pass --insecure on a trusted network")

    @classmethod
    def from_node(cls, node) -> Security:
        """From a :class:`fedlora.deploy.plan.NodeFolder`."""
        doc = node.doc
        link, up = doc.get("superlink") or {}, doc.get("supernode") or {}
        sec = cls(insecure=False, ca=node.path(str(doc["ca_cert"])),
                  cert=node.path(link["cert"]) if link else None, key=node.path(link["key"]) if link else None,
                  auth_key=node.path(up["auth_private_key"]) if up else None,
                  supernodes=tuple((n, node.path(p)) for n, p in sorted((link.get("registered_supernodes") or {}).items())))
        for path in [sec.ca, sec.cert, sec.key, sec.auth_key, *(p for _, p in sec.supernodes)]:
            if path is not None and not path.is_file():
                raise DeployError(f"{path} is missing; copy the whole folder from the plan")
        return sec

    def superlink_argv(self, host: str, port: int) -> list[str]:
        if self.insecure:
            tls = None
        elif self.cert is None or self.key is None:
            raise DeployError("this machine has no SuperLink certificate in its plan folder")
        else:
            tls = (str(self.ca), str(self.cert), str(self.key))
        return local_bin(commands.superlink_argv(bind_host=host, port=port, tls=tls))

    def supernode_argv(self, superlink: str, node_config: dict, port: int) -> list[str]:
        if not self.insecure and self.auth_key is None:
            raise DeployError("this machine has no SuperNode authentication key in its plan folder")
        return local_bin(commands.supernode_argv(superlink=superlink, ca=None if self.insecure else str(self.ca),
                                                 auth_key=None if self.insecure else str(self.auth_key),
                                                 node_config=node_config, runtime_port=port, insecure=self.insecure))

    def connection_toml(self, name: str, address: str) -> str:
        """A ``flwr`` CLI config with one connection to a SuperLink of this machine."""
        return commands.flwr_config_toml(name, address, ca_abs_path=None if self.insecure else str(Path(self.ca).resolve()))


def local_bin(argv: list[str]) -> list[str]:
    """``argv`` with its program (a Flower command of :mod:`fedlora.deploy.commands`) taken
    from this venv's bin, whatever PATH says."""
    return [str(BIN / argv[0]), *argv[1:]]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_run(n: int, host: str = "127.0.0.1", *, also: int = 0) -> int:
    """A port p such that p..p+n-1 are all free on ``host`` right now (a plan's port bases); ``also``:
    p+also..p+also+n-1 too (an edge's split stream listens on its SuperLink port + 10000)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 65535 - also - n) if also else free_port(host)
        if base + also + n > 65535:
            continue
        socks = []
        try:
            for port in [*range(base, base + n), *(range(base + also, base + also + n) if also else [])]:
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise DeployError(f"no run of {n} free ports found on {host}")


def wait_port(address: str, timeout_s: float = 60.0, *, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``host:port`` accepts connections (or the process serving it died)."""
    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"{' '.join(proc.args[:2])} exited with code {proc.returncode} before {address} opened")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"nothing listens on {address} after {timeout_s:.0f}s")


def flower_env(home: Path) -> dict[str, str]:
    """Environment for one Flower process: its own FLWR_HOME, no telemetry, no `uv sync`,
    this venv first on PATH (Flower starts its helpers by name), this checkout importable."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(APP_DIR), env.get("PYTHONPATH", "")) if p),
    )
    # How often a SuperExec looks for a new task (a ClientApp/ServerApp process to start): Flower's
    # default 1 s adds ~0.5 s to every message on every hop; a local HTTP call every 0.1 s costs nothing.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_S))
    return env


def _descendants(pids: list[int]) -> list[int]:
    """Every live process below ``pids`` (Flower detaches some of its helpers into new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class ProcessGroup:
    """Processes started for one tier (or one test), stopped together, descendants included."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, tuple[list[str], dict[str, str], Path, float]] = {}  # argv, env, cwd, start time
        self.seen: set[int] = set()  # every pid ever found in the tree, to check nothing is left

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = APP_DIR) -> subprocess.Popen:
        if name in self.procs:
            raise DeployError(f"process name {name!r} used twice")
        out = open(self.log_dir / f"{name}.log", "ab")
        log.info("starting %s: %s (log %s)", name, shlex.join(argv), out.name)
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs[name] = proc
        self.specs[name] = (argv, env, cwd, time.time())
        self.seen.add(proc.pid)
        return proc

    def restart(self, name: str) -> subprocess.Popen:
        """Start an exited process of the group again, the same way."""
        argv, env, cwd, _ = self.specs[name]
        self.tree()  # remember its old pid among those that must be gone at the end
        del self.procs[name]
        return self.start(name, argv, env, cwd)

    def check(self) -> None:
        """Raise if a process of the group has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DeployError(f"{name} exited with code {proc.returncode}; see {self.log_dir / (name + '.log')}")

    def tree(self) -> list[int]:
        pids = [p.pid for p in self.procs.values()]
        found = [p for p in pids + _descendants(pids) if _alive(p)]
        self.seen.update(found)
        return found

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process and descendant (newest first), SIGKILL what is left after ``grace_s``."""
        _terminate(self.tree(), list(self.procs.values()), grace_s)

    def replace(self, name: str, argv: list[str], grace_s: float = 10.0) -> subprocess.Popen:
        """Stop one process of the group (descendants included, as :meth:`stop` does) and start
        ``argv`` in its place, with the same environment and directory."""
        _, env, cwd, _ = self.specs[name]
        proc = self.procs.pop(name)
        pids = [p for p in [proc.pid, *_descendants([proc.pid])] if _alive(p)]
        self.seen.update(pids)
        _terminate(pids, [proc], grace_s)
        return self.start(name, argv, env, cwd)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to one process of the group and (SIGKILL: a crash) every process below it,
        or (any other signal: a stop the process handles itself) to it alone; return the pids
        its tree had, which the group then expects gone at the end like any other."""
        proc = self.procs[name]
        pids = [p for p in [proc.pid, *_descendants([proc.pid])] if _alive(p)]
        self.seen.update(pids)
        for pid in pids if sig == signal.SIGKILL else pids[:1]:
            _signal(pid, sig)
        return pids

    def leftovers(self) -> list[int]:
        """Pids this group started (or saw below them) that still run."""
        return sorted(p for p in self.seen if _alive(p))

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(pids: list[int], procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM ``pids`` (newest first), SIGKILL what is left of them and below them after ``grace_s``."""
    for pid in reversed(pids):
        _signal(pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids + _descendants(pids):
        if _alive(pid):
            log.warning("pid %d did not stop on SIGTERM; killing it", pid)
            _signal(pid, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- the Flower processes of each tier ----------------------------------------------------


def start_superlink(group: ProcessGroup, name: str, listen: str, home: Path, security: Security) -> subprocess.Popen:
    """A SuperLink serving ``listen`` (host:port) for SuperNodes and the ``flwr`` CLI; with
    node authentication on, the SuperNodes ``security`` names are registered with it."""
    host, _, port = listen.rpartition(":")
    home.mkdir(parents=True, exist_ok=True)
    proc = group.start(name, security.superlink_argv(host or "0.0.0.0", int(port)), flower_env(home))
    wait_port(_local(listen), proc=proc)
    connection_file(home, CONNECTION, _local(listen), security)
    if not security.insecure:
        register_supernodes(home, security.supernodes, proc=proc)
    return proc


def register_supernodes(home: Path, supernodes, *, proc: subprocess.Popen | None = None, timeout_s: float = 60.0) -> None:
    """Add each (name, public key file) to the SuperLink of ``home``'s connection (Control
    API); one already registered is fine. Retries while the SuperLink is still starting."""
    for name, public_key in supernodes:
        deadline = time.time() + timeout_s
        while True:
            out = subprocess.run(local_bin(commands.register_argv(str(public_key), name)),
                                 env=flower_env(home), capture_output=True, text=True, timeout=60)
            text = out.stdout + out.stderr
            if out.returncode == 0 or "already" in text.lower():
                log.info("SuperNode %s registered (%s)", name, "new" if out.returncode == 0 else "already known")
                break
            if (proc is not None and proc.poll() is not None) or time.time() > deadline:
                raise DeployError(f"could not register SuperNode {name} with the SuperLink: {text.strip()[-500:]}")
            time.sleep(1.0)


def start_supernode(group: ProcessGroup, name: str, superlink: str, node_config: dict, home: Path,
                    security: Security, *, port: int | None = None) -> subprocess.Popen:
    """A SuperNode connected to ``superlink``, running fedlora's ClientApp with ``node_config``."""
    home.mkdir(parents=True, exist_ok=True)
    argv = supernode_command(superlink, node_config, security, port or free_port())
    env = flower_env(home)
    if clientapp_fork.enabled():  # its ClientApp processes forked warm (opt-in: FEDLORA_CLIENTAPP_FORK=1)
        sock = home / "clientapp-fork.sock"
        shims = home / "bin"
        clientapp_fork.write_shim(shims, sys.executable, str(BIN / clientapp_fork.COMMAND))
        env = dict(env, PATH=f"{shims}{os.pathsep}{env['PATH']}", **{clientapp_fork.ENV: str(sock)})
        if f"{name}-fork" not in group.procs:
            group.start(f"{name}-fork", [sys.executable, "-m", "fedlora.deploy.clientapp_fork", str(sock)], env)
    return group.start(name, argv, env)


def supernode_command(superlink: str, node_config: dict, security: Security, port: int) -> list[str]:
    """The command of a SuperNode connected to ``superlink`` (through :mod:`fedlora.deploy.supernode_poll`
    unless its waits are left as Flower's, :func:`supernode_poll_s`)."""
    # No --max-retries: a SuperNode keeps retrying, so an edge may come up after its children.
    argv = security.supernode_argv(superlink, node_config, port)
    poll = supernode_poll_s()
    if poll is not None:  # the same flower-supernode, its idle waits capped (fedlora.deploy.supernode_poll)
        argv = [sys.executable, "-m", "fedlora.deploy.supernode_poll", "--poll-s", str(poll), *argv[1:]]
    return argv


def supernode_poll_s() -> float | None:
    """How long a SuperNode started here waits between asks when idle: env ``FEDLORA_SUPERNODE_POLL_S``
    (seconds; ``off``: Flower's own 3 s), default :data:`fedlora.deploy.supernode_poll.POLL_S`."""
    raw = os.environ.get("FEDLORA_SUPERNODE_POLL_S", "").strip().lower()
    if raw in ("off", "0", "none"):
        return None
    try:
        return float(raw) if raw else POLL_S
    except ValueError:
        raise DeployError(f"FEDLORA_SUPERNODE_POLL_S={raw!r}: seconds (e.g. 0.2) or off") from None


def connection_file(home: Path, name: str, address: str, security: Security) -> None:
    """The ``flwr`` CLI's config (``$FLWR_HOME/config.toml``) with one SuperLink connection."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(security.connection_toml(name, address))


def submit_run(home: Path, connection: str, run_config: dict, *, app_dir: Path = APP_DIR) -> int:
    """Start a run of this app on a SuperLink (``flwr run --format json``); return its run id."""
    argv = [str(BIN / "flwr"), "run", str(app_dir), connection, "--format", "json",
            "--run-config", toml_pairs(run_config)]
    out = subprocess.run(argv, env=flower_env(home), cwd=app_dir, capture_output=True, text=True, timeout=120)
    try:
        payload = json.loads(out.stdout[out.stdout.index("{"):])
        if payload.get("success"):
            return int(payload["run-id"])
    except (ValueError, KeyError):
        pass
    raise DeployError(f"`flwr run` on {connection} failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")


def stream_run(home: Path, connection: str, run_config: dict, log_file: Path, *, app_dir: Path = APP_DIR,
               timeout_s: float | None = None) -> int:
    """Start a run and follow its log until it ends (``flwr run --stream``); return the exit code."""
    argv = [str(BIN / "flwr"), "run", str(app_dir), connection, "--stream", "--run-config", toml_pairs(run_config)]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(argv, env=flower_env(home), cwd=app_dir, stdout=out, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


# --- the roles, as `fedlora cloud|edge|end` run them -------------------------------------


class Stop(Exception):
    """SIGTERM/SIGINT arrived: stop the tier's processes and leave."""


def _stop_on_signals() -> None:
    def handler(signum, frame):
        # Once: a second Ctrl-C must not interrupt the stopping of the processes.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _keep_running(group: ProcessGroup, what: str, supernode: str = "supernode", watch=None) -> None:
    """Block until a signal or until one of the tier's processes dies for good.

    A SuperNode leaves when its SuperLink restarts (the new SuperLink does not know its node
    id; e.g. each ``fedlora cloud`` starts a fresh one), so it is started again: a new node
    that registers with the new SuperLink. One that keeps exiting at once is an error.
    """
    log.info("%s running; stop with Ctrl-C or SIGTERM (logs in %s)", what, group.log_dir)
    exits: dict[str, int] = {}
    while True:
        proc = group.procs[supernode]
        if proc.poll() is not None:
            given_up, lived = _exited_at_once(group, supernode, exits)
            if given_up:
                raise DeployError(_refusal(group, supernode))
            log.warning("%s exited with code %s after %.0fs (its SuperLink went away?); starting it again",
                        supernode, proc.returncode, lived)
            time.sleep(min(30.0, 2.0 ** exits[supernode]))
            group.restart(supernode)
        if watch is not None:  # first: it may start a helper process again that group.check() would report
            watch()
        _keep_fork_servers(group, exits)
        group.check()
        time.sleep(1.0)


QUICK_S, QUICK_EXITS = 10.0, 5  # a process that exits within QUICK_S of its start QUICK_EXITS times in a row keeps failing


def _exited_at_once(group: ProcessGroup, name: str, exits: dict[str, int]) -> tuple[bool, float]:
    """``name`` has exited: counted in ``exits`` (its exits within QUICK_S of their start, in a row; kept
    by the caller). Returns whether that is now QUICK_EXITS in a row (give up on it) and how long it lived."""
    lived = time.time() - group.specs[name][3]
    exits[name] = exits.get(name, 0) + 1 if lived < QUICK_S else 0
    return exits[name] >= QUICK_EXITS, lived


def _keep_fork_servers(group: ProcessGroup, exits: dict[str, int]) -> None:
    """A ClientApp fork server that exited is started again; meanwhile its shim starts ClientApps cold
    (Flower's own way), and one that keeps exiting at once is left out: the tier goes on cold.
    ``exits``: as :func:`_exited_at_once` keeps them, per process."""
    for name in [n for n in group.procs if n.endswith("-fork")]:
        proc = group.procs[name]
        if proc.poll() is None:
            continue
        given_up, _ = _exited_at_once(group, name, exits)
        if given_up:
            log.warning("%s (the ClientApp fork server) exited at once %d times in a row (see %s); its ClientApps "
                        "start cold from now on", name, exits[name], group.log_dir / f"{name}.log")
            del group.procs[name]
            continue
        log.warning("%s (the ClientApp fork server) exited with code %s; starting it again", name, proc.returncode)
        group.restart(name)


def _refusal(group: ProcessGroup, name: str) -> str:
    """Why a SuperNode keeps exiting, in words, from the end of its log."""
    path = group.log_dir / f"{name}.log"
    try:
        tail = path.read_text(errors="replace")[-20000:]
    except OSError:
        tail = ""
    if "Failed to activate SuperNode" in tail:
        why = ("the SuperLink refused this node: its authentication key is not registered there (is this folder from "
               "the same plan as its parent's? the cloud and each edge register their children's keys when they start)")
    elif "CERTIFICATE_VERIFY_FAILED" in tail:
        why = "TLS: the SuperLink's certificate is not signed by this folder's ca.pem (a folder from another plan?)"
    else:
        why = "it exited at once five times in a row"
    return f"{name}: {why}; see {path}"


def run_cloud(cfg, run_dir: Path, listen: str, work_dir: Path, security: Security, *,
              resume: bool = False, timeout_s: float | None = None, node_dir: Path | None = None) -> int:
    """The cloud tier for one federation: its SuperLink, then a ``mode="cloud"`` run on it,
    followed until it ends; the SuperLink stops afterwards. Returns the run's exit code.
    ``node_dir``: the cloud's plan folder (secure aggregation uses its registry and key)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_yaml(cfg, run_dir / "config.yaml")
    home = work_dir / "flwr-home"
    _stop_on_signals()
    with ProcessGroup(work_dir / "logs") as group:
        start_superlink(group, "superlink", listen, home, security)
        log.info("cloud SuperLink on %s; run directory %s (waiting for the edges)", listen, run_dir)
        run_config = {"mode": "cloud", "config-file": str(run_dir / "config.yaml"), "run-dir": str(run_dir), "resume": resume,
                      "node-dir": str(node_dir or "")}
        return stream_run(home, CONNECTION, run_config, group.log_dir / "run.log", timeout_s=timeout_s)


def run_edge(cell: str, parent: str, listen: str, work_dir: Path, security: Security, *,
             node_dir: Path | None = None, port: int | None = None) -> None:
    """One edge aggregator until stopped: its SuperLink for END clients, the edge service run
    on it, and a SuperNode connected upward to ``parent``. ``node_dir``: the edge's plan
    folder (its secure-aggregation key and the registry)."""
    work_dir = Path(work_dir).resolve()
    spool = work_dir / "spool"
    for stale in ("stop", "heartbeat"):  # left by an earlier edge in this work dir
        (spool / stale).unlink(missing_ok=True)
    _stop_on_signals()
    with ProcessGroup(work_dir / "logs") as group:
        try:
            start_superlink(group, "superlink", listen, work_dir / "flwr-home", security)

            def start_service() -> None:
                run_id = submit_run(work_dir / "flwr-home", CONNECTION, {"mode": "edge", "cell": cell, "spool": str(spool),
                                                                          "node-dir": str(node_dir or "")})
                _wait_for_service(group, spool, run_id)
                log.info("edge %s: SuperLink on %s, service run %d", cell, listen, run_id)

            service = Spool(spool)

            def watch() -> None:  # a service run that died is started again
                if not service.alive() and not service.stopping():
                    failure = service.failure()
                    log.warning("edge %s: the service run stopped beating%s; starting a new one", cell,
                                f" (it failed: {failure})" if failure else "")
                    start_service()

            start_service()
            # Joins its parent only now, so the parent never sees an edge that cannot serve.
            start_supernode(group, "supernode", parent, {"role": "edge", "cell": cell, "spool": str(spool)},
                            work_dir / "supernode-home", security, port=port)
            _keep_running(group, f"edge {cell} (parent {parent}, children on {listen})", watch=watch)
        finally:
            spool.mkdir(parents=True, exist_ok=True)
            (spool / "stop").touch()  # the service run ends cleanly if it still can


def _wait_for_service(group: ProcessGroup, spool: Path, run_id: int, timeout_s: float = 180.0) -> None:
    deadline = time.time() + timeout_s
    while not Spool(spool).alive():
        group.check()
        if time.time() > deadline:
            raise DeployError(f"the edge service run {run_id} did not start within {timeout_s:.0f}s; "
                              f"see `flwr log {run_id}` (FLWR_HOME={spool.parent / 'flwr-home'}) and {spool / 'service.log'}")
        time.sleep(0.2)


def run_end(partition_id: int, num_partitions: int, edge: str, work_dir: Path, security: Security, *,
            node_config: dict | None = None, port: int | None = None, resident: list[str] | None = None,
            moves=None) -> None:
    """One END client until stopped: a SuperNode connected to its edge's SuperLink.
    ``node_config``: more node settings (a planned device's folder, its own settings).
    ``resident``: the command of the device's resident process (:mod:`fedlora.deploy.resident`),
    started first and started again whenever it exits (a round it misses is a dropout).
    ``moves`` (a device that may attach to other edges): polled every second, it returns None
    to stay or (edge, node settings that change) to move: the SuperNode is stopped -- it leaves
    its edge -- and started again towards ``edge``'s SuperLink."""
    _stop_on_signals()
    config = {"partition-id": partition_id, "num-partitions": num_partitions, **(node_config or {})}
    port = port or free_port()
    with ProcessGroup(Path(work_dir) / "logs") as group:
        exits: dict[str, int] = {}

        def keep_resident() -> None:
            proc = group.procs["resident"]
            if proc.poll() is None:
                return
            given_up, lived = _exited_at_once(group, "resident", exits)
            if given_up:
                raise DeployError(f"the resident device process exited at once five times in a row; see "
                                  f"{group.log_dir / 'resident.log'}")
            log.warning("the resident device process exited with code %s after %.0fs; starting it again",
                        proc.returncode, lived)
            group.restart("resident")

        def follow_moves() -> None:
            move = moves()
            if move is not None:
                edge_now, changed = move
                config.update(changed)
                log.info("END client %d: moving to the edge at %s", partition_id, edge_now)
                group.replace("supernode", supernode_command(edge_now, config, security, port))

        if resident is not None:
            group.start("resident", resident, dict(os.environ))
        start_supernode(group, "supernode", edge, config, Path(work_dir).resolve() / "flwr-home", security, port=port)
        watches = [w for w, on in ((keep_resident, resident is not None), (follow_moves, moves is not None)) if on]

        def watch() -> None:
            for each in watches:
                each()

        _keep_running(group, f"END client {partition_id} (edge {edge})", watch=watch if watches else None)


def _local(listen: str) -> str:
    """The address a process on this machine reaches a SuperLink listening on ``listen`` at."""
    host, _, port = listen.rpartition(":")
    return f"{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{port}"


def placement(cfg) -> dict[str, list[int]]:
    """Neighbourhood cell -> the END clients the topology puts under its edge (round 1)."""
    tree = resolve_run(cfg).tree
    cells: dict[str, list[int]] = {cell: [] for cell in tree.tier("neighbourhood")}
    if not cells:
        raise DeployError("edge processes need a tree topology with neighbourhood cells (topology=small6g or city)")
    for client, leaf in sorted(tree.initial.items()):
        cells[tree.neighbourhood_of(leaf)].append(client)
    return cells


def plan(cfg, cloud: str, overrides: list[str]) -> str:
    """The commands that start this configuration's tiers by hand (``fedlora cloud --plan``)."""
    n = cfg.federation.num_clients
    lines = []
    for i, (cell, clients) in enumerate(placement(cfg).items()):
        edge = f"EDGE{i}_HOST:PORT"
        lines.append(f"# edge of {cell}: END clients {clients}")
        lines.append(f"fedlora edge --insecure --cell {cell} --parent {cloud} --listen {edge}")
        lines += [f"fedlora end --insecure --partition-id {c} --num-partitions {n} --edge {edge}" for c in clients]
    lines.append("# the cloud, one federation over the edges")
    lines.append(shlex.join(["fedlora", "cloud", "--insecure", "--listen", cloud, *overrides]))
    return "\n".join(lines)


def start_loopback_tiers(group: ProcessGroup, cfg, work_dir: Path, env: dict[str, str] | None = None) -> dict:
    """An edge per neighbourhood cell and an END client per client of ``cfg``'s tree, all on
    loopback through ``fedlora edge|end`` (tests, benchmarks, a demo on one machine).
    Returns the addresses ``{"cloud": ..., "edges": {cell: ...}}``; the cloud itself is
    ``fedlora cloud --listen <cloud>``."""
    cells = placement(cfg)
    cloud = f"127.0.0.1:{free_port()}"
    edges = {cell: f"127.0.0.1:{free_port()}" for cell in cells}
    env = dict(os.environ if env is None else env)
    fedlora = [sys.executable, "-m", "fedlora.cli"]
    for cell, listen in edges.items():
        group.start(f"edge-{cell}", [*fedlora, "edge", "--insecure", "--cell", cell, "--parent", cloud,
                                     "--listen", listen, "--work-dir", str(work_dir / cell)], env)
    for cell, clients in cells.items():
        for client in clients:
            group.start(f"end-{client}", [*fedlora, "end", "--insecure", "--partition-id", str(client),
                                          "--num-partitions", str(cfg.federation.num_clients), "--edge", edges[cell],
                                          "--work-dir", str(work_dir / f"end-{client}")], env)
    return {"cloud": cloud, "edges": edges}
