"""``gateway channels``, ``gateway settle`` and configuration from the command
line: real data dirs, the real embedded node, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from conftest_gateway import Viewer, node_rpc, ws_url

from gateway.cli import main
from gateway.config import Config, ConfigError


async def _session_with_payments(gw) -> Viewer:
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.play_and_pay("clip", chunks=8)
    await viewer.disconnect()
    await asyncio.sleep(0.2)
    return viewer


async def test_channels_lists_and_settle_offline(gateway_factory, capsys, tmp_path):
    gw = await gateway_factory(limits={"resume_grace_s": 3600})
    viewer = await _session_with_payments(gw)
    cid = viewer.channel.outpoint.channel_id
    paid = viewer.channel.paid
    datadir, media = str(gw.config.datadir), str(gw.config.media)
    await gw.stop()
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["channels", "--datadir", datadir, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["channel_id"], c["state"], c["paid"]) for c in listed] == [(cid, "ready", paid)]
    assert await asyncio.to_thread(main, ["channels", "--datadir", datadir]) == 0
    assert cid in capsys.readouterr().out

    args = ["settle", "--datadir", datadir, "--media", media, "--rpc-port", "0"]
    assert await asyncio.to_thread(main, [*args, "ab" * 32 + ":0"]) == 1
    assert "no open channel" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*args, cid]) == 0
    out = capsys.readouterr().out
    assert cid in out and f"paid {paid}" in out
    assert await asyncio.to_thread(main, ["channels", "--datadir", datadir, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["state"] == "closing" and row["settle_txid"]


async def test_settle_asks_the_running_gateway(gateway_factory, capsys):
    gw = await gateway_factory(limits={"resume_grace_s": 3600})
    viewer = await _session_with_payments(gw)
    cid = viewer.channel.outpoint.channel_id
    # What `gateway serve` writes on start, so `gateway settle` finds it.
    import os

    (gw.datadir / "gateway.json").write_text(json.dumps(
        {"pid": os.getpid(), **gw.urls()}))
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["settle", "--datadir", str(gw.datadir)])
    assert code == 0
    assert cid in capsys.readouterr().out
    assert gw.channels[cid].core.settlement_txid is not None


async def test_settle_that_cannot_reach_the_node_is_a_one_line_error(gateway_factory, capsys):
    gw = await gateway_factory(limits={"resume_grace_s": 3600})
    viewer = await _session_with_payments(gw)
    cid = viewer.channel.outpoint.channel_id
    import os

    (gw.datadir / "gateway.json").write_text(json.dumps({"pid": os.getpid(), **gw.urls()}))
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
    from gateway.store import connect, create_schema

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
