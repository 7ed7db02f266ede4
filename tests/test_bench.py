"""``gateway bench`` smoke tests: a tiny run of each mode through ``gateway.cli.main``.

The bench starts a real node, a real gateway and a load generator as
processes. These tests check that every figure is present and sane — counts
add up, percentiles are ordered, every settlement is confirmed — and never
assert a timing (benchmarks live in the CLI, not in timed tests: design.md).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.bench import percentiles
from gateway.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["bench", "--json", *args]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def _ordered(figures: dict[str, Any]) -> None:
    assert figures["samples"] > 0
    assert 0 <= figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]


def _check_common(r: dict[str, Any], viewers: int, hosts: int = 1) -> None:
    assert r["viewers"] == viewers and r["errors"] == {}
    assert r["paid_chunks_per_s"] > 0 and r["increments_per_s"] > 0
    # One increment per paid chunk (free allowance 0); the window's edges
    # may split a pair, and with several hosts their stores are read one
    # after the other at each edge.
    slack = viewers * hosts
    assert abs(r["paid_chunks_per_s"] - r["increments_per_s"]) * r["seconds"] <= slack
    assert r["media_mbit_per_s"] > 0
    _ordered(r["pay_to_chunk"])
    for kind in ("solo", "solo_with_wallet"):
        _ordered(r["hello_to_ready"][kind])
    assert r["hello_to_ready"]["solo"]["samples"] == min(viewers, 10)
    gw = r["gateway"]
    assert gw["cpu_cores"] > 0 and gw["rss_mb"] >= gw["rss_idle_mb"] > 0
    assert r["cpu_steal_s"] >= 0
    assert gw["store_commits_per_s"] > 0 and gw["writes_per_commit"] >= 1
    # Every commit appends at least a page to the WAL (design.md: real SQLite file).
    assert gw["disk_write_bytes_per_increment"] * gw["writes_per_commit"] >= 2048
    settle = r["settle"]
    assert settle["channels"] == viewers and settle["failed"] == 0
    # Channels closed together share settlements (batches): at most one each.
    assert 1 <= settle["settlements"] == settle["confirmed"] <= viewers
    assert settle["close_all_s"] > 0 and settle["mine_and_confirm_s"] > 0
    ceiling = r["ceiling"]
    assert ceiling["verifies_per_s"] > 1000 and ceiling["digests_per_s"] > ceiling["verifies_per_s"]
    assert 0 < ceiling["increments_per_s"] < ceiling["verifies_per_s"]
    assert ceiling["ratio"] == pytest.approx(r["increments_per_s"] / ceiling["increments_per_s"],
                                             rel=0.01, abs=0.001)
    # Issue 18's per-core figures: CPU per paid chunk, also in ceiling increments.
    assert ceiling["per_core_ratio"] > 0 and ceiling["cpu_per_chunk_us"] > 0
    assert ceiling["cpu_per_chunk_in_increments"] == pytest.approx(
        ceiling["cpu_per_chunk_us"] * ceiling["increments_per_s"] / 1e6, rel=0.02, abs=0.02)


def test_throughput_mode_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    r = _run(capsys, "--viewers", "5", "--seconds", "1", "--warmup", "0.3")
    assert r["mode"] == "throughput" and r["chunk_bytes"] == 1024 and r["pay"] == "binary"
    _check_common(r, 5)
    assert r["gateway_workers"] == 1 and r["gateway"]["processes"] == 1
    assert r["lateness"]["samples"] == 0  # only the paced mode has a schedule


def test_two_load_generators_share_the_viewers_and_the_wallet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Both fund from the node's one wallet: without the funding lock they were
    # given the same coins and one was refused (txn-mempool-conflict).
    r = _run(capsys, "--viewers", "6", "--clients", "2", "--seconds", "1", "--warmup", "0.3")
    _check_common(r, 6)


def test_gateway_workers_are_measured_together(capsys: pytest.CaptureFixture[str]) -> None:
    r = _run(capsys, "--viewers", "6", "--workers", "2", "--seconds", "1", "--warmup", "0.3")
    assert r["gateway_workers"] == 2
    _check_common(r, 6)
    # The supervisor and two workers, measured together.
    assert r["gateway"]["processes"] == 3


def test_paced_mode_reports_lateness(capsys: pytest.CaptureFixture[str]) -> None:
    r = _run(capsys, "--paced", "--viewers", "3", "--seconds", "1", "--warmup", "0.3",
             "--chunk-ms", "100", "--chunk-bytes", "2000", "--rate", "1000", "--json-pay")
    assert r["mode"] == "paced" and r["pay"] == "json"  # as older clients pay
    _check_common(r, 3)
    _ordered(r["lateness"])
    # Paced viewers take one chunk per 100 ms each: ~30/s for 3 viewers, far
    # below what the throughput mode does.
    assert r["paid_chunks_per_s"] <= 3 * 10 * 1.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--viewers", "0"], "--viewers must be at least 1"),
        (["--seconds", "0"], "--seconds must be above 0"),
        (["--rate", "0"], "--rate must be above 0"),
        (["--rate", "abc"], "--rate"),
        (["--chunk-ms", "0"], "--chunk-ms"),
        (["--viewers", "2", "--clients", "3"], "--clients"),
        (["--workers", "0"], "--workers must be between 1 and 64"),
    ],
)
def test_bad_flags_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["bench", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gateway: error: ") and message in err


def test_percentiles_nearest_rank() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(samples) == {"p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0,
                                    "samples": 100}
    assert percentiles([])["samples"] == 0


def test_economics_table_comes_from_kernel_checked_batches(capsys: pytest.CaptureFixture[str]):
    """``gateway bench --economics``: docs/economics.md's figures, every input kernel-checked."""
    result = _run(capsys, "--economics")
    rows = {(r["rate"], r["channels"]): r for r in result["per_channel"]}
    for rate in (1.0, 5.0, 20.0):
        alone, hundred, thousand = rows[rate, 1], rows[rate, 100], rows[rate, 1000]
        assert (hundred["transactions"], thousand["transactions"]) == (1, 2)
        # A batch shares the fixed overhead and the publisher's output.
        assert thousand["vbytes_per_channel"] < hundred["vbytes_per_channel"]
        assert hundred["vbytes_per_channel"] < alone["v1_vbytes"]
        # Each channel's part of a batch's fee is its reserve (its own exit),
        # never less: the feerate reaches every quote.
        assert hundred["fee_per_channel"] == hundred["exit_fee"]
        assert hundred["fee_per_channel"] / hundred["vbytes_per_channel"] >= rate
    for even in result["break_even"]:
        assert even["v2_batch_of_100"] < even["v2_alone"] < even["v1_one_tx_per_channel"]


def test_live_mode_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    """``gateway bench --live``: WebRTC viewers of one stream; figures present and sane."""
    r = _run(capsys, "--live", "--viewers", "2", "--seconds", "1", "--no-pin")
    assert r["viewers"] == 2 and r["video_packets"] > 0
    assert r["gateway_cpu"] > 0 and r["viewers_per_core"] > 0
    assert 0 <= r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"]
    assert 0 < r["pay_to_media_p50_ms"] <= r["pay_to_media_max_ms"]
    # Media flows again (a whole keyframe) before a frame comes out of the decoder,
    # and the gateway's part comes before both.
    assert 0 < r["pay_to_keyframe_p50_ms"] <= r["pay_to_keyframe_max_ms"]
    assert r["pay_to_keyframe_p50_ms"] <= r["pay_to_media_p50_ms"]
    assert 0 <= r["resume_p50_ms"] <= r["pay_to_keyframe_p50_ms"]
    assert r["mse_behind_max_ms"] > 0
    # One encode per rendition, whatever the number of viewers.
    assert set(r["hub_encodes"]) == {"vp8", "opus", "h264", "aac"}
