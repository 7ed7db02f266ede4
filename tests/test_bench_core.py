"""Smoke test of the core micro-benchmark: it runs and reports every figure
(no timing assertions: speed is reported by benchmarks, not tested)."""

from gateway.bench.core import main, measure


def test_core_benchmark_reports_every_figure(capsys):
    figures = measure(increments=50, repeats=1)
    assert set(figures) == {
        "raw_verify_per_s", "digest_per_s", "receive_payment_per_s",
        "parse_and_receive_per_s", "core_to_raw_ratio",
    }
    assert all(v > 0 for v in figures.values())
    assert main(["--increments", "20", "--json"]) == 0
    assert "core_to_raw_ratio" in capsys.readouterr().out
