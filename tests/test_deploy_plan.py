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
from fedlora.deploy.plan import (CA_CERT, IDENTITY_KEY, REGISTRY_FILE, SERVER_CERT, SERVER_KEY, SUPERNODE_KEY,
                                 SUPERNODE_PUB, DeploySettings, PlanError, layout, load_identity, load_registry,
                                 write_plan)
from fedlora.topology import build_tree


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
        start = (out / f"end-{c}" / "start.sh").read_text()
        assert f"partition-id={c}" in start and "--root-certificates ca.pem" in start
        assert "--auth-supernode-private-key auth/supernode_key" in start


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
    assert sorted(pki.cert_hosts(pki.load_cert(out / "cloud" / SERVER_CERT))) == ["10.0.0.1", "cloud.example.org"]
    assert sorted(pki.cert_hosts(pki.load_cert(out / "edge-neighbourhood-0-0" / SERVER_CERT))) == ["10.1.0.1", "edge00.example.org"]
    assert sorted(pki.cert_hosts(pki.load_cert(out / "edge-neighbourhood-1-1" / SERVER_CERT))) == ["127.0.0.1", "localhost"]
    # A certificate from another CA does not verify against this one.
    other = pki.make_ca("other")
    stranger = pki.issue_server_cert(other, "x", ["127.0.0.1"])
    with pytest.raises(Exception):
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
        assert f"supernodes/{name}.pub" in (out / node.upstream / "register_supernodes.sh").read_text()
    for name, node in nodes.items():
        listed = {p.stem for p in (out / name / "supernodes").glob("*.pub")} if node.superlink_port else set()
        assert listed == set(node.children)
    assert set(nodes["cloud"].children) == {n for n in nodes if n.startswith("edge-")}


def test_secagg_registry_consistent(plan):
    out, nodes = plan
    registry = load_registry(out / "cloud" / REGISTRY_FILE)
    assert set(registry) == set(nodes)  # same names as the SuperNode lists and folders
    for name in nodes:
        assert (out / name / REGISTRY_FILE).read_bytes() == (out / "cloud" / REGISTRY_FILE).read_bytes()
        identity = load_identity(out / name)
        assert identity.public_bytes == registry.public_key(name)
        message = b"masked update of " + name.encode()
        registry.check(name, message, identity.sign(message), "test message")
    doc = json.loads((out / "cloud" / REGISTRY_FILE).read_text())
    assert all(len(base64.b64decode(d["ed25519_public_key"])) == 32 for d in doc["devices"].values())


def test_long_lived_hosts_get_systemd_units(plan):
    out, nodes = plan
    cloud_units = list((out / "cloud").glob("*.service"))
    assert [u.name for u in cloud_units] == ["fedlora-cloud-superlink.service"]
    text = cloud_units[0].read_text()
    assert "ExecStart=/bin/sh @FOLDER@/start.sh superlink" in text and "register_supernodes.sh" in text
    edge = out / "edge-neighbourhood-0-0"
    assert {u.name for u in edge.glob("*.service")} == {"fedlora-edge-neighbourhood-0-0-superlink.service",
                                                      "fedlora-edge-neighbourhood-0-0-supernode.service"}
    start = (edge / "start.sh").read_text()
    assert "--enable-supernode-auth" in start and "--ssl-certfile tls/server.pem" in start
    assert "--host 0.0.0.0" in start  # a non-loopback host: bind every interface
    assert "--host 127.0.0.1" in (out / "edge-neighbourhood-1-1" / "start.sh").read_text()
    assert not list((out / "end-0").glob("*.service"))


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
    assert pki.cert_hosts(pki.load_cert(tmp_path / "p" / "cloud" / SERVER_CERT)) == ["10.9.8.7"]
    assert "sh ./start.sh supernode &" in (tmp_path / "p" / "end-0" / "start.sh").read_text()
    for argv, message in [
        (["deploy", "plan", str(tmp_path / "p"), "model=tiny"], "not empty"),
        (["deploy", "plan", str(tmp_path / "q"), "model=tiny", "--edge-host", "nowhere=1.2.3.4"], "unknown cell"),
        (["deploy", "frobnicate"], "usage: fedlora deploy"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
