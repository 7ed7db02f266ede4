"""``gateway channels``, ``gateway settle`` and configuration from the command
line: real data dirs, the real embedded node, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest_gateway import Viewer, node_rpc, ws_url

from gateway.cli import main
from gateway.config import Config, ConfigError
from gateway.lockfile import GATEWAY_LOCK, DataDirLock, lock_datadir


async def _session_with_payments(gw) -> Viewer:
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.play_and_pay("clip", chunks=8)
    await viewer.disconnect()
    await asyncio.sleep(0.2)
    return viewer


async def test_channels_lists_and_settle_needs_the_running_gateway(gateway_factory, capsys):
    gw = await gateway_factory(limits={"resume_grace_s": 3600})
    viewer = await _session_with_payments(gw)
    cid = viewer.channel.outpoint.channel_id
    paid = viewer.channel.paid
    datadir = str(gw.config.datadir)
    await gw.stop()
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["channels", "--datadir", datadir, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["channel_id"], c["state"], c["paid"]) for c in listed] == [(cid, "ready", paid)]
    assert await asyncio.to_thread(main, ["channels", "--datadir", datadir]) == 0
    assert cid in capsys.readouterr().out

    # The gateway is stopped: settling is its job once it runs again.
    assert await asyncio.to_thread(main, ["settle", "--datadir", datadir, cid]) == 1
    assert capsys.readouterr().err == (
        f"gateway: error: no running gateway for data dir {datadir} "
        "(start it with gateway serve)\n")
    assert await asyncio.to_thread(main, ["channels", "--datadir", datadir, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["state"] == "ready" and row["settle_txid"] is None


def _as_served(gw) -> DataDirLock:
    """Hold the data dir and write ``gateway.json`` as ``gateway serve`` does, so that
    ``gateway settle`` finds this in-process gateway."""
    lock = lock_datadir(gw.datadir, GATEWAY_LOCK, "gateway")
    (gw.datadir / "gateway.json").write_text(json.dumps({"pid": os.getpid(), **gw.urls()}))
    return lock


async def test_settle_asks_the_running_gateway(gateway_factory, capsys):
    gw = await gateway_factory(limits={"resume_grace_s": 3600})
    viewer = await _session_with_payments(gw)
    cid = viewer.channel.outpoint.channel_id
    capsys.readouterr()
    with _as_served(gw):
        assert await asyncio.to_thread(main, ["settle", "--datadir", str(gw.datadir),
                                              "ab" * 32 + ":0"]) == 1
        assert "no live channel" in capsys.readouterr().err
        code = await asyncio.to_thread(main, ["settle", "--datadir", str(gw.datadir)])
    assert code == 0
    out = capsys.readouterr().out
    assert cid in out and f"paid {viewer.channel.paid}" in out
    assert gw.channels[cid].core.settlement_txid is not None


async def test_settle_that_cannot_reach_the_node_is_a_one_line_error(gateway_factory, capsys):
    gw = await gateway_factory(limits={"resume_grace_s": 3600})
    viewer = await _session_with_payments(gw)
    cid = viewer.channel.outpoint.channel_id
    served = _as_served(gw)
    await gw.node.stop()  # the settlement cannot be broadcast
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["settle", "--datadir", str(gw.datadir), cid])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("gateway: error: settling failed: cannot connect")
    assert err.rstrip().endswith("; try again")

    # Every channel: each one that failed is listed, and the exit says so.
    code = await asyncio.to_thread(main, ["settle", "--datadir", str(gw.datadir)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.startswith(f"{cid}  failed: cannot connect")
    assert captured.err == (
        "gateway: error: 1 channel(s) not settled for want of the node; "
        "nothing is lost: run it again once the node answers\n"
    )
    served.release()
    state = gw.store.read("SELECT state FROM channels WHERE channel_id = ?", (cid,))
    assert state[0]["state"] in ("ready", "closing")  # still to settle, or stored to rebroadcast


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["channels", "--datadir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gateway: error:") and "\n" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text("port = 'eighty'\n")
    assert main(["channels", "--datadir", str(tmp_path), "--config", str(bad)]) == 1
    assert "port" in capsys.readouterr().err


def test_config_layers(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text("port = 9000\n[limits]\nresume_grace_s = 5\n")
    config = Config.load(path, {"PAYSTREAM_LIMITS_MIN_CONF": "2", "PAYSTREAM_HOST": "0.0.0.0"})
    assert (config.port, config.limits.resume_grace_s, config.limits.min_conf, config.host) == (
        9000, 5, 2, "0.0.0.0")
    path.write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match="nonsense"):
        Config.load(path, {})
    with pytest.raises(ConfigError, match="min_conf"):
        Config.load(None, {"PAYSTREAM_LIMITS_MIN_CONF": "many"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "99999999"], "port must be 0-65535"),
        (["--block-interval", "-1"], "block_interval must be >= 0 (0: blocks on request)"),
        (["--rpc-port", "70000"], "rpc_port must be 0-65535"),
        (["--workers", "0"], "workers must be 1-64"),
    ],
)
def test_serve_refuses_settings_out_of_range_before_starting(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--datadir", str(tmp_path / "d"), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"gateway: error: {message}"]
    assert not (tmp_path / "d" / "gateway.db").exists()  # nothing was started or written


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_that_cannot_start_says_why_in_one_line(tmp_path, workers):
    media = tmp_path / "media"
    media.mkdir()
    (media / "catalog.toml").write_text("[items.x]\ntitle = 3\n")
    base = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--rpc-port", "0",
            "--workers", workers]
    proc = subprocess.run([*base, "--datadir", str(tmp_path / "a"), "--media", str(media)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gateway: error: ") and "catalog.toml" in line
    # A failure inside a worker process (here: its master key cannot be read).
    datadir = tmp_path / "b"
    (datadir / "master.key").mkdir(parents=True)
    proc = subprocess.run([*base, "--datadir", str(datadir), "--media", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("gateway: error: cannot start: ")


def test_config_check_catches_inconsistent_limits():
    config = Config.load(None, {"PAYSTREAM_LIMITS_MIN_VALUE": "20000000"})
    with pytest.raises(ConfigError, match="min_value <= max_value"):
        config.check()
    Config.load(None, {}).check()  # the defaults are consistent


def test_channels_shows_a_channel_paid_down_to_zero_as_paid_in_full(tmp_path, capsys):
    """Issue 14 item 15: paid is value - balance; a balance of 0 is not "no balance"."""
    from gateway.ledger.store import connect, create_schema

    datadir = tmp_path / "gw"
    datadir.mkdir()
    conn = connect(datadir / "gateway.db")
    create_schema(conn)
    rows = [  # (id, value, balance): paid in full, partly, never (no increment yet)
        (1, 20_000, 0),
        (2, 20_000, 19_699),
        (3, 20_000, None),
    ]
    for row_id, value, balance in rows:
        conn.execute(
            "INSERT INTO channels(id, channel_id, kind, state, value, balance, seq) "
            "VALUES (?, ?, 'cltv', 'closing', ?, ?, ?)",
            (row_id, f"{row_id:064x}:0", value, balance, 0 if balance is None else 1),
        )
    conn.close()
    assert main(["channels", "--datadir", str(datadir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["id"], c["paid"]) for c in listed] == [(1, 20_000), (2, 301), (3, 0)]
    assert main(["channels", "--datadir", str(datadir)]) == 0
    table = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[5] for line in table] == ["20000", "301", "0"]


def test_the_players_environment_does_not_break_gateway_commands(tmp_path):
    """Issue 14 item 12: ``PAYSTREAM_PLAYER_DIR`` (the player's) is not a gateway setting."""
    assert Config.load(None, {"PAYSTREAM_PLAYER_DIR": str(tmp_path)}) == Config()
    env = {**os.environ, "PAYSTREAM_PLAYER_DIR": str(tmp_path / "player")}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--datadir", str(tmp_path / "d"),
         "--port", "99999999"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    # It gets as far as checking its own settings (and refuses the port, starting nothing).
    assert proc.stderr.strip().splitlines() == ["gateway: error: port must be 0-65535"]
    # Its own settings are still read from the environment.
    env["PAYSTREAM_PORT"] = "70000"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--datadir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.stderr.strip().splitlines() == ["gateway: error: port must be 0-65535"]
    assert not (tmp_path / "d").exists()


def _gateway_cli(*args: str, **options) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args],
                          capture_output=True, text=True, timeout=120, **options)


def _start_serve(datadir, media, *extra: str) -> subprocess.Popen:
    """``gateway serve`` on ports 0; returns once it wrote ``gateway.json``."""
    (datadir / "gateway.json").unlink(missing_ok=True)
    log = datadir.parent / "serve.log"
    with log.open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--datadir", str(datadir),
             "--port", "0", "--rpc-port", "0", "--block-interval", "0", "--media", str(media),
             *extra],
            stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while not (datadir / "gateway.json").exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_gateway_on_a_data_dir_in_use_says_so(tmp_path, media_copy, workers):
    """Issue 14 item 7: one line naming the gateway that holds the data dir, exit 1; a
    pid file left by a gateway killed with SIGKILL does not block a restart."""
    datadir = tmp_path / "gw"
    first = _start_serve(datadir, media_copy, "--workers", workers)
    try:
        for extra in ([], ["--demo"]):
            second = _gateway_cli("serve", "--datadir", str(datadir), "--port", "0",
                                  "--rpc-port", "0", "--media", str(media_copy), *extra)
            assert second.returncode == 1
            assert second.stderr.splitlines() == [
                f"gateway: error: data dir {datadir} is in use by another gateway "
                f"(pid {first.pid})"]
        # Its embedded node's data dir is held too: `gateway node` there says the same.
        node = _gateway_cli("node", "--datadir", str(datadir / "node"), "--rpc-port", "0")
        assert node.returncode == 1
        assert node.stderr.splitlines() == [
            f"gateway: error: data dir {datadir / 'node'} is in use by another gateway "
            f"(pid {first.pid})"]
        assert first.poll() is None  # the running one is untouched
    finally:
        first.kill()
        first.wait(timeout=30)
    if workers == "2":  # its workers exit once their supervisor is gone
        time.sleep(2)
    again = _start_serve(datadir, media_copy)
    again.send_signal(signal.SIGINT)
    assert again.wait(timeout=60) == 0


def test_a_second_node_on_a_data_dir_in_use_says_so(tmp_path):
    """Issue 14 item 7: `gateway node --datadir D` twice."""
    datadir = tmp_path / "node"
    log = tmp_path / "node.log"
    with log.open("w") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "node", "--datadir", str(datadir),
             "--rpc-port", "0"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "RPC URL" not in log.read_text():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = _gateway_cli("node", "--datadir", str(datadir), "--rpc-port", "0")
        assert second.returncode == 1
        assert second.stderr.splitlines() == [
            f"gateway: error: data dir {datadir} is in use by another node (pid {first.pid})"]
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 0


def test_settle_without_a_running_gateway_says_so_and_creates_nothing(tmp_path):
    """Issue 14 item 8: `gateway settle` only talks to a running gateway."""
    for args, shown in (([], "data"), (["--datadir", str(tmp_path / "gw")], tmp_path / "gw")):
        proc = _gateway_cli("settle", *args, cwd=tmp_path)
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [
            f"gateway: error: no running gateway for data dir {shown} "
            "(start it with gateway serve)"]
        assert list(tmp_path.iterdir()) == []  # no data dir, no chain
    # What a gateway that is gone leaves: its gateway.json (this pid is alive, but
    # it holds no gateway's lock).
    datadir = tmp_path / "gw"
    datadir.mkdir()
    (datadir / "gateway.json").write_text(json.dumps(
        {"pid": os.getpid(), "ws": "ws://127.0.0.1:9/paystream/2",
         "web": "http://127.0.0.1:9/"}))
    (datadir / "operator-token").write_text("token\n")
    proc = _gateway_cli("settle", "--datadir", str(datadir), "ab" * 32 + ":0")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"gateway: error: no running gateway for data dir {datadir} "
        "(start it with gateway serve)"]
    assert sorted(p.name for p in datadir.iterdir()) == ["gateway.json", "operator-token"]


def test_a_start_is_not_refused_by_settles_passing_look_at_the_lock(tmp_path):
    """`gateway settle` looks with a shared lock for an instant; a gateway starting then
    waits it out instead of naming the previous holder as running."""
    import fcntl
    import threading

    from gateway.lockfile import holder_pid

    with lock_datadir(tmp_path, GATEWAY_LOCK, "gateway"):
        assert holder_pid(tmp_path, GATEWAY_LOCK) == os.getpid()
    assert holder_pid(tmp_path, GATEWAY_LOCK) is None  # released: a leftover file only
    with (tmp_path / GATEWAY_LOCK).open() as probe:
        fcntl.flock(probe, fcntl.LOCK_SH)
        threading.Timer(0.05, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
        with lock_datadir(tmp_path, GATEWAY_LOCK, "gateway") as held:
            assert held.path.read_text() == f"{os.getpid()} gateway\n"
    assert holder_pid(tmp_path / "none", GATEWAY_LOCK) is None
    assert not (tmp_path / "none").exists()


def test_limit_settings_are_the_protocols_limits():
    """The operator sets exactly the fields of hello.limits (dust_limit is no setting)."""
    import dataclasses

    from gateway.config import LimitSettings
    from gateway.protocol.messages import Limits

    settings = {f.name for f in dataclasses.fields(LimitSettings)}
    assert settings == {f.name for f in dataclasses.fields(Limits)} - {"dust_limit"}
    resolved = LimitSettings(min_conf=None).resolve("signet")
    assert isinstance(resolved, Limits) and resolved.min_conf == 1 and resolved.dust_limit == 546
