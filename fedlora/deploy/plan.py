"""``fedlora deploy plan``: one folder per machine from one config.

From the composed config (the same Hydra overrides as ``fedlora run``) the cell tree of
:mod:`fedlora.world.topology` gives the machines:

- ``cloud/``: the cloud SuperLink (TLS server certificate, SuperNode auth on); its
  SuperNodes are the edges (tree) or the END clients (flat). It keeps the CA certificate,
  the master secure-aggregation registry and the public keys it registers.
- ``edge-<cell>/`` for every neighbourhood cell (tree only): a SuperLink for its END clients
  (own server certificate, SuperNode auth on, their public keys) and an upward SuperNode to
  the cloud (its own auth key). Sub-urban cells are not separate machines here: each edge
  talks to the cloud directly (the sub-urban sum is logical, as in simulation).
- ``end-<id>/`` for every END client: SuperNode auth key, CA certificate, node config
  (cell, partition id, device profile, data path placeholder, and its *candidate cells*:
  the edges it may attach to, each with its SuperLink's address -- its home cell, plus
  under a mobility model the cells it may move to, or every cell with ``--candidate-cells
  all``; :func:`fedlora.world.attachments.candidate_cells`). Every candidate edge registers
  the device's SuperNode key, so it may attach to any of them (``fedlora client --cell``).

Every folder gets ``ca.pem``, the public ``secagg_registry.json`` (device id -> Ed25519
public key; ids are the folder names), its own secure-aggregation identity key,
``node.yaml``, ``config.yaml`` (the resolved fedlora config), ``start.sh`` (runs
``fedlora cloud|edge|client --config .``: the machine's role with TLS, node authentication
and its own keys), a systemd unit and ``install.sh``. A private key is written only into
the folder of the machine that owns it (mode 0600). The CA private key goes to ``_ca/``
beside the node folders: keep it offline; no machine needs it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedlora.config import FedLoraConfig, load_yaml, save_yaml
from fedlora.deploy import commands, pki
from fedlora.run_settings import resolve_run
from fedlora.secure.identities import IdentityError, PlannedIdentities
from fedlora.secure.keys import IdentityKey
from fedlora.secure.rounds import CLOUD_ID, aggregator_id, device_id
from fedlora.world.attachments import candidate_cells, tracks_devices
from fedlora.world.topology import CLOUD

LOOPBACK = ["127.0.0.1", "localhost"]
REGISTRY_FILE = "secagg_registry.json"
REGISTRY_FORMAT = "fedlora-secagg-registry/v1"
CA_CERT = "ca.pem"
SERVER_CERT = "tls/server.pem"
SERVER_KEY = "tls/server.key"
SUPERNODE_KEY = "auth/supernode_key"
SUPERNODE_PUB = "auth/supernode_key.pub"
SUPERNODES_DIR = "supernodes"  # public keys this folder's SuperLink registers
IDENTITY_KEY = "secagg/identity.pem"
DATA_DIR = "data"


DATA_README = """Put this device's own training examples here: ONE file, train.jsonl / .json / .csv / .parquet,
in the alpaca layout (instruction, input, output) or chat layout (messages). It never leaves this
device; only masked adapter updates do. Without a file, the device trains on its partition of the
federation's configured dataset (a demo).
"""


class PlanError(ValueError):
    """The deployment cannot be planned as asked; the message names the setting or flag."""


@dataclass
class DeploySettings:
    """Where the machines are reached; defaults put everything on loopback."""

    # Host names/IPs of the cloud SuperLink: the first is the address clients use, all go
    # into its certificate's SANs.
    cloud_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK))
    # Cell id -> host names/IPs of that edge's SuperLink (missing cells: loopback).
    edge_hosts: dict[str, list[str]] = field(default_factory=dict)
    # Ports: the cloud SuperLink listens on base_port, edge i on base_port + 1 + i; the
    # SuperNodes' local Runtime API ports start at runtime_port_base (distinct so a whole
    # plan can run on one loopback machine).
    base_port: int = 9200
    runtime_port_base: int = 9300
    # Interface the SuperLinks bind to; empty: 127.0.0.1 when every host is loopback, else
    # 0.0.0.0 (all interfaces).
    bind_host: str = ""
    cert_days: int = 825
    # The edges an END device may attach to: "mobility" = its home cell plus the cells the
    # topology's mobility model can move it to; "all" = every neighbourhood cell.
    candidate_cells: str = "mobility"


@dataclass
class Node:
    name: str
    role: str  # cloud | edge | end
    cell: str | None = None
    client_id: int | None = None
    profile: str | None = None
    superlink_port: int | None = None  # this node's own SuperLink (cloud, edge)
    hosts: list[str] = field(default_factory=list)
    upstream: str | None = None  # node whose SuperLink this node's SuperNode joins
    runtime_port: int | None = None
    children: list[str] = field(default_factory=list)  # SuperNodes this node's SuperLink registers
    candidates: list[str] = field(default_factory=list)  # END: the neighbourhood cells it may attach to, home first


def edge_name(cell: str) -> str:
    return f"edge-{cell}"


def end_name(client: int) -> str:
    return f"end-{client}"


def layout(cfg: FedLoraConfig, settings: DeploySettings) -> dict[str, Node]:
    """The machines of a deployment and who connects to whom (pure: no files)."""
    _check_settings(settings)
    tree = resolve_run(cfg).tree  # ConfigError for a run that cannot be summed securely
    if settings.candidate_cells == "all" and not tracks_devices(tree):
        raise PlanError("--candidate-cells all lets devices move between edges, which the cloud follows only under a "
                        "mobility model on a tree: set topology.mobility.model=random_walk (or trace) with the plan")
    nodes: dict[str, Node] = {CLOUD: Node(CLOUD, "cloud", CLOUD, superlink_port=settings.base_port,
                                          hosts=list(settings.cloud_hosts))}
    edges = tree.tier("neighbourhood") if tree.kind == "tree" else []
    unknown = set(settings.edge_hosts) - set(edges)
    if unknown:
        raise PlanError(f"--edge-host names unknown cell(s) {sorted(unknown)}; the topology's neighbourhood cells are: "
                        f"{', '.join(edges) or '(none: topology.kind=flat)'}")
    runtime = iter(range(settings.runtime_port_base, settings.runtime_port_base + 100000))
    for i, cell in enumerate(edges):
        name = edge_name(cell)
        nodes[name] = Node(name, "edge", cell, superlink_port=settings.base_port + 1 + i,
                           hosts=list(settings.edge_hosts.get(cell) or LOOPBACK), upstream=CLOUD, runtime_port=next(runtime))
        nodes[CLOUD].children.append(name)
    for client in tree.clients:
        leaf = tree.initial[client]
        parent = edge_name(tree.neighbourhood_of(leaf)) if edges else CLOUD
        name = end_name(client)
        cells = _candidates(tree, client, settings.candidate_cells) if edges else []
        nodes[name] = Node(name, "end", leaf, client, tree.profile_of[client], upstream=parent, runtime_port=next(runtime),
                           candidates=cells)
        for cell in cells or [CLOUD]:  # every edge it may attach to admits its SuperNode key
            nodes[edge_name(cell) if edges else CLOUD].children.append(name)
    ports = ([n.superlink_port for n in nodes.values() if n.superlink_port]
             + [n.runtime_port for n in nodes.values() if n.runtime_port])
    if max(ports) > 65535:
        raise PlanError(f"ports run past 65535 (--base-port {settings.base_port}, --runtime-port-base "
                        f"{settings.runtime_port_base}, {len(nodes)} machines); choose lower bases")
    if len(set(ports)) != len(ports):
        raise PlanError(f"SuperLink ports ({settings.base_port}..) and SuperNode runtime ports "
                        f"({settings.runtime_port_base}..) overlap; move --runtime-port-base")
    return nodes


def _candidates(tree, client: int, which: str) -> list[str]:
    """The neighbourhood cells END ``client`` may attach to, home first (``--candidate-cells``)."""
    if which == "all":
        home = tree.neighbourhood_of(tree.initial[client])
        return [home] + [c for c in tree.tier("neighbourhood") if c != home]
    return candidate_cells(tree, client)


def _check_settings(s: DeploySettings) -> None:
    if not s.cloud_hosts:
        raise PlanError("--cloud-host: at least one host name or IP address is needed")
    for what, hosts in [("--cloud-host", s.cloud_hosts)] + [(f"--edge-host {c}", h) for c, h in s.edge_hosts.items()]:
        try:
            pki.san_entries(hosts)
        except ValueError as exc:
            raise PlanError(f"{what}: {exc}") from None
    for name in ("base_port", "runtime_port_base"):
        value = getattr(s, name)
        if not 1024 <= value <= 65535:
            raise PlanError(f"--{name.replace('_', '-')}={value} must be a port in 1024..65535")
    if s.cert_days < 1:
        raise PlanError(f"--cert-days={s.cert_days} must be >= 1")
    if s.candidate_cells not in ("mobility", "all"):
        raise PlanError(f"--candidate-cells={s.candidate_cells!r} is not one of: mobility, all")


def _check_stream_ports(cfg: FedLoraConfig, nodes: dict[str, Node]) -> None:
    """Split devices (train.mode split|auto) stream with their edge on its SuperLink port + 10000
    (fedlora/deploy/stream_protocol.py): every edge's must be a port."""
    from fedlora.deploy.stream_protocol import DEFAULT_PORT_OFFSET  # the stream's port rule, where a plan checks it

    if cfg.train.mode == "full":
        return
    for node in nodes.values():
        if node.role == "edge" and node.superlink_port + DEFAULT_PORT_OFFSET > 65535:
            raise PlanError(f"--base-port: edge {node.name}'s SuperLink port {node.superlink_port} + "
                            f"{DEFAULT_PORT_OFFSET} (its split stream's port, train.mode={cfg.train.mode}) is over "
                            f"65535; use a base port <= {65535 - DEFAULT_PORT_OFFSET - len(nodes)}")


def address(node: Node) -> str:
    host = node.hosts[0]
    return f"[{host}]:{node.superlink_port}" if ":" in host else f"{host}:{node.superlink_port}"


def write_plan(cfg: FedLoraConfig, out_dir: Path, settings: DeploySettings | None = None, *,
               overrides: list[str] | None = None) -> dict[str, Node]:
    """Write every machine's folder under ``out_dir`` (which must not exist or be empty)."""
    settings = settings or DeploySettings()
    nodes = layout(cfg, settings)
    _check_stream_ports(cfg, nodes)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PlanError(f"{out_dir} is not empty; a plan makes new keys, so it never writes over an old one")
    out_dir.mkdir(parents=True, exist_ok=True)

    ca = pki.make_ca(days=max(settings.cert_days, 3650))
    pki.write_private(out_dir / "_ca" / "ca.key", pki.key_pem(ca.key))
    pki.write_public(out_dir / "_ca" / CA_CERT, pki.cert_pem(ca.cert))

    supernode_pub: dict[str, bytes] = {}
    identities: dict[str, bytes] = {}
    for node in nodes.values():
        folder = out_dir / node.name
        pki.write_public(folder / CA_CERT, pki.cert_pem(ca.cert))
        if node.superlink_port:
            # Loopback too: the machine's own `flwr` CLI (runs, registration) reaches it there.
            sans = node.hosts + [h for h in LOOPBACK if h not in node.hosts]
            server = pki.issue_server_cert(ca, f"{node.name} SuperLink", sans, settings.cert_days)
            pki.write_private(folder / SERVER_KEY, pki.key_pem(server.key))
            pki.write_public(folder / SERVER_CERT, pki.cert_pem(server.cert))
        if node.upstream:
            key = pki.make_supernode_key()
            pki.write_private(folder / SUPERNODE_KEY, pki.ssh_private(key))
            supernode_pub[node.name] = pki.ssh_public(key, node.name)
            pki.write_public(folder / SUPERNODE_PUB, supernode_pub[node.name])
        identity = pki.make_identity_key()
        pki.write_private(folder / IDENTITY_KEY, pki.key_pem(identity))
        identities[node.name] = identity.public_key().public_bytes_raw()

    registry = registry_document(identities, nodes)
    for node in nodes.values():
        folder = out_dir / node.name
        pki.write_public(folder / REGISTRY_FILE, json.dumps(registry, indent=2).encode() + b"\n")
        for child in node.children:
            pki.write_public(folder / SUPERNODES_DIR / f"{child}.pub", supernode_pub[child])
        save_yaml(cfg, folder / "config.yaml")
        _write_yaml(folder / "node.yaml", node_document(node, nodes, cfg, overrides or [], bind_host(node, settings)))
        _write_scripts(folder, node)
        if node.role == "end":
            (folder / DATA_DIR).mkdir(exist_ok=True)
            (folder / DATA_DIR / "README.txt").write_text(DATA_README)

    manifest = {
        "nodes": {n.name: {"role": n.role, "cell": n.cell, "upstream": n.upstream, "children": n.children,
                           "address": address(n) if n.superlink_port else None,
                           **({"candidate_cells": n.candidates} if len(n.candidates) > 1 else {})}
                  for n in nodes.values()},
        "ca_fingerprint_sha256": ca.cert.fingerprint(pki.hashes.SHA256()).hex(),
        "overrides": list(overrides or []),
    }
    (out_dir / "plan.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return nodes


def registry_document(identities: dict[str, bytes], nodes: dict[str, Node]) -> dict:
    """The public secure-aggregation registry: device id (= folder/SuperNode name) -> key."""
    return {
        "format": REGISTRY_FORMAT,
        "devices": {name: {"role": nodes[name].role, "ed25519_public_key": base64.b64encode(pub).decode()}
                    for name, pub in sorted(identities.items())},
    }


def node_document(node: Node, nodes: dict[str, Node], cfg: FedLoraConfig, overrides: list[str], bind: str) -> dict:
    """``node.yaml``: what this machine is and where its files are (paths relative to it)."""
    doc: dict = {"name": node.name, "role": node.role, "cell": node.cell, "fedlora_overrides": overrides,
                 "config": "config.yaml", "ca_cert": CA_CERT, "secagg": {"identity_key": IDENTITY_KEY,
                                                                           "registry": REGISTRY_FILE}}
    if node.superlink_port:
        doc["superlink"] = {"address": address(node), "hosts": node.hosts, "listen": f"{bind}:{node.superlink_port}",
                            "cert": SERVER_CERT, "key": SERVER_KEY, "supernode_auth": True,
                            "registered_supernodes": {c: f"{SUPERNODES_DIR}/{c}.pub" for c in node.children}}
    if node.upstream:
        doc["supernode"] = {"superlink": address(nodes[node.upstream]), "upstream": node.upstream,
                            "auth_private_key": SUPERNODE_KEY, "auth_public_key": SUPERNODE_PUB,
                            "runtime_port": node.runtime_port}
    if node.role == "end":
        profile = cfg.topology.profiles.get(node.profile) if node.profile else None
        doc.update(partition_id=node.client_id, num_partitions=cfg.federation.num_clients,
                   device_profile=node.profile, data_path=DATA_DIR,
                   device_profile_settings=dict(vars(profile)) if profile else None)
        if node.candidates:  # the edges it may attach to (one at a time; all trust the plan's CA, ca.pem)
            doc["candidate_cells"] = {c: {"edge": edge_name(c), "superlink": address(nodes[edge_name(c)])}
                                      for c in node.candidates}
    return doc


def _write_yaml(path: Path, doc: dict) -> None:
    path.write_text("# Generated by `fedlora deploy plan`; paths are relative to this folder.\n"
                    + yaml.safe_dump(doc, sort_keys=False))


def bind_host(node: Node, settings: DeploySettings) -> str:
    if settings.bind_host:
        return settings.bind_host
    return "127.0.0.1" if all(h in LOOPBACK or h == "::1" for h in node.hosts) else "0.0.0.0"


def _write_scripts(folder: Path, node: Node) -> None:
    """``start.sh`` (``fedlora cloud|edge|client --config .``), a systemd unit and ``install.sh``."""
    pki.write_public(folder / "start.sh", commands.start_script(commands.role_argv(node.role)).encode(), 0o755)
    unit = f"fedlora-{node.name}.service"
    pki.write_public(folder / unit, commands.systemd_unit(f"fedlora {node.role} {node.name}").encode())
    pki.write_public(folder / "install.sh", commands.install_script(unit).encode(), 0o755)


@dataclass(frozen=True)
class NodeFolder:
    """One machine's folder of a plan, as ``fedlora cloud|edge|client --config`` read it."""

    folder: Path  # absolute
    doc: dict

    @property
    def name(self) -> str:
        return str(self.doc["name"])

    @property
    def role(self) -> str:
        return str(self.doc["role"])

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def config(self) -> FedLoraConfig:
        """The federation's config. An END device does not look for the files it names (the federation's
        data, a local model folder, the mobility trace): what it reads it checks where it reads it."""
        path = self.folder / str(self.doc.get("config", "config.yaml"))
        return load_yaml(path, files=self.role != "end")

    def data_file(self) -> str:
        """The device's own data file in ``data/`` ("" when there is none: demo partition)."""
        from fedlora.data.files import FILE_BUILDERS  # fedlora.data imports torch; only an END device's folder has data

        folder = self.folder / str(self.doc.get("data_path", DATA_DIR))
        files = (sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS)
                 if folder.is_dir() else [])
        if len(files) > 1:
            raise PlanError(f"{folder} holds {len(files)} data files ({', '.join(p.name for p in files)}); keep one")
        return str(files[0]) if files else ""

    def identities(self) -> PlannedIdentities:
        """This machine's secure-aggregation keys: its own identity key and the plan's registry."""
        try:
            key = IdentityKey(pki.load_pem_key(self.folder / IDENTITY_KEY))
        except (OSError, ValueError, TypeError) as exc:
            raise IdentityError(f"cannot load this node's identity key {self.folder / IDENTITY_KEY}: {exc}") from None
        return PlannedIdentities(protocol_id(self.name), key, read_registry(self.folder / REGISTRY_FILE))


def read_node(folder: Path | str, role: str | None = None) -> NodeFolder:
    """A plan's node folder; :class:`PlanError` when it is not one (or not of ``role``)."""
    folder = Path(folder).expanduser().resolve()
    try:
        doc = yaml.safe_load((folder / "node.yaml").read_text())
    except OSError:
        raise PlanError(f"{folder} is not a node folder of a deployment plan (no node.yaml); "
                        "make one with `fedlora deploy plan OUT_DIR` and copy its folder here") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PlanError(f"{folder / 'node.yaml'} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or "name" not in doc or doc.get("role") not in ("cloud", "edge", "end"):
        raise PlanError(f"{folder / 'node.yaml'} has no name and role (cloud, edge or end)")
    node = NodeFolder(folder, doc)
    if role is not None and node.role != role:
        command = commands.role_argv(node.role)[1]
        raise PlanError(f"{folder} is the folder of {node.name} (role {node.role}); start it with "
                        f"`fedlora {command} --config {folder}`")
    for key in [CA_CERT, IDENTITY_KEY, REGISTRY_FILE]:
        if not (folder / key).is_file():
            raise PlanError(f"{folder} lacks {key}; copy the whole folder from the plan")
    return node


def protocol_id(name: str) -> str:
    """A plan's node name as the secure protocol names it: ``cloud``, ``end-3`` ->
    ``device-3``, ``edge-<cell>`` -> ``aggregator/<cell>``."""
    if name == "cloud":
        return CLOUD_ID
    if name.startswith("end-") and name[4:].isdigit():
        return device_id(int(name[4:]))
    if name.startswith("edge-") and len(name) > 5:
        return aggregator_id(name[5:])
    raise IdentityError(f"registry entry {name!r} is not a node name of a plan (cloud, edge-<cell>, end-<n>)")


def read_registry(path: Path) -> dict[str, bytes]:
    """A plan's ``secagg_registry.json`` as {protocol id: Ed25519 public key}."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read the secure-aggregation registry {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != REGISTRY_FORMAT or not isinstance(doc.get("devices"), dict):
        raise IdentityError(f"{path} is not a fedlora secure-aggregation registry (format {REGISTRY_FORMAT})")
    keys = {}
    for name, entry in doc["devices"].items():
        try:
            key = base64.b64decode(entry["ed25519_public_key"], validate=True)
        except (KeyError, TypeError, ValueError):
            key = b""
        if len(key) != 32:
            raise IdentityError(f"{path}: entry {name!r} has no valid 32-byte Ed25519 public key")
        keys[protocol_id(name)] = key
    return keys
