"""The warm device's local channel and request handling, without Flower.

- the request/reply codec (fedlora.wire, never pickle) round-trips and refuses malformed frames;
- the socket is 0600 in a 0700 folder; a client refuses a socket others could open or replace,
  or that is no socket at all; a missing one is "not running", not "unsafe";
- over a real Unix socket: a reply, an error reply (the device's reason), a resident process
  that dies mid-request or never answers -- each a ChannelError within the call's timeout, and
  the server goes on serving the next request;
- :class:`WarmDevice` with the tiny model: two rounds in one process build the model once and
  train exactly what :func:`train_round` trains; a later secure stage without its session state
  is refused and leaves the state alone.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora import protocol, wire
from fedlora.deploy import channel
from fedlora.deploy.channel import ChannelError, UnsafeChannel


@pytest.fixture
def short_dir():
    """A short folder (a Unix socket path holds ~100 bytes; pytest's tmp_path can be longer)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="fl-ch-", dir="/tmp"))
    yield base
    for p in sorted(base.rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() else p.rmdir()
    base.rmdir()


def test_codec_round_trip_and_refusals():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    doc = channel.decode_request(channel.encode_request("secagg", "{}", arrays, run=7, stage="advertise", round=2,
                                                        payload=b"\x00\x01"))
    assert doc["kind"] == "secagg" and doc["run"] == 7 and doc["round"] == 2 and doc["payload"] == b"\x00\x01"
    assert np.array_equal(doc["arrays"]["a"], arrays["a"])
    reply = channel.decode_reply(channel.encode_reply({"reply": b"r", "metrics": {"train_seconds": 1.5},
                                                       "stats": {"model_builds": 1}}))
    assert reply["reply"] == b"r" and reply["arrays"] is None and reply["metrics"] == {"train_seconds": 1.5}
    with pytest.raises(ChannelError, match="StaleSessionState: no state"):
        channel.decode_reply(channel.encode_reply(error="StaleSessionState: no state"))
    with pytest.raises(wire.WireError, match="fields"):
        channel.decode_request(wire.dumps({"kind": "train"}, channel.REQUEST))
    with pytest.raises(wire.WireError, match="'run' must be a int"):
        channel.decode_request(wire.dumps({"kind": "train", "settings": "", "arrays": None, "run": "7", "stage": "",
                                           "round": 0, "payload": b"", "split": ""}, channel.REQUEST))
    with pytest.raises(wire.WireError, match="'split' must be a str"):
        channel.decode_request(wire.dumps({"kind": "train", "settings": "", "arrays": None, "run": 7, "stage": "",
                                           "round": 0, "payload": b"", "split": 1}, channel.REQUEST))
    assert channel.decode_request(channel.encode_request("train", "{}", None, split='{"k": 1}'))["split"] == '{"k": 1}'
    with pytest.raises(wire.WireError, match="arrays"):
        channel.decode_request(channel.encode_request("train", "{}", {"a": [1, 2]}))  # type: ignore[dict-item]
    with pytest.raises(wire.WireError, match="expected a device-reply"):
        channel.decode_reply(channel.encode_request("train", "{}", None))


def test_socket_permissions(short_dir):
    path = short_dir / "state" / "device.sock"
    listener = channel.listen(path)
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
        channel.check_private(path)
        os.chmod(path, 0o666)
        with pytest.raises(UnsafeChannel, match="mode 666"):
            channel.check_private(path)
        os.chmod(path, 0o600)
        os.chmod(path.parent, 0o777)
        with pytest.raises(UnsafeChannel, match="writable by others"):
            channel.check_private(path)
        os.chmod(path.parent, 0o700)
        with pytest.raises(UnsafeChannel, match="refusing"):  # an unsafe socket is refused at once, not waited for
            channel.call(path.parent, b"", timeout_s=5)
    finally:
        listener.close()
    plain = short_dir / "state" / "not.sock"
    plain.write_bytes(b"")
    with pytest.raises(UnsafeChannel, match="not a socket"):
        channel.check_private(plain)
    missing = short_dir / "state" / "gone.sock"
    with pytest.raises(ChannelError, match="does not exist") as err:
        channel.check_private(missing)
    assert not isinstance(err.value, UnsafeChannel)
    with pytest.raises(ChannelError, match="too long"):
        channel.socket_path("/tmp/" + "x" * 100)


def _server(path: Path, handle, stop: threading.Event) -> threading.Thread:
    listener = channel.listen(path)

    def run():
        try:
            channel.serve(listener, handle, stopping=stop.is_set, idle_s=0.1)
        finally:
            listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_call_reply_error_and_timeout(short_dir):
    path = short_dir / "state" / "device.sock"
    stop = threading.Event()
    seen = []

    def handle(request):
        seen.append(request["kind"])
        if request["kind"] == "fail":
            raise ValueError("this device cannot")
        if request["kind"] == "slow":
            time.sleep(2.0)
        return {"arrays": request["arrays"], "metrics": {"n": 1.0}, "stats": {"requests": len(seen)}}

    thread = _server(path, handle, stop)
    try:
        arrays = {"x": np.ones(3, dtype=np.float32)}
        answer = channel.call(path, channel.encode_request("train", "{}", arrays), timeout_s=10)
        assert np.array_equal(answer["arrays"]["x"], arrays["x"]) and answer["stats"] == {"requests": 1}
        with pytest.raises(ChannelError, match="ValueError: this device cannot"):
            channel.call(path, channel.encode_request("fail", "{}", None), timeout_s=10)
        t0 = time.monotonic()
        with pytest.raises(ChannelError, match="within 1s"):
            channel.call(path, channel.encode_request("slow", "{}", None), timeout_s=1.0)
        assert time.monotonic() - t0 < 1.8
        with pytest.raises(ChannelError, match="malformed"):  # a frame that is no request: an error reply, server lives
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            channel.send_frame(sock, b"garbage")
            channel.decode_reply(channel.recv_frame(sock))
        sock.close()
        answer = channel.call(path, channel.encode_request("train", "{}", None), timeout_s=10)  # still serving
        assert seen == ["train", "fail", "slow", "train"]
    finally:
        stop.set()
        thread.join(5)


def test_dead_or_absent_resident_is_an_error_within_the_timeout(short_dir):
    path = short_dir / "state" / "device.sock"
    listener = channel.listen(path)

    def die_mid_request():  # reads the request, then goes away without answering (SIGKILL-like)
        conn, _ = listener.accept()
        channel.recv_frame(conn)
        conn.close()

    thread = threading.Thread(target=die_mid_request, daemon=True)
    thread.start()
    with pytest.raises(ChannelError, match="closed the connection"):
        channel.call(path, channel.encode_request("train", "{}", None), timeout_s=10)
    thread.join(5)
    listener.close()
    path.unlink()
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match="cannot reach"):
        channel.call(path, channel.encode_request("train", "{}", None), timeout_s=10, connect_wait_s=0.5)
    assert time.monotonic() - t0 < 3


def test_a_restarted_resident_is_waited_for(short_dir):
    path = short_dir / "state" / "device.sock"
    stop = threading.Event()
    started = []

    def later():
        time.sleep(0.6)
        started.append(_server(path, lambda r: {"metrics": {}, "stats": {}}, stop))

    threading.Thread(target=later, daemon=True).start()
    try:
        answer = channel.call(path, channel.encode_request("train", "{}", None), timeout_s=10, connect_wait_s=5)
        assert answer["metrics"] == {}
    finally:
        stop.set()
        time.sleep(0.3)
        for thread in started:
            thread.join(5)


def test_warm_device_builds_once_and_trains_like_train_round(short_run):
    from fedlora.roles.device import StaleSessionState, initial_adapter, model_builds, train_round
    from fedlora.roles.warm_device import WarmDevice
    from fedlora.run_settings import resolve_run

    cfg = short_run("federation.num_clients=4")
    run = resolve_run(cfg)
    client = {"proximal_mu": 0.0, "freeze_a": False}
    device = WarmDevice(2)
    start = initial_adapter(cfg, freeze_a=False)
    trainable = {k: v for k, v in start.items() if "lora_B" in k or "lora_A" in k}
    builds = None
    for server_round in (1, 2):
        settings = run.round_settings(server_round, client)
        text = protocol.encode_settings(settings)
        request = channel.decode_request(channel.encode_request("train", text, trainable))
        answer = device.handle(request)
        builds = answer["stats"]["model_builds"] if builds is None else builds
        assert answer["stats"]["model_builds"] == builds == model_builds() and answer["stats"]["requests"] == server_round
        want, metrics = train_round(settings, trainable, 2)
        assert sorted(answer["arrays"]) == sorted(want)
        assert all(np.array_equal(answer["arrays"][k], want[k]) for k in want)
        assert answer["metrics"]["num_examples"] == metrics["num_examples"]
    assert model_builds() == builds  # the same model served every call
    stale = channel.decode_request(channel.encode_request("secagg", protocol.encode_settings(settings), None, run=1,
                                                          stage="share-keys", round=2))
    with pytest.raises(StaleSessionState, match="holds no"):
        device.handle(stale)
    assert device.secure is None and device.requests == 2
    with pytest.raises(ValueError, match="round 3 carries settings of round 2"):
        device.handle({**stale, "round": 3})
