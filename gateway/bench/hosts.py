"""``gateway bench --store postgresql://… --hosts H``: SQLite next to PostgreSQL, 1 and H hosts.

Three runs of the same load on the same machine, one after the other:
the SQLite store on one host (today's default), the PostgreSQL store on one
host, and on ``H`` hosts sharing it (each a ``gateway serve`` with its own
data dir and port, the viewers split among them). Each PostgreSQL run gets a
database of its own on the ``--store`` server (created, upgraded, dropped).
Nothing is pinned (the database server needs cores too), so the three runs
share the machine alike.

Reported per run: paid chunks/s, p99 pay→chunk, the gateways' CPU per paid
chunk, and for PostgreSQL the server backends' CPU per paid chunk and the
commits/s with the writes each carried: where the database's commit rate
and CPU become the limit (docs/performance.md, "Several hosts").
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gateway.bench import BenchOptions, run_bench


async def run_comparison(opts: BenchOptions, log: Any = None) -> dict[str, Any]:
    """SQLite on 1 host, PostgreSQL on 1 and on ``opts.hosts`` hosts: each run's figures."""
    from gateway.ledger.pg_store import drop_database, scratch_database, upgrade

    say = log or (lambda text: None)
    # A load generator per host at least (each drives one host), the same in every run.
    opts = dataclasses.replace(opts, clients=max(opts.clients, opts.hosts))
    plans = [("sqlite", 1), ("postgresql", 1)]
    if opts.hosts > 1:
        plans.append(("postgresql", opts.hosts))
    runs = []
    for n, (store, hosts) in enumerate(plans):
        say(f"run {n + 1}/{len(plans)}: {store}, {hosts} host(s)")
        workdir = opts.workdir / f"run{n}" if opts.workdir is not None else None
        if store == "sqlite":
            one = dataclasses.replace(opts, store="", hosts=1, pin=False, workdir=workdir)
            runs.append(await run_bench(one, log))
            continue
        name = f"paystream_bench_{os.getpid()}_{n}"
        url = await scratch_database(opts.store, name)
        try:
            await upgrade(url)
            one = dataclasses.replace(opts, store=url, hosts=hosts, pin=False, workdir=workdir)
            runs.append(await run_bench(one, log))
        finally:
            await drop_database(opts.store, name)
    return {"runs": runs, "summary": [summary(r) for r in runs]}


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """The comparison's figures of one run."""
    chunks = run["paid_chunks_per_s"] or 0
    gw = run["gateway"]
    return {
        "store": run["store"],
        "hosts": run["hosts"],
        "paid_chunks_per_s": chunks,
        "p99_pay_to_chunk_ms": run["pay_to_chunk"]["p99_ms"],
        "gateway_cpu_us_per_chunk": round(gw["cpu_cores"] / chunks * 1e6, 1) if chunks else None,
        "store_server_cpu_us_per_chunk": (
            round(run["store_server_cpu_cores"] / chunks * 1e6, 1) if chunks else None
        ),
        "commits_per_s": gw["store_commits_per_s"],
        "writes_per_commit": gw["writes_per_commit"],
        "errors": run["errors"],
    }


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as a table for people."""
    head = ("store", "hosts", "paid chunks/s", "p99 pay->chunk", "gw CPU/chunk",
            "db CPU/chunk", "commits/s", "writes/commit")
    lines = ["{:<11} {:>5} {:>13} {:>14} {:>12} {:>12} {:>10} {:>13}".format(*head)]
    for s in result["summary"]:
        lines.append(
            f"{s['store']:<11} {s['hosts']:>5} {s['paid_chunks_per_s']:>13,.1f} "
            f"{s['p99_pay_to_chunk_ms'] or 0:>11.2f} ms "
            f"{s['gateway_cpu_us_per_chunk'] or 0:>9.1f} us "
            f"{s['store_server_cpu_us_per_chunk'] or 0:>9.1f} us {s['commits_per_s']:>10,.1f} "
            f"{s['writes_per_commit'] or 0:>13}"
        )
    lines.append("(nothing pinned; db CPU: the PostgreSQL backends serving the hosts)")
    return "\n".join(lines)
