"""Live pay-per-view in real headless Chromium (issue 16, must-hold 1 and 2).

One Chromium publishes its fake camera and microphone from the "Go live" page
(``/golive/<id>``, WHIP with the publisher's token); a second watches the
live item on ``/watch/<id>``, funds from the demo faucet and plays through a
shortened free allowance into paid seconds: over WebRTC (``getStats``
frames decoded, the video element's time) and over MediaSource (``?mse=1``).
Pausing stops the page's payments: the media stops within two seconds;
playing again pays and the media flows again. Closing settles exactly the
seconds paid for.

Chromium leaves loopback out of WebRTC and hides host addresses behind mDNS
names unless told otherwise; the gateway (bound to 127.0.0.1) keeps only
loopback candidates (gateway/ice.py), so both browsers run with
``--allow-loopback-in-peer-connection`` and mDNS candidates off.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest_browser import CHROMEDRIVER, CHROMIUM, FLAGS, Browser, _require_chromium

from gateway.keys import MasterKey
from gateway.media.catalog import add_live
from gateway.server import Gateway

LIVE = "concert"
RATE_MSAT = 300_000
FREE_MS = 3000
VIDEO = "document.getElementById('video')"
LIVE_FLAGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]


def _driver() -> tuple[Any, str]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="paystream-live-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, *LIVE_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    return driver, profile


@pytest.fixture(scope="module")
def two_chromiums() -> Iterator[tuple[Browser, Browser]]:
    """A publisher's and a viewer's Chromium, with a fake camera and loopback WebRTC."""
    _require_chromium()
    made = [_driver(), _driver()]
    try:
        yield Browser(made[0][0]), Browser(made[1][0])
    finally:
        for driver, profile in made:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def live_gw(gateway_factory: Any, media_copy: Path) -> AsyncIterator[Gateway]:
    add_live(media_copy, LIVE, title="Concert", publisher="studio", rate_msat=RATE_MSAT,
             free_ms=FREE_MS)
    gw: Gateway = await gateway_factory()
    yield gw


def url(gw: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


async def go_live(publisher: Browser, gw: Gateway) -> None:
    await publisher.get(url(gw, f"/golive/{LIVE}"))
    token = MasterKey.load_or_create(gw.datadir / "master.key").publisher_token("studio")
    await publisher.type("#golive-token", token)
    await publisher.click("#golive-start")
    await publisher.wait_for("window.golive.status === 'live' || window.golive.error",
                             what="on air")
    assert await publisher.js("return window.golive.error;") is None
    deadline = time.monotonic() + 30
    while gw.on_air.hub(LIVE) is None or gw.on_air.hubs[LIVE].mse.latest is None:
        assert time.monotonic() < deadline, "no media from the publishing browser"
        await asyncio.sleep(0.1)


async def fund_and_play(viewer: Browser, gw: Gateway, query: str = "") -> None:
    await viewer.get(url(gw, f"/watch/{LIVE}{query}"))
    await viewer.wait_for("window.paystream && window.paystream.state === 'budget'",
                          what="the budget form")
    await viewer.click("#budget-ok")
    await viewer.wait_for("window.paystream.state === 'funding'", what="the funding panel")
    await viewer.click("#faucet")
    await viewer.wait_for("window.paystream.state === 'ready'", what="a ready channel")


async def stop_live(publisher: Browser) -> None:
    await publisher.click("#golive-stop")
    await publisher.wait_for("window.golive.status === 'off'", what="off air")


async def paid_then_stopped_then_paid(
    viewer: Browser, progress: str, stopped: Callable[[], bool] | None = None
) -> None:
    """Media flows while paid, stops within 2 s when paying stops, flows when it resumes.

    ``progress`` is a JS expression that grows while media arrives.
    """
    # Through the free seconds into two paid ones.
    await viewer.wait_for(f"window.paystream.paid >= window.paystream.exitFee + "
                          f"{2 * RATE_MSAT // 1000}", timeout=40, what="paid seconds")
    before = await viewer.js(f"return {progress};")
    time_before = await viewer.js(f"return {VIDEO}.currentTime;")
    await asyncio.sleep(1.5)
    assert await viewer.js(f"return {progress};") > before, "no media while paid"
    assert await viewer.js(f"return {VIDEO}.currentTime;") > time_before
    # Paying stops (the viewer pauses): within 2 s nothing more arrives.
    await viewer.js(f"{VIDEO}.pause();")
    await asyncio.sleep(2.0)
    stalled = await viewer.js(f"return {progress};")
    paid = await viewer.js("return window.paystream.paid;")
    await asyncio.sleep(2.0)
    assert await viewer.js(f"return {progress};") == stalled, "media without payment"
    assert await viewer.js("return window.paystream.paid;") == paid
    if stopped is not None:
        assert stopped(), "the gateway still forwards media"
    # Playing again pays again: media flows.
    await viewer.js(f"{VIDEO}.play();")
    await viewer.wait_for(f"{progress} > {stalled}", timeout=10, what="media after paying again")
    time_again = await viewer.js(f"return {VIDEO}.currentTime;")
    await asyncio.sleep(1.0)
    assert await viewer.js(f"return {VIDEO}.currentTime;") > time_again


async def close_and_check_bill(viewer: Browser, media_ms: str) -> None:
    """Close from the page: the channel settles with exactly the seconds paid for."""
    await viewer.click("#leave")
    closed = await viewer.wait_for("window.paystream.closed", what="closed")
    delivered = await viewer.js(f"return {media_ms};")
    billed_ms = max(0, delivered - FREE_MS)
    assert closed["paid"] == closed["exit_fee"] + -(-RATE_MSAT * billed_ms // 1_000_000)


async def test_browser_publishes_over_whip_and_a_browser_watches_over_webrtc(
    two_chromiums: tuple[Browser, Browser], live_gw: Gateway
) -> None:
    publisher, viewer = two_chromiums
    gw = live_gw
    await go_live(publisher, gw)
    try:
        await fund_and_play(viewer, gw)
        await viewer.wait_for("window.paystream.transport === 'webrtc' && "
                              "window.paystream.framesDecoded > 0", timeout=30,
                              what="frames decoded over WebRTC")
        hub = gw.on_air.hubs[LIVE]

        def gateway_stopped() -> bool:  # the gateway holds the viewer at an unpaid interval
            return all(v.waiting_interval is not None for v in hub.viewers) and bool(hub.viewers)

        await paid_then_stopped_then_paid(viewer, "window.paystream.framesDecoded",
                                          gateway_stopped)
        await close_and_check_bill(viewer, "window.paystream.deliveredMs")
        await viewer.screenshot("live-webrtc-viewer.png")
        # The dashboard shows the live item as it happens: on air, the seconds paid.
        await viewer.get(url(gw, "/dashboard"))
        await viewer.type("#token", gw.operator_token)
        await viewer.click("#login button")
        row = await viewer.wait_for(
            "window.paystreamDashboard.data.live && "
            "document.querySelector('#live tbody tr')?.innerText", what="the live table")
        tally = gw.on_air.tally(LIVE)
        assert "on air" in row and f"{tally.paid_ms / 1000:.0f}" in row
        assert str(tally.bill / 1_000_000).rstrip("0").rstrip(".") in row
    finally:
        await stop_live(publisher)
    # The item is off air, and its viewers were told.
    assert gw.on_air.on_air() == set()


async def test_browser_watches_a_live_item_over_mediasource(
    two_chromiums: tuple[Browser, Browser], live_gw: Gateway
) -> None:
    publisher, viewer = two_chromiums
    gw = live_gw
    await go_live(publisher, gw)
    try:
        await fund_and_play(viewer, gw, "?mse=1")
        buffered = (f"({VIDEO}.buffered.length ? "
                    f"{VIDEO}.buffered.end({VIDEO}.buffered.length - 1) : 0)")
        await viewer.wait_for(f"window.paystream.transport === 'mse' && {buffered} > 0",
                              timeout=30, what="live fragments in MediaSource")
        await paid_then_stopped_then_paid(viewer, buffered)
        await close_and_check_bill(viewer, "window.paystream.deliveredMs")
    finally:
        await stop_live(publisher)
