"""`fedlora deploy plan`: key material, folders and registries (pure: files only, no sockets)."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.config import compose
from fedlora.deploy import pki
from fedlora.deploy.plan import (
    CA_CERT,
    IDENTITY_KEY,
    REGISTRY_FILE,
    SERVER_CERT,
    SERVER_KEY,
    SUPERNODE_KEY,
    SUPERNODE_PUB,
    DeploySettings,
    PlanError,
    layout,
    protocol_id,
    read_node,
    read_registry,
    write_plan,
)
from fedlora.deploy.processes import Security
from fedlora.secure.identities import IdentityError
from fedlora.secure.keys import DeviceRegistry
from fedlora.world.topology import build_tree


@pytest.fixture(scope="module")
def cfg():
    return compose(["model=tiny", "federation.num_clients=6"])  # small6g: 4 neighbourhood cells


@pytest.fixture(scope="module")
def plan(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "deploy"
    settings = DeploySettings(cloud_hosts=["10.0.0.1", "cloud.example.org"],
                              edge_hosts={"neighbourhood-0-0": ["10.1.0.1", "edge00.example.org"]})
    nodes = write_plan(cfg, out, settings, overrides=["model=tiny", "federation.num_clients=6"])
    return out, nodes


def _private_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_every_machine_has_a_folder(plan, cfg):
    out, nodes = plan
    tree = build_tree(cfg.topology, cfg.federation.num_clients, cfg.seed)
    assert {p.name for p in out.iterdir()} == {"_ca", "plan.json"} | set(nodes)
    assert sorted(n for n in nodes if n.startswith("end-")) == sorted(f"end-{c}" for c in tree.clients)
    assert sorted(n for n in nodes if n.startswith("edge-")) == [f"edge-{c}" for c in tree.tier("neighbourhood")]
    for c in tree.clients:
        doc = yaml.safe_load((out / f"end-{c}" / "node.yaml").read_text())
        assert doc["partition_id"] == c and doc["num_partitions"] == 6
        assert doc["cell"] == tree.initial[c] and doc["device_profile"] == tree.profile_of[c]
        assert doc["supernode"]["upstream"] == f"edge-{tree.neighbourhood_of(tree.initial[c])}"
        assert (out / f"end-{c}" / doc["data_path"]).is_dir()
        assert "exec fedlora client --config ." in (out / f"end-{c}" / "start.sh").read_text()
        # What the launcher starts: TLS with the plan's CA, node auth with this folder's key.
        node = read_node(out / f"end-{c}", "end")
        argv = Security.from_node(node).supernode_argv(doc["supernode"]["superlink"], {"partition-id": c}, 9999)
        assert argv[argv.index("--root-certificates") + 1] == str(node.folder / "ca.pem")
        assert argv[argv.index("--auth-supernode-private-key") + 1] == str(node.folder / SUPERNODE_KEY)
        assert "--insecure" not in argv and f"partition-id={c}" in argv[argv.index("--node-config") + 1]


def test_certificate_chain_and_sans(plan):
    out, nodes = plan
    ca = pki.load_cert(out / "_ca" / CA_CERT)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name, node in nodes.items():
        assert (out / name / CA_CERT).read_bytes() == (out / "_ca" / CA_CERT).read_bytes()
        if node.role == "end":
            assert not (out / name / SERVER_CERT).exists()
            continue
        cert = pki.load_cert(out / name / SERVER_CERT)
        pki.verify_issued_by(cert, ca)
        key = pki.load_pem_key(out / name / SERVER_KEY)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert (sorted(pki.cert_hosts(pki.load_cert(out / "cloud" / SERVER_CERT)))
            == ["10.0.0.1", "127.0.0.1", "cloud.example.org", "localhost"])
    assert (sorted(pki.cert_hosts(pki.load_cert(out / "edge-neighbourhood-0-0" / SERVER_CERT)))
            == ["10.1.0.1", "127.0.0.1", "edge00.example.org", "localhost"])
    assert sorted(pki.cert_hosts(pki.load_cert(out / "edge-neighbourhood-1-1" / SERVER_CERT))) == ["127.0.0.1", "localhost"]
    # A certificate from another CA does not verify against this one.
    other = pki.make_ca("other")
    stranger = pki.issue_server_cert(other, "x", ["127.0.0.1"])
    with pytest.raises(ValueError):  # cryptography: the issuer does not match the CA's subject
        pki.verify_issued_by(stranger.cert, ca)


def test_private_keys_only_with_their_owner_and_mode_0600(plan):
    out, nodes = plan
    seen: dict[bytes, Path] = {}
    for name in nodes:
        for path in _private_files(out / name):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert path.read_bytes() not in seen, f"{path} duplicates {seen.get(path.read_bytes())}"
            seen[path.read_bytes()] = path
    ca_key = (out / "_ca" / "ca.key")
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600
    assert ca_key.read_bytes() not in seen  # the CA key is in no machine's folder
    expected = {"cloud": {SERVER_KEY, IDENTITY_KEY}, "edge": {SERVER_KEY, SUPERNODE_KEY, IDENTITY_KEY},
                "end": {SUPERNODE_KEY, IDENTITY_KEY}}
    for name, node in nodes.items():
        assert {str(p.relative_to(out / name)) for p in _private_files(out / name)} == expected[node.role], name


def test_supernode_keys_are_what_flower_loads_and_registries_match(plan):
    out, nodes = plan
    for name, node in nodes.items():
        if node.upstream is None:
            continue
        private = serialization.load_ssh_private_key((out / name / SUPERNODE_KEY).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        # The upstream SuperLink's folder registers exactly this public key under this name.
        registered = out / node.upstream / "supernodes" / f"{name}.pub"
        assert registered.read_bytes() == (out / name / SUPERNODE_PUB).read_bytes()
        public = serialization.load_ssh_public_key(registered.read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        upstream = yaml.safe_load((out / node.upstream / "node.yaml").read_text())
        assert upstream["superlink"]["registered_supernodes"][name] == f"supernodes/{name}.pub"
    for name, node in nodes.items():
        listed = {p.stem for p in (out / name / "supernodes").glob("*.pub")} if node.superlink_port else set()
        assert listed == set(node.children)
    assert set(nodes["cloud"].children) == {n for n in nodes if n.startswith("edge-")}


def test_secagg_registry_consistent(plan):
    out, nodes = plan
    registry = read_registry(out / "cloud" / REGISTRY_FILE)
    # Same machines as the SuperNode lists and folders, under the protocol's names.
    assert set(registry) == {protocol_id(n) for n in nodes}
    assert {protocol_id(n) for n in nodes} >= {"cloud", "device-0", "aggregator/neighbourhood-0-0"}
    for name in nodes:
        assert (out / name / REGISTRY_FILE).read_bytes() == (out / "cloud" / REGISTRY_FILE).read_bytes()
        ids = read_node(out / name).identities()  # checks its key is the registry's
        me = ids.own(protocol_id(name))
        message = b"masked update of " + name.encode()
        DeviceRegistry(registry).check(protocol_id(name), message, me.sign(message), "test message")
        with pytest.raises(IdentityError):
            ids.own("cloud" if name != "cloud" else "device-0")  # nobody holds another machine's key
    doc = json.loads((out / "cloud" / REGISTRY_FILE).read_text())
    assert all(len(base64.b64decode(d["ed25519_public_key"])) == 32 for d in doc["devices"].values())


def test_long_lived_hosts_get_systemd_units(plan):
    out, nodes = plan
    for name, node in nodes.items():
        units = list((out / name).glob("*.service"))
        assert [u.name for u in units] == [f"fedlora-{name}.service"]
        assert "ExecStart=/bin/sh @FOLDER@/start.sh" in units[0].read_text()
        role = {"cloud": "cloud", "edge": "edge", "end": "client"}[node.role]
        assert f"exec fedlora {role} --config ." in (out / name / "start.sh").read_text()
    edge = read_node(out / "edge-neighbourhood-0-0", "edge")
    host, _, port = edge.doc["superlink"]["listen"].rpartition(":")
    assert host == "0.0.0.0"  # a non-loopback host: bind every interface
    argv = Security.from_node(edge).superlink_argv(host, int(port))
    assert "--enable-supernode-auth" in argv and argv[argv.index("--ssl-certfile") + 1] == str(edge.path(SERVER_CERT))
    assert "--insecure" not in argv
    assert dict(Security.from_node(edge).supernodes) == {c: edge.path(f"supernodes/{c}.pub")
                                                         for c in nodes["edge-neighbourhood-0-0"].children}
    assert read_node(out / "edge-neighbourhood-1-1").doc["superlink"]["listen"].startswith("127.0.0.1:")
    with pytest.raises(PlanError, match="start it with `fedlora client --config"):
        read_node(out / "end-0", "edge")


def test_flat_topology_registers_ends_at_the_cloud(tmp_path):
    cfg = compose(["model=tiny", "topology=flat", "federation.num_clients=3", "federation.min_clients=1"])
    nodes = write_plan(cfg, tmp_path / "p")
    assert set(nodes) == {"cloud", "end-0", "end-1", "end-2"}
    assert sorted(p.stem for p in (tmp_path / "p" / "cloud" / "supernodes").glob("*.pub")) == ["end-0", "end-1", "end-2"]


def test_bad_input_is_a_clear_error(cfg, tmp_path):
    with pytest.raises(PlanError, match="--edge-host names unknown cell"):
        layout(cfg, DeploySettings(edge_hosts={"neighbourhood-9-9": ["10.0.0.9"]}))
    with pytest.raises(PlanError, match="--cloud-host"):
        layout(cfg, DeploySettings(cloud_hosts=["not a host"]))
    with pytest.raises(PlanError, match="--base-port"):
        layout(cfg, DeploySettings(base_port=80))
    with pytest.raises(PlanError, match="overlap"):
        layout(cfg, DeploySettings(base_port=9300, runtime_port_base=9302))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("keep me")
    with pytest.raises(PlanError, match="not empty"):
        write_plan(cfg, tmp_path / "old")
    assert (tmp_path / "old" / "x").read_text() == "keep me"


def test_cli_plan_and_its_errors(tmp_path, capsys):
    from fedlora.cli import main

    main(["deploy", "plan", str(tmp_path / "p"), "model=tiny", "topology=flat", "federation.num_clients=2",
          "federation.min_clients=1", "--cloud-host", "10.9.8.7"])
    assert "1 cloud, 0 edge, 2 END folders" in capsys.readouterr().out
    # Loopback too: the cloud's own flwr CLI reaches its SuperLink there.
    assert pki.cert_hosts(pki.load_cert(tmp_path / "p" / "cloud" / SERVER_CERT)) == ["10.9.8.7", "127.0.0.1", "localhost"]
    assert "exec fedlora client --config ." in (tmp_path / "p" / "end-0" / "start.sh").read_text()
    for argv, message in [
        (["deploy", "plan", str(tmp_path / "p"), "model=tiny"], "not empty"),
        (["deploy", "plan", str(tmp_path / "q"), "model=tiny", "--edge-host", "nowhere=1.2.3.4"], "unknown cell"),
        (["deploy", "frobnicate"], "usage: fedlora deploy"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_planned_identities_run_a_secure_round_and_refuse_a_seed_derived_key(tmp_path):
    """Cloud, edges and devices each hold only their own plan key: a secure round works, and a
    device signing with the key derived from the run seed (what simulation uses; anyone who
    knows the seed has it) is refused by its cell, whose session completes without it."""
    from fedlora.roles.cloud import run_federation
    from fedlora.roles.local import InProcessTransport, LocalCellRunner
    from fedlora.roles.neighbourhood import AggregatorKeys, run_cells
    from fedlora.secure.identities import SimulatedIdentities

    cfg = compose(["model=tiny", "topology=small6g", "topology.suburban_cells=1", "topology.neighbourhoods_per_suburban=2",
                   "topology.mobility.model=none", "topology.profiles.phone.availability=1.0", "privacy=secagg",
                   "federation.num_clients=6", "federation.fraction=1.0", "federation.rounds=1", "train.local_steps=1",
                   "train.max_seq_len=64", "data.records_per_client=8", "data.max_eval_examples=4", "progress=false"])
    nodes = write_plan(cfg, tmp_path / "plan")
    ids = {name: read_node(tmp_path / "plan" / name).identities() for name in nodes}
    impostor = 5

    class SeedKey(SimulatedIdentities):  # the plan's registry and randomness, but the seed's key
        def public(self, uid):
            return ids[f"end-{impostor}"].public(uid)

    def device(c):
        return SeedKey(cfg.seed) if c == impostor else ids[f"end-{c}"]

    class Edges(LocalCellRunner):  # each cell aggregated with its own edge's key
        def run(self, requests, *, late=None, on_reply=None, keys=None):
            return [run_cells([r], self.transport, late=late, on_reply=on_reply,
                              keys=AggregatorKeys.of(ids[f"edge-{r.cell}"]))[0] for r in requests]

    transport = InProcessTransport(6, identities=device)
    run_federation(cfg, tmp_path / "run", transport, runner=Edges(transport), identities=ids["cloud"])
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert record["participants"] == [c for c in range(6) if c != impostor]
    assert [d["client"] for d in record["dropped"]] == [impostor]
    assert all(c["ok"] for c in record["secure"]["cells"].values()), record["secure"]
    with pytest.raises(IdentityError, match="holds no key"):
        AggregatorKeys.of(ids["edge-neighbourhood-0-0"]).identity("aggregator/neighbourhood-0-1")
