"""Kill -9 of the gateway and of its node, 20 times at random moments, while
channels open, pay and settle: nothing paid is lost, every channel settles,
and every settlement the store calls confirmed is on the chain (tests/chaos.py)."""

from __future__ import annotations

from pathlib import Path

import chaos


async def test_sigkill_of_gateway_and_node_loses_nothing(tmp_path: Path, media_copy: Path):
    report = await chaos.run(tmp_path, media_copy, trials=20)
    assert report.trials == 20 and sum(report.kills.values()) == 20
    assert min(report.kills.values()) > 0  # the gateway, the node, and both
    # Channels were opened, paid into and settled throughout.
    assert report.channels >= 5 and report.closed >= 3 and report.paid > 0
    assert report.settlements >= 1
