"""``gateway serve``, ``gateway channels`` and ``gateway settle``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import uvloop

from gateway.config import Config, ConfigError
from gateway.errors import CliError
from gateway.lockfile import GATEWAY_LOCK, NODE_LOCK, DataDirInUse, holder_pid, lock_datadir


def register_cli(sub: Any) -> None:
    """Add the gateway's operating commands to the ``gateway`` CLI."""
    serve = sub.add_parser("serve", help="run the gateway (and the embedded node)")
    _common(serve)
    _store(serve)
    _chain(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="WebSocket/HTTP port (default 8080; 0 = any)")
    serve.add_argument("--block-interval", type=float, help="embedded node: seconds per block")
    serve.add_argument("--resume-grace", type=int, help="seconds a dropped channel stays resumable")
    serve.add_argument("--settle-margin", type=int, help="settle this many seconds before expiry")
    serve.add_argument(
        "--min-conf", type=int, help="confirmations before ready (default: 0 regtest, "
        "1 signet/testnet, 3 main)"
    )
    serve.add_argument(
        "--allow-zero-conf", action="store_true", default=None,
        help="allow --min-conf 0 on mainnet (a viewer could double-spend its funding)",
    )
    serve.add_argument("--workers", type=int, help="gateway processes sharing the port (default 1)")
    serve.add_argument(
        "--master-key", type=Path,
        help="the master key's seed file (default DATADIR/master.key); every host sharing "
        "a PostgreSQL store needs the same one",
    )
    serve.add_argument(
        "--host-id", help="this host's name in a shared store (default: made once, in "
        "DATADIR/host-id)",
    )
    serve.add_argument("--demo", action="store_true", help="print a ready-to-paste player line")
    loud = serve.add_mutually_exclusive_group()
    loud.add_argument(
        "-v", "--verbose", action="store_true",
        help="also log each WebSocket connection and HTTP request",
    )
    loud.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    serve.set_defaults(func=_serve)

    channels = sub.add_parser("channels", help="list channels and their states")
    _common(channels)
    _store(channels)
    channels.add_argument("--json", action="store_true", help="machine-readable output")
    channels.set_defaults(func=_channels)

    settle = sub.add_parser(
        "settle",
        help="settle a channel (or every open one) now",
        description="Asks the gateway running on DATADIR (found from DATADIR/gateway.json, "
        "with the operator token) to settle now. Without a running gateway it does nothing: "
        "start it with gateway serve, which also settles what is due when it starts.",
    )
    _common(settle)
    settle.add_argument("channel", nargs="?", help="txid:vout (default: every ready channel)")
    settle.set_defaults(func=_settle)

    db = sub.add_parser("db", help="the shared PostgreSQL ledger's schema")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = db_sub.add_parser(
        "upgrade", help="apply the schema migrations the PostgreSQL store lacks",
        description="Brings the database named by --store (or the config's store) to this "
        "gateway's schema version; gateway serve refuses a database not upgraded.",
    )
    _common(upgrade)
    _store(upgrade)
    upgrade.set_defaults(func=_db_upgrade)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datadir", type=Path, help="gateway data dir (default ./data)")
    parser.add_argument("--config", type=Path, help="TOML config file")


def _store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", help="channel ledger: postgresql://… shared by several gateway hosts "
        "(default: the SQLite file in the data dir)",
    )


def _chain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--media", type=Path, help="media dir with catalog.toml (default ./media)")
    parser.add_argument("--rpc-url", help="use this bitcoind instead of the embedded node")
    parser.add_argument("--rpc-cookie", type=Path, help="bitcoind's .cookie file")
    parser.add_argument("--rpc-port", type=int, help="embedded node RPC port (default 18443)")


def load_config(args: argparse.Namespace) -> Config:
    """Config from defaults, ``--config`` (or ``DATADIR/gateway.toml``), env and flags."""

    path = args.config
    datadir = args.datadir or Path(os.environ.get("PAYSTREAM_DATADIR", "data"))
    if path is None and (datadir / "gateway.toml").exists():
        path = datadir / "gateway.toml"
    try:
        config = Config.load(path)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    config.datadir = datadir
    flags = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "media": getattr(args, "media", None),
        "rpc_url": getattr(args, "rpc_url", None),
        "rpc_cookie": getattr(args, "rpc_cookie", None),
        "rpc_port": getattr(args, "rpc_port", None),
        "block_interval": getattr(args, "block_interval", None),
        "workers": getattr(args, "workers", None),
        "store": getattr(args, "store", None),
        "master_key": getattr(args, "master_key", None),
        "host_id": getattr(args, "host_id", None),
        "allow_zero_conf": getattr(args, "allow_zero_conf", None),
    }
    for name, value in flags.items():
        if value is not None:
            setattr(config, name, value)
    limits = {
        "resume_grace_s": getattr(args, "resume_grace", None),
        "settle_margin_s": getattr(args, "settle_margin", None),
        "min_conf": getattr(args, "min_conf", None),
    }
    for name, value in limits.items():
        if value is not None:
            if value < 0:
                raise CliError(f"--{name.removesuffix('_s').replace('_', '-')} must be >= 0")
            setattr(config.limits, name, value)
    try:
        config.check()
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    return config


def _serve(args: argparse.Namespace) -> int:

    config = load_config(args)
    # INFO: a line per session start and end, funding, settlement and error
    # sent to a client; never a key, token, signature or raw transaction.
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # aiohttp logs every HTTP request (and upgrade) at INFO
        from gateway.server import ACCESS_LOG

        logging.getLogger(ACCESS_LOG).setLevel(logging.WARNING)
    with contextlib.ExitStack() as held:
        # Before anything starts: a second gateway on the data dir would fail
        # deep in the node's chainstate (gateway/lockfile.py).
        try:
            held.enter_context(lock_datadir(config.datadir, GATEWAY_LOCK, "gateway"))
            if config.rpc_url is None:
                held.enter_context(lock_datadir(config.datadir / "node", NODE_LOCK, "gateway"))
        except DataDirInUse as exc:
            raise CliError(str(exc)) from None
        if args.demo:
            _print_demo_hint(config)
        _run(config)
    return 0


def _run(config: Config) -> None:
    from gateway.ledger import ClusterError, SchemaError
    from gateway.media.segment import MediaError
    from gateway.server import GatewayStartError, run_gateway
    from gateway.workers import WorkerStartError, run_supervisor

    try:
        # uvloop (libuv) runs the same asyncio code with a fraction of the
        # loop's own cost per message (``gateway bench`` figures in README).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_supervisor(config) if config.workers > 1 else run_gateway(config))
    except OSError as exc:
        raise CliError(f"cannot start: {exc.strerror or exc}") from None
    except (WorkerStartError, MediaError, GatewayStartError, ClusterError, SchemaError) as exc:
        raise CliError(f"cannot start: {exc}") from None


def _print_demo_hint(config: Config) -> None:
    cookie = config.datadir / "node" / "regtest" / ".cookie"
    print(
        "demo: in another terminal, watch the sample video (Ctrl-C closes the channel):\n"
        f"  .venv/bin/player play ws://{config.host}:{config.port}/paystream/2 sample-video "
        f"--budget 20000 --out /tmp/paystream-sample.mp4 "
        f"--wallet-rpc http://127.0.0.1:{config.rpc_port} --wallet-cookie {cookie}",
        flush=True,
    )


def _channels(args: argparse.Namespace) -> int:
    from gateway.ledger import SchemaError, list_channels

    config = load_config(args)
    path = config.datadir / "gateway.db"
    if not config.store and not path.exists():
        raise CliError(f"no gateway data in {config.datadir} (run `gateway serve` first)")
    try:
        items = list_channels(config.store or path)
    except SchemaError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read the store: {exc}") from None
    for item in items:
        # No balance yet means nothing paid; a zero balance means all of it was.
        value, balance = item["value"] or 0, item["balance"]
        item["paid"] = 0 if balance is None else value - balance
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    header = ("id", "channel", "kind", "state", "value", "paid")
    print("{:>4}  {:<68} {:<8} {:<13} {:>10} {:>9}  settlement".format(*header))
    for i in items:
        print(
            f"{i['id']:>4}  {i['channel_id'] or '-':<68} {i['kind']:<8} {i['state']:<13} "
            f"{i['value'] or 0:>10} {i['paid']:>9}  {i['settle_txid'] or '-'}"
        )
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    """``gateway db upgrade``: apply the PostgreSQL ledger's migrations."""
    from gateway.cli import CliError
    from gateway.ledger import is_postgres, upgrade

    config = load_config(args)
    if not is_postgres(config.store):
        raise CliError("gateway db upgrade needs --store postgresql://… (the SQLite file "
                       "upgrades itself when gateway serve opens it)")
    try:
        applied = asyncio.run(upgrade(config.store))
    except OSError as exc:
        raise CliError(f"cannot reach the database: {exc}") from None
    except Exception as exc:  # the driver's errors: say which, in one line
        raise CliError(f"upgrade failed: {type(exc).__name__}: {exc}") from None
    for name in applied:
        print(f"applied {name}")
    print("the schema is up to date" if not applied else f"{len(applied)} migration(s) applied")
    return 0


def _settle(args: argparse.Namespace) -> int:
    """Ask the gateway running on the data dir to settle (operator token)."""

    config = load_config(args)
    url = _running_gateway(config) + "api/admin/settle"
    try:
        token = (config.datadir / "operator-token").read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read the operator token: {exc.strerror or exc}") from None
    if args.channel:
        url += f"?channel={args.channel}"
    # POST: settling changes state (GET is refused with 405).
    request = urllib.request.Request(
        url, data=b"", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            result = json.load(answer)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", str(exc))
        except ValueError:  # not the gateway's JSON (a proxy, say)
            message = str(exc)
        raise CliError(message) from None
    except OSError as exc:
        raise CliError(f"cannot reach the gateway: {exc}") from None
    items = result["settled"] + result.get("failed", [])
    failed = [item for item in items if "error" in item]
    for item in items:
        if "error" in item:
            print(f"{item['channel_id']}  failed: {item['error']}")
        else:
            print(f"{item['channel_id']}  paid {item['paid']}  txid {item['txid'] or '-'}")
    if not items:
        print("nothing to settle")
    if failed:
        raise CliError(f"{len(failed)} channel(s) not settled for want of the node; "
                       "nothing is lost: run it again once the node answers")
    return 0


def _running_gateway(config: Config) -> str:
    """The web URL of the gateway serving ``config.datadir`` (CliError if none runs).

    A gateway runs there if a process holds the data dir's lock; its
    ``gateway.json`` says where it listens. Nothing is created.
    """

    pid = holder_pid(config.datadir, GATEWAY_LOCK)
    info_path = config.datadir / "gateway.json"
    if pid is None or not info_path.exists():
        raise CliError(
            f"no running gateway for data dir {config.datadir} (start it with gateway serve)"
        )
    try:
        info = json.loads(info_path.read_text())
        web = str(info["web"])
        announced = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot read {info_path}: {exc}") from None
    if announced != pid:  # the one that wrote it is gone; the new one is starting
        raise CliError(f"the gateway for data dir {config.datadir} is starting; try again")
    return web.rstrip("/") + "/"
