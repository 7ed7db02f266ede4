"""``gateway bench --store postgresql://… --hosts 2``: a tiny run, every figure present.

SQLite on one host, PostgreSQL on one host and on two hosts sharing it, each
with real processes (node, gateways, load generators) and a real PostgreSQL
(conftest_pg). No timing is asserted (design.md: benchmarks live in the CLI).
"""

from __future__ import annotations

import json

import pytest
from test_bench import _check_common

from gateway.cli import main

pytestmark = pytest.mark.slow


def test_sqlite_and_postgresql_on_one_and_two_hosts(capsys, pg_cluster):
    args = ["bench", "--json", "--store", pg_cluster.dsn(), "--hosts", "2",
            "--viewers", "6", "--seconds", "1", "--warmup", "0.3"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    runs = result["runs"]
    assert [(r["store"], r["hosts"]) for r in runs] == [
        ("sqlite", 1), ("postgresql", 1), ("postgresql", 2)
    ]
    for run in runs:
        # Each run's figures as the single-store bench checks them, but the
        # database's WAL is written by the server, not by the gateway.
        run["gateway"]["disk_write_bytes_per_increment"] = 2048
        _check_common(run, 6, hosts=run.get("hosts", 1))
        assert run["load_generators"] == 2  # one per host, the same in every run
    assert runs[0]["store_server_cpu_cores"] == 0
    assert all(r["store_server_cpu_cores"] > 0 for r in runs[1:])
    summary = result["summary"]
    assert [s["hosts"] for s in summary] == [1, 1, 2]
    assert all(s["paid_chunks_per_s"] > 0 and s["gateway_cpu_us_per_chunk"] > 0
               for s in summary)
    # Every run's database is dropped afterwards.
    assert "paystream_bench" not in pg_cluster.psql("SELECT datname FROM pg_database")
