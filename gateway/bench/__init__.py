"""``gateway bench``: throughput, latency and scale, measured against real parts.

Theory of operation
-------------------

The coordinator (this module) starts, each in its own process:

* ``gateway node`` — the embedded regtest node (kernel-validated chain);
* ``gateway serve`` — the gateway, on a temp data dir (real SQLite, WAL,
  ``synchronous=FULL``, group commit) and a generated media dir;
* ``--clients`` load generators (:mod:`gateway.bench.load`), which share the
  viewers.

It writes a catalog item of ``--chunk-bytes`` random bytes per chunk and
``--chunk-ms`` per chunk, ``--rate`` sat/s, no free allowance (every chunk is
paid, protocol.md section 7). The load generators open and fund every
channel and pre-sign increments before timing starts; then every viewer plays
and the coordinator reads the gateway's CPU time (``/proc/PID/stat``) at the
edges of the timed window that the load generators count events in. After the
window every viewer sends ``close``; the time until the last ``closed`` is the
settlement time, and one mined block must confirm every settlement.

The raw ceiling — coincurve verifies/s and BIP143 digests/s
(``PaymentTemplate.digest``) on one core — is measured in the same run, on the
gateway's core while the gateway is idle, and the paid increments/s are
reported as a fraction of it (design.md "Performance, measured not assumed").

With ``--pin`` (the default on a machine with two or more cores) the gateway
runs on CPU 0 and the load generators, the node and the coordinator on the
others, so the gateway's figures are one core's worth; the split is printed.
With ``--workers W`` the gateway is ``gateway serve --workers W`` (a
supervisor and W worker processes, :mod:`gateway.workers`): it gets W cores
if one is left for the rest, else nothing is pinned, and its CPU time and
RSS are summed over all its processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.bench.load import LoadConfig
from gateway.errors import CliError

GATEWAY = [sys.executable, "-m", "gateway.cli"]
LOADGEN = [sys.executable, "-m", "gateway.bench.load"]
MEDIA_ID = "bench"
#: A settlement is ~800 WU: 2,000 of them stay well inside a 4,000,000 WU block.
SETTLEMENTS_PER_BLOCK = 2000
#: Distinct chunk files; the manifest cycles through them (sizes match).
CHUNK_FILES = 8

MODES_HELP = """\
modes:
  throughput (default)  every viewer pays each `due` as soon as it arrives: the
                        gateway's ceiling in paid chunks/s. Use small chunks
                        (default 1 KiB, 1000 ms of media each).
  --paced               audio rate: each viewer wants chunk i at t0 + i*D (t0
                        spread over the first chunk) and pays for it then;
                        lateness = arrival - t0 - i*D (default 32 KiB chunks of
                        2000 ms, like 128 kbit/s audio).

figures: paid chunks/s and increments/s, pay->chunk latency p50/p99/max
(client side), lateness p50/p99/max (paced), gateway CPU and RSS (and RSS per
viewer), hello->ready (10 viewers alone first: protocol round trips, and with
their own wallet funding; then the rest during concurrent set-up, without the
wait for the shared funding transaction), settlement of every channel (close ->
closed) and the blocks that confirm them, the crypto ceiling (coincurve verify
+ BIP143 digest per second on one core) and the ratio to it, group commit, the
gateway's disk writes (MB/s and bytes per increment), and the CPU time the
hypervisor gave to other guests during the window (steal).

In throughput mode every viewer has one payment in flight, so latency is
viewers / throughput (Little's law): read latency targets from --paced runs.

examples:
  gateway bench --viewers 1000 --seconds 10
  gateway bench --paced --viewers 10000 --seconds 20 --clients 1
  gateway bench --soak 10 --viewers 1000
"""


@dataclass
class BenchOptions:
    """The ``gateway bench`` flags, checked."""

    viewers: int = 100
    seconds: float = 5.0
    chunk_bytes: int = 1024
    chunk_ms: int = 1000
    rate_msat: int = 50_000
    paced: bool = False
    warmup: float = 1.0
    clients: int = 1
    presign: int = 0  # 0: enough for the run (see _presign_count)
    pin: bool = True
    close_concurrency: int = 256
    workdir: Path | None = None
    workers: int = 1
    #: ``postgresql://…``: a server where the bench may create databases
    #: (one per run, dropped after); empty: the SQLite store.
    store: str = ""
    #: Gateway hosts sharing the PostgreSQL store (each ``gateway serve``).
    hosts: int = 1
    #: Viewers send ``pay`` as the binary frame the gateway offers (protocol.md 5a).
    pay_binary: bool = True


# -- the CLI -----------------------------------------------------------------------


def register_cli(sub: Any) -> None:
    """Add ``gateway bench`` to the ``gateway`` CLI."""
    parser = sub.add_parser(
        "bench",
        help="measure throughput, latency and scale against real parts",
        description="Start a node, a gateway and load generators as separate processes, "
        "open and fund N channels, then stream paid media to N viewers over real "
        "WebSockets and report what the gateway sustained.",
        epilog=MODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--viewers", type=int, metavar="N",
                        help="concurrent viewers, one channel each (default 100; "
                        "--soak: 1000)")
    parser.add_argument("--seconds", type=float, default=5.0, metavar="S",
                        help="length of the timed window (default 5)")
    parser.add_argument("--chunk-bytes", type=int, metavar="B",
                        help="bytes per chunk (default 1024; paced 32768)")
    parser.add_argument("--chunk-ms", type=int, metavar="D",
                        help="media ms per chunk (default 1000; paced 2000)")
    # 50 sat/s (not the demo's 2): a short run must earn each channel more than
    # its settlement fee, or protocol.md section 3 leaves it to the refund and
    # there is no settlement to time.
    parser.add_argument("--rate", default="50", metavar="R",
                        help="price in sat/s of media (default 50; fractions to 0.001)")
    parser.add_argument("--paced", action="store_true",
                        help="audio-rate mode: viewers want chunk i at t0 + i*D")
    parser.add_argument("--warmup", type=float, default=1.0, metavar="S",
                        help="seconds of load before the window opens (default 1)")
    parser.add_argument("--clients", type=int, default=1, metavar="K",
                        help="load-generator processes sharing the viewers (default 1)")
    parser.add_argument("--presign", type=int, default=0, metavar="P",
                        help="increments each viewer signs ahead (default: enough for the run)")
    parser.add_argument("--workers", type=int, default=1, metavar="W",
                        help="gateway processes (gateway serve --workers; default 1)")
    parser.add_argument(
        "--store", metavar="URL",
        help="postgresql://… of a server where the bench may create (and drop) a database "
        "per run: runs SQLite on one host, then PostgreSQL on one host and on --hosts hosts",
    )
    parser.add_argument("--hosts", type=int, default=1, metavar="H",
                        help="with --store: gateway hosts sharing the ledger (default 1)")
    parser.add_argument("--json-pay", dest="pay_binary", action="store_false",
                        help="viewers send JSON `pay`s, as older clients do (default: the "
                        "binary `pay` the gateway offers, protocol.md section 5a)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the gateway to CPU 0 and the load to the others")
    parser.add_argument("--close-concurrency", type=int, default=256, metavar="C",
                        help="closes in flight per load generator (default 256)")
    parser.add_argument("--workdir", type=Path,
                        help="keep data dirs and logs here (default: a temp dir, removed)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--live", action="store_true",
        help="instead: N WebRTC viewers of one live stream (aiortc publisher and viewers "
        "over loopback): viewers per core, glass-to-glass latency, pay->media, CPU per "
        "viewer, how far behind the MSE fragments are (gateway/bench/live.py)",
    )
    parser.add_argument(
        "--soak", type=float, nargs="?", const=10.0, metavar="MINUTES",
        help="instead: a soak of MINUTES (default 10) with drops, resumes, closes and "
        "abusive clients, then check that every channel settled exactly what its client "
        "signed, that no honest viewer saw an error and that the gateway's RSS stayed "
        "flat; exit 1 if a check fails (gateway/bench/soak.py)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="--soak: seed of the viewers' random choices (default 0)")
    parser.add_argument(
        "--economics", action="store_true",
        help="instead: what settling a channel costs, single or batched, at 1, 5 and 20 "
        "sat/vB, from real signed transactions checked by libbitcoinkernel "
        "(docs/economics.md)",
    )
    parser.set_defaults(func=_run_cli)


def _run_live(args: argparse.Namespace) -> int:
    """``gateway bench --live --viewers N [--seconds S] [--json] [--no-pin]``."""
    import uvloop

    from gateway.bench import live

    if args.viewers < 1:
        raise CliError("--viewers must be at least 1")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(live.measure(args.viewers, args.seconds, pin=args.pin))
    if args.json:
        print(json.dumps({**asdict(result), "viewers_per_core": result.viewers_per_core}))
    else:
        print(result.report())
    return 0


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Check the flags; a bad one raises :class:`gateway.cli.CliError`."""
    from gateway.media.catalog import parse_rate
    from gateway.media.segment import MediaError

    try:
        rate_msat = parse_rate(args.rate)
    except MediaError as exc:
        raise CliError(f"--rate: {exc}") from None
    opts = BenchOptions(
        viewers=args.viewers if args.viewers is not None else 100,
        seconds=args.seconds,
        chunk_bytes=args.chunk_bytes if args.chunk_bytes is not None
        else (32768 if args.paced else 1024),
        chunk_ms=args.chunk_ms if args.chunk_ms is not None else (2000 if args.paced else 1000),
        rate_msat=rate_msat,
        paced=args.paced,
        warmup=args.warmup,
        clients=args.clients,
        presign=args.presign,
        pin=args.pin,
        close_concurrency=args.close_concurrency,
        workdir=args.workdir,
        workers=args.workers,
        store=args.store or "",
        hosts=args.hosts,
        pay_binary=args.pay_binary,
    )
    checks = [
        (opts.viewers >= 1, "--viewers must be at least 1"),
        (opts.seconds > 0 and math.isfinite(opts.seconds), "--seconds must be above 0"),
        (1 <= opts.chunk_bytes <= 16 << 20, "--chunk-bytes must be between 1 and 16 MiB"),
        (1 <= opts.chunk_ms <= 60_000, "--chunk-ms must be between 1 and 60000"),
        (opts.rate_msat > 0, "--rate must be above 0 (the bench measures paid chunks)"),
        (0 <= opts.warmup <= 600, "--warmup must be between 0 and 600"),
        (1 <= opts.clients <= opts.viewers, "--clients must be between 1 and --viewers"),
        (opts.presign >= 0, "--presign must be >= 0"),
        (opts.close_concurrency >= 1, "--close-concurrency must be at least 1"),
        (1 <= opts.workers <= 64, "--workers must be between 1 and 64"),
        (1 <= opts.hosts <= 16, "--hosts must be between 1 and 16"),
        (opts.hosts == 1 or bool(opts.store), "--hosts needs --store postgresql://…"),
        (not opts.store or opts.workers == 1, "--store runs one process per host: --workers 1"),
        (opts.clients >= opts.hosts or opts.viewers >= opts.hosts,
         "--viewers must be at least --hosts"),
    ]
    for ok, message in checks:
        if not ok:
            raise CliError(message)
    return opts


def _run_cli(args: argparse.Namespace) -> int:
    if args.live:
        return _run_live(args)

    if args.economics:
        from gateway.bench import economics

        rows, even = economics.per_channel(), economics.break_even()
        if args.json:
            print(json.dumps({"per_channel": [vars(r) for r in rows], "break_even": even},
                             indent=2))
        else:
            print(economics.markdown(rows, even))
        return 0
    if args.soak is not None:
        return _run_soak(args)
    opts = options_from_args(args)
    try:
        if opts.store:
            from gateway.bench.hosts import format_comparison, run_comparison

            result = asyncio.run(run_comparison(opts, log=None if args.json else _progress))
            text = format_comparison(result)
        else:
            result = asyncio.run(run_bench(opts, log=None if args.json else _progress))
            text = format_table(result)
    except BenchError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def _run_soak(args: argparse.Namespace) -> int:
    from gateway.bench.soak import SoakOptions, format_report, run_soak

    opts = SoakOptions(
        minutes=args.soak, viewers=args.viewers if args.viewers is not None else 1000,
        seed=args.seed, workdir=args.workdir,
    )
    if not (0 < opts.minutes <= 24 * 60 and math.isfinite(opts.minutes)):
        raise CliError("--soak must be between 0 and 1440 minutes")
    if opts.viewers < 1:
        raise CliError("--viewers must be at least 1")
    try:
        result = asyncio.run(run_soak(opts, log=None if args.json else _progress))
    except BenchError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    if not result["ok"]:
        failed = [name for name, ok in result["checks"].items() if not ok]
        raise CliError(f"soak: {len(failed)} check(s) failed: {'; '.join(failed)}")
    return 0


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The bench could not run (a part failed to start, a viewer failed)."""


# -- the raw ceiling ------------------------------------------------------------------


def measure_ceiling(seconds: float = 0.4) -> dict[str, float]:
    """coincurve verifies/s and BIP143 digests/s on this core, as the gateway runs them."""
    import coincurve

    from gateway.protocol.scripts import ChannelKind, ChannelScript
    from gateway.protocol.signatures import Verifier, sign_digest
    from gateway.protocol.transactions import Outpoint, PaymentTemplate

    client, server = coincurve.PrivateKey(), coincurve.PrivateKey()
    pub = client.public_key.format()
    script = ChannelScript.make(ChannelKind.CLTV, pub, server.public_key.format(), 2_000_000_000)
    template = PaymentTemplate(script, Outpoint("11" * 32, 0), 1_000_000,
                               bytes.fromhex("0014" + "22" * 20))
    balances = list(range(999_000, 999_000 - 256, -1))
    digests = [template.digest(b) for b in balances]
    sigs = [sign_digest(client.secret, d) for d in digests]
    verifier = Verifier(pub)

    def rate(step: Any) -> float:
        # CPU time, not wall time: on a shared core the wall clock also runs
        # while other processes have it, and the gateway's figure is CPU time too.
        n, start = 0, time.thread_time()
        while (elapsed := time.thread_time() - start) < seconds:
            for i in range(256):
                step(i)
            n += 256
        return n / elapsed

    digest_rate = rate(lambda i: template.digest(balances[i]))
    verify_rate = rate(lambda i: verifier.verify(digests[i], sigs[i]))
    per_increment = 1 / digest_rate + 1 / verify_rate
    return {
        "verifies_per_s": verify_rate,
        "digests_per_s": digest_rate,
        "increments_per_s": 1 / per_increment,
    }


# -- /proc ------------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (``/proc/PID/stat`` fields 14, 15)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_tree(pid: int) -> list[int]:
    """``pid`` and its running children (a supervisor's gateway workers)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            children.append(int(stat.parent.name))
    return [pid, *children]


def write_bytes(pid: int) -> int:
    """Bytes ``pid`` has sent towards the disk, counted when it dirtied them
    (``/proc/PID/io`` ``write_bytes``: the WAL, checkpoints, logs)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def tree_total(pids: list[int], measure: Callable[[int], float]) -> float:
    """``measure`` (:func:`cpu_seconds`, :func:`write_bytes`) summed over ``pids``
    (those still running)."""
    total = 0.0
    for pid in pids:
        try:
            total += measure(pid)
        except OSError:
            continue
    return total


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave to others, all cores (``/proc/stat`` ``steal``)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            return int(line.split()[8]) / _TICK
    return 0.0


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` and its children (``VmRSS``, ``/proc/PID/status``)."""
    total = 0
    for one in process_tree(pid):
        try:
            lines = Path(f"/proc/{one}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(x.split()[1]) * 1024 for x in lines if x.startswith("VmRSS:")), 0)
    return total


def percentiles(samples: list[float]) -> dict[str, float | int | None]:
    """p50, p99 and max in milliseconds (nearest rank), and the sample count."""
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "samples": 0}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {
        "p50_ms": round(rank(0.50), 3),
        "p99_ms": round(rank(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "samples": len(ordered),
    }


# -- set-up -----------------------------------------------------------------------------


def write_media(media: Path, opts: BenchOptions, chunks: int) -> None:
    """A catalog item of ``chunks`` random chunks (no PyAV needed), free allowance 0."""
    from gateway.media.catalog import Catalog, MediaItem, add_publisher
    from gateway.media.segment import MANIFEST_NAME, ChunkInfo, Manifest
    from gateway.protocol.scripts import script_pubkey_to_address

    address = script_pubkey_to_address(bytes.fromhex("0014" + "33" * 20), "regtest")
    assert address is not None
    add_publisher(media, "bench", "Bench", address)
    directory = media / MEDIA_ID
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(6)
    init = directory / "init.bin"
    init.write_bytes(rng.randbytes(64))
    files = []
    for n in range(min(CHUNK_FILES, chunks)):
        path = directory / f"chunk-{n}.bin"
        path.write_bytes(rng.randbytes(opts.chunk_bytes))
        files.append(path)
    infos = tuple(
        ChunkInfo(i, i * opts.chunk_ms, opts.chunk_ms, opts.chunk_bytes, files[i % len(files)])
        for i in range(chunks)
    )
    manifest = Manifest("application/octet-stream", chunks * opts.chunk_ms, init, 64, infos)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    item = MediaItem.from_manifest(
        Manifest.load(directory), id=MEDIA_ID, title="Bench", publisher="bench",
        rate_msat=opts.rate_msat, free_ms=0, source="", dir=MEDIA_ID,
    )
    Catalog.load(media).with_item(item).save()


def _presign_count(opts: BenchOptions) -> int:
    """Increments per viewer the run needs: real time (paced) or a generous guess."""
    run_s = opts.warmup + opts.seconds + 1
    if opts.paced:
        return math.ceil(run_s * 1000 / opts.chunk_ms) + 2
    # Throughput: above what the gateway can do (~30k/s here), split among viewers.
    return max(16, math.ceil(30_000 * run_s / opts.viewers))


def _spawn(args: list[str], log: Path, cpus: set[int] | None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=log.parent)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    return proc


async def _wait_for(what: str, check: Any, proc: subprocess.Popen[bytes], log: Path,
                    timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{what} exited with status {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not start within {timeout:.0f} s (see {log})")
        await asyncio.sleep(0.05)


@dataclass
class Stack:
    """A ``gateway node`` and one ``gateway serve`` per host, started by :func:`start_stack`."""

    node: subprocess.Popen[bytes]
    gateways: list[subprocess.Popen[bytes]]
    rpc_url: str
    cookie: Path
    #: Each gateway's ``gateway.json``: ``ws``, ``web``, ``pid``...
    infos: list[dict[str, Any]]

    @property
    def gateway(self) -> subprocess.Popen[bytes]:
        """The first host's gateway process."""
        return self.gateways[0]

    @property
    def info(self) -> dict[str, Any]:
        """The first host's ``gateway.json``."""
        return self.infos[0]

    @property
    def ws_url(self) -> str:
        """The gateway's ``/paystream/2`` URL."""
        return str(self.info["ws"])


async def start_stack(
    workdir: Path,
    procs: list[subprocess.Popen[bytes]],
    *,
    gateway_toml: str,
    media: Path | None = None,
    workers: int = 1,
    hosts: int = 1,
    store: str | None = None,
    gw_cpus: set[int] | None = None,
    other_cpus: set[int] | None = None,
) -> Stack:
    """Start ``gateway node`` and one ``gateway serve`` per host (config ``gateway_toml``).

    With ``store`` (``postgresql://…``) the hosts share that ledger and one
    master key. Each process is appended to ``procs`` as soon as it runs (the
    caller stops them); logs go to ``workdir/node.log`` and
    ``workdir/gateway.log`` (``gateway1.log``… for the other hosts).
    """
    node_log = workdir / "node.log"
    node_dir = workdir / "node"
    node = _spawn([*GATEWAY, "node", "--datadir", str(node_dir), "--rpc-port", "0"],
                  node_log, other_cpus)
    procs.append(node)
    cookie = node_dir / "regtest" / ".cookie"
    rpc_url = await _wait_for("the node", lambda: cookie.exists() and _rpc_url_from(node_log),
                              node, node_log)
    gateways: list[subprocess.Popen[bytes]] = []
    infos: list[dict[str, Any]] = []
    for host in range(hosts):
        gw_dir = workdir / ("gw" if host == 0 else f"gw{host}")
        gw_dir.mkdir(exist_ok=True)
        (gw_dir / "gateway.toml").write_text(gateway_toml)
        gw_log = workdir / ("gateway.log" if host == 0 else f"gateway{host}.log")
        shared = []
        if store:  # one ledger, one master key, a name per host
            shared = ["--store", store, "--master-key", str(workdir / "master.key"),
                      "--host-id", f"bench-{host}"]
        gateway = _spawn(
            [*GATEWAY, "serve", "--datadir", str(gw_dir), "--port", "0",
             "--media", str(media or workdir / "media"), "--rpc-url", rpc_url,
             "--rpc-cookie", str(cookie), "--workers", str(workers), *shared],
            gw_log, gw_cpus,
        )
        procs.append(gateway)
        info_path = gw_dir / "gateway.json"
        await _wait_for("the gateway", info_path.exists, gateway, gw_log)
        gateways.append(gateway)
        infos.append(json.loads(info_path.read_text()))
    return Stack(node, gateways, rpc_url, cookie, infos)


def _rpc_url_from(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("RPC URL: "):
            return line.removeprefix("RPC URL: ").strip()
    return None


def _health(web: str) -> dict[str, Any]:
    with urllib.request.urlopen(web.rstrip("/") + "/api/health", timeout=30) as answer:
        result: dict[str, Any] = json.load(answer)
        return result


def _store_stats(healths: list[dict[str, Any]]) -> dict[str, int]:
    """Commits and writes of every host's store, summed (each host answers for itself only
    when asked directly: with a shared ledger its health sums the cluster's, so take one
    host's own figures)."""
    commits = requests = 0
    for health in healths:
        mine = health.get("own_store", health["store"])
        commits += mine["commits"]
        requests += mine["requests"]
    return {"commits": commits, "requests": requests}


async def _server_pids(opts: BenchOptions) -> list[int]:
    """The PostgreSQL server processes serving the hosts (their CPU is the store's)."""
    if not opts.store:
        return []
    from gateway.ledger.pg_store import backend_pids

    return await backend_pids(opts.store, "paystream-bench-")


def _cpu_split(pin: bool, workers: int) -> tuple[set[int] | None, set[int] | None]:
    """(gateway CPUs, everything else): a core per gateway worker and one core left
    for the rest, or no pinning (``--no-pin``, or too few cores for that)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < workers + 1:
        return None, None
    return set(cpus[:workers]), set(cpus[workers:])


class _LoadGen:
    """One load-generator process and its JSON-lines channel."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"a load generator sent no {event!r} within {timeout:.0f} s") from None
        if not line:
            raise BenchError(f"a load generator exited before {event!r} (see its log)")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("event") == "error":
            raise BenchError(f"load generator: {msg.get('message')}")
        if msg.get("event") != event:
            raise BenchError(f"a load generator sent {msg.get('event')!r}, not {event!r}")
        return msg


# -- the run ------------------------------------------------------------------------------


async def run_bench(opts: BenchOptions, log: Any = None) -> dict[str, Any]:
    """Run one bench and return every figure (see :data:`MODES_HELP`)."""
    say = log or (lambda text: None)
    fd_limit = raise_fd_limit()
    if opts.viewers + 512 > fd_limit:
        raise BenchError(
            f"{opts.viewers} viewers need about {opts.viewers + 512} file descriptors per "
            f"process; the hard limit here is {fd_limit} (raise `ulimit -Hn`)"
        )
    workdir = bench_workdir(opts.workdir, "paystream-bench-")
    procs: list[subprocess.Popen[bytes]] = []
    loadgens: list[_LoadGen] = []
    try:
        return await _run(opts, workdir, procs, loadgens, say)
    finally:
        for lg in loadgens:
            if lg.proc.returncode is None:
                lg.proc.kill()
                await lg.proc.wait()
        stop_processes(procs)
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def bench_workdir(given: Path | None, prefix: str) -> Path:
    """``given`` (``--workdir``, which must be empty) or a fresh temporary directory."""
    if given is not None and given.exists() and any(given.iterdir()):
        # A node or gateway left there would be found instead of the new one.
        raise BenchError(f"--workdir {given} is not empty")
    workdir = given or Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process, the last started first; SIGKILL one that takes over 30 s."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit and return it (a socket per viewer)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # Children inherit it: the gateway needs a socket per viewer too.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def _run(
    opts: BenchOptions,
    workdir: Path,
    procs: list[subprocess.Popen[bytes]],
    loadgens: list[_LoadGen],
    say: Any,
) -> dict[str, Any]:
    from gateway.chain.rpc import RpcClient

    # A PostgreSQL server needs cores of its own too: with --store nothing is pinned.
    gw_cpus, other_cpus = _cpu_split(opts.pin and not opts.store, opts.workers)
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    presign = opts.presign or _presign_count(opts)
    media = workdir / "media"
    write_media(media, opts, chunks=presign + 8)

    say("starting the node and the gateway" + (f" ({opts.hosts} hosts)" if opts.hosts > 1 else ""))
    # Per-address limits sized for N viewers from 127.0.0.1 (they protect a
    # public gateway from one host; here one host is the audience).
    stack = await start_stack(
        workdir, procs,
        gateway_toml=(
            f"max_sessions_per_ip = {opts.viewers + 64}\n"
            f"max_unfunded_per_ip = {opts.viewers + 64}\n"
            f"idle_timeout_s = 600.0\n"
            f"settle_interval_s = 1.0\n"
            "[limits]\nmin_conf = 0\nresume_grace_s = 3600\n"
        ),
        media=media, workers=opts.workers, hosts=opts.hosts, store=opts.store,
        gw_cpus=gw_cpus, other_cpus=other_cpus,
    )
    node, gateways, rpc_url, cookie, infos = (
        stack.node, stack.gateways, stack.rpc_url, stack.cookie, stack.infos
    )

    say("measuring the crypto ceiling on the gateway's core")
    if gw_cpus:
        os.sched_setaffinity(0, gw_cpus)
    ceiling = measure_ceiling()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)

    rss_idle = sum(rss_bytes(g.pid) for g in gateways)
    say(f"opening and funding {opts.viewers} channels ({opts.clients} load generator(s))")
    shares = [opts.viewers // opts.clients + (i < opts.viewers % opts.clients)
              for i in range(opts.clients)]
    for i, share in enumerate(shares):
        cfg = LoadConfig(
            url=infos[i % len(infos)]["ws"], rpc_url=rpc_url, rpc_cookie=str(cookie), viewers=share,
            media=MEDIA_ID, rate_msat=opts.rate_msat, chunk_ms=opts.chunk_ms,
            paced=opts.paced, presign=presign, close_concurrency=opts.close_concurrency,
            seed=i, funding_lock=str(workdir / "funding.lock"), pay_binary=opts.pay_binary,
        )
        lg_log = (workdir / f"loadgen-{i}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            *LOADGEN, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=lg_log, limit=1 << 28,
        )
        if other_cpus:
            os.sched_setaffinity(proc.pid, other_cpus)
        lg = _LoadGen(proc)
        loadgens.append(lg)
        await lg.send(asdict(cfg))
    t_setup = time.monotonic()
    readies = await asyncio.gather(*(lg.expect("ready", 600 + opts.viewers / 10)
                                     for lg in loadgens))
    setup_s = time.monotonic() - t_setup
    rss_ready = sum(rss_bytes(g.pid) for g in gateways)
    # Confirm the funding transactions now (not timed), so that the blocks
    # after the run hold settlements only.
    rpc = RpcClient(rpc_url, cookie_path=cookie)
    try:
        await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    finally:
        await rpc.close()
    health_before = _store_stats([_health(i["web"]) for i in infos])
    server_pids = await _server_pids(opts)

    say(f"running: {opts.warmup:g} s warm-up, {opts.seconds:g} s timed")
    start = time.monotonic() + 0.3
    window = (start + opts.warmup, start + opts.warmup + opts.seconds)
    for lg in loadgens:
        await lg.send({"cmd": "go", "start": start, "window": list(window)})
    await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
    # Every host, with its workers (a supervisor's children).
    gateway_pids = [p for g in gateways for p in process_tree(g.pid)]
    disk0, cpu0 = tree_total(gateway_pids, write_bytes), tree_total(gateway_pids, cpu_seconds)
    server_cpu0 = tree_total(server_pids, cpu_seconds)
    node_cpu0, wall0 = cpu_seconds(node.pid), time.monotonic()
    lg_cpu0, steal0 = sum(cpu_seconds(lg.proc.pid) for lg in loadgens), steal_seconds()
    await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
    cpu1, node_cpu1, wall1 = (
        tree_total(gateway_pids, cpu_seconds), cpu_seconds(node.pid), time.monotonic()
    )
    disk1 = tree_total(gateway_pids, write_bytes)
    server_cpu1 = tree_total(server_pids, cpu_seconds)
    lg_cpu1, steal1 = sum(cpu_seconds(lg.proc.pid) for lg in loadgens), steal_seconds()
    rss_run = sum(rss_bytes(g.pid) for g in gateways)
    dones = await asyncio.gather(*(lg.expect("done", 120) for lg in loadgens))
    health_after = _store_stats([_health(i["web"]) for i in infos])

    say("closing every channel")
    for lg in loadgens:
        await lg.send({"cmd": "close"})
    closes = await asyncio.gather(*(lg.expect("closed", 600 + opts.viewers / 5)
                                    for lg in loadgens))
    # Channels closed together share a settlement (a batch): each txid once.
    txids = list(dict.fromkeys(t for c in closes for t in c["txids"] if t))
    settle_s = max(c["last_closed"] for c in closes) - min(c["first_sent"] for c in closes)

    say(f"mining a block to confirm {len(txids)} settlements")
    rpc = RpcClient(rpc_url, cookie_path=cookie)
    try:
        address = await rpc.call("getnewaddress")
        t_mine = time.monotonic()
        confirmed, blocks = 0, 0
        for first in range(0, len(txids), SETTLEMENTS_PER_BLOCK):
            group = txids[first : first + SETTLEMENTS_PER_BLOCK]
            block = await rpc.call("generateblock", address, group)
            # One getblock, not a getrawtransaction per txid: without a
            # txindex a node reads the whole block for each of those.
            in_block = set((await rpc.call("getblock", block["hash"], 1))["tx"])
            confirmed += sum(1 for t in group if t in in_block)
            blocks += 1
        mine_s = time.monotonic() - t_mine
    finally:
        await rpc.close()
    for lg in loadgens:
        await lg.send({"cmd": "exit"})
        await lg.proc.wait()

    window_s = wall1 - wall0
    chunks = sum(d["chunks"] for d in dones)
    increments = sum(d["increments"] for d in dones)
    errors: dict[str, int] = {}
    for d in dones:
        for code, n in d["errors"].items():
            errors[code] = errors.get(code, 0) + n
    inc_rate = increments / window_s
    commits = health_after["commits"] - health_before["commits"]
    requests = health_after["requests"] - health_before["requests"]
    return {
        "mode": "paced" if opts.paced else "throughput",
        "viewers": opts.viewers,
        "seconds": round(window_s, 3),
        "chunk_bytes": opts.chunk_bytes,
        "chunk_ms": opts.chunk_ms,
        "rate_sat_per_s": opts.rate_msat / 1000,
        "load_generators": opts.clients,
        "gateway_workers": opts.workers,
        "store": "postgresql" if opts.store else "sqlite",
        "hosts": opts.hosts,
        "cpu_split": {
            "cores": os.cpu_count(),
            "gateway": sorted(gw_cpus) if gw_cpus else "any",
            "load_node_coordinator": sorted(other_cpus) if other_cpus else "any",
        },
        "paid_chunks_per_s": round(chunks / window_s, 1),
        "increments_per_s": round(inc_rate, 1),
        "media_mbit_per_s": round(sum(d["bytes"] for d in dones) * 8 / window_s / 1e6, 2),
        "pay_to_chunk": percentiles([x for d in dones for x in d["latency"]]),
        "lateness": percentiles([x for d in dones for x in d["lateness"]]),
        "gateway": {
            "cpu_cores": round((cpu1 - cpu0) / window_s, 3),
            "processes": len(gateway_pids),  # the CPU and RSS are summed over these
            "rss_mb": round(rss_run / 2**20, 1),
            "rss_idle_mb": round(rss_idle / 2**20, 1),
            "rss_per_viewer_kb": round((rss_ready - rss_idle) / opts.viewers / 1024, 1),
            "store_commits_per_s": round(commits / (wall1 - wall0), 1),
            "writes_per_commit": round(requests / commits, 2) if commits else None,
            "disk_write_mb_per_s": round((disk1 - disk0) / window_s / 1e6, 2),
            "disk_write_bytes_per_increment": (
                round((disk1 - disk0) / increments) if increments else None
            ),
        },
        "store_server_cpu_cores": round((server_cpu1 - server_cpu0) / window_s, 3),
        "load_generator_cpu_cores": round((lg_cpu1 - lg_cpu0) / window_s, 3),
        "node_cpu_cores": round((node_cpu1 - node_cpu0) / window_s, 3),
        "cpu_steal_s": round(steal1 - steal0, 2),
        "hello_to_ready": {
            "solo": percentiles([x for r in readies for x in r["solo_hello_to_ready"]]),
            "solo_with_wallet": percentiles([x for r in readies for x in r["solo_with_wallet"]]),
            "concurrent": percentiles([x for r in readies for x in r["hello_to_ready"]]),
        },
        "setup_s": round(setup_s, 2),
        "presign_per_viewer": presign,
        "live_signed": sum(d["live_signed"] for d in dones),
        "settle": {
            "channels": sum(c["closed"] for c in closes),
            "failed": sum(c["failed"] for c in closes),
            "settlements": len(txids),
            "close_all_s": round(settle_s, 3),
            "mine_and_confirm_s": round(mine_s, 3),
            "confirmed": confirmed,
            "blocks": blocks,
        },
        "ceiling": {
            "verifies_per_s": round(ceiling["verifies_per_s"], 1),
            "digests_per_s": round(ceiling["digests_per_s"], 1),
            "increments_per_s": round(ceiling["increments_per_s"], 1),
            "ratio": round(inc_rate / ceiling["increments_per_s"], 3),
            # Issue 18's per-core figures: paid chunks per gateway core-second
            # against the ceiling, and gateway CPU per paid chunk in ceiling increments.
            "per_core_ratio": (
                round(chunks / (cpu1 - cpu0) / ceiling["increments_per_s"], 3)
                if chunks and cpu1 > cpu0 else None
            ),
            "cpu_per_chunk_us": round((cpu1 - cpu0) / chunks * 1e6, 1) if chunks else None,
            "cpu_per_chunk_in_increments": (
                round((cpu1 - cpu0) / chunks * ceiling["increments_per_s"], 2) if chunks else None
            ),
        },
        "pay": "binary" if opts.pay_binary else "json",
        "errors": errors,
    }


def _ms(figures: dict[str, Any]) -> str:
    if not figures["samples"]:
        return "-"
    return (f"p50 {figures['p50_ms']:.2f}  p99 {figures['p99_ms']:.2f}  "
            f"max {figures['max_ms']:.2f} ms  ({figures['samples']} samples)")


def format_table(r: dict[str, Any]) -> str:
    """The figures for people."""
    gw, settle, ceil = r["gateway"], r["settle"], r["ceiling"]
    split = r["cpu_split"]
    rows = [
        ("mode", f"{r['mode']}: {r['viewers']} viewers, {r['seconds']:g} s, "
                 f"{r['chunk_bytes']} B / {r['chunk_ms']} ms chunks, "
                 f"{r['rate_sat_per_s']:g} sat/s"),
        ("cpu split", f"{split['cores']} cores: gateway ({r['gateway_workers']} worker(s)) on "
                      f"{split['gateway']}, load generators "
                      f"({r['load_generators']}), node and coordinator on "
                      f"{split['load_node_coordinator']}"),
        ("paid chunks/s", f"{r['paid_chunks_per_s']:,.1f}  ({r['media_mbit_per_s']} Mbit/s)"),
        ("increments/s", f"{r['increments_per_s']:,.1f}"),
        ("pay -> chunk", _ms(r["pay_to_chunk"])),
        ("lateness", _ms(r["lateness"])),
        ("gateway cpu", f"{gw['cpu_cores']:.2f} cores ({gw['processes']} process(es))"),
        ("gateway rss", f"{gw['rss_mb']} MB (idle {gw['rss_idle_mb']} MB, "
                        f"{gw['rss_per_viewer_kb']} KB per viewer)"),
        ("group commit", f"{gw['store_commits_per_s']:,.1f} commits/s, "
                         f"{gw['writes_per_commit']} writes per commit"),
        ("disk writes", f"{gw['disk_write_mb_per_s']} MB/s "
                        f"({gw['disk_write_bytes_per_increment']} B per increment)"),
        ("load gen cpu", f"{r['load_generator_cpu_cores']:.2f} cores "
                         f"(node {r['node_cpu_cores']:.2f})"),
        ("cpu steal", f"{r['cpu_steal_s']} s over the window, all cores (a VM's "
                      "neighbours: latency that is not the gateway's)"),
        ("hello -> ready", "alone " + _ms(r["hello_to_ready"]["solo"])),
        ("", "alone, with its wallet funding " + _ms(r["hello_to_ready"]["solo_with_wallet"])),
        ("", "during concurrent set-up " + _ms(r["hello_to_ready"]["concurrent"])),
        ("set-up", f"{r['setup_s']} s (open, fund, ready, pre-sign "
                   f"{r['presign_per_viewer']} each; {r['live_signed']} signed live)"),
        ("settle", f"{settle['channels']} channels closed in {settle['close_all_s']} s "
                   f"({settle['settlements']} settlements, {settle['failed']} failed); "
                   f"{settle['blocks']} block(s) confirmed {settle['confirmed']} "
                   f"in {settle['mine_and_confirm_s']} s"),
        ("crypto ceiling", f"{ceil['verifies_per_s']:,.0f} verifies/s, "
                           f"{ceil['digests_per_s']:,.0f} digests/s = "
                           f"{ceil['increments_per_s']:,.0f} increments/s on one core"),
        ("ratio", f"{ceil['ratio']:.3f} of the ceiling; per gateway core-second "
                  f"{ceil['per_core_ratio']}"),
        ("cpu per chunk", f"{ceil['cpu_per_chunk_us']} µs of gateway CPU per paid chunk = "
                          f"{ceil['cpu_per_chunk_in_increments']} x the ceiling's cost of "
                          f"an increment ({r['pay']} pay)"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
