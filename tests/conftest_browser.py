"""Fixtures for browser tests: Debian's headless Chromium driven by selenium.

The gateway fixtures run in the test's event loop, and selenium blocks, so
every browser call goes through :class:`Browser`, which runs it in a worker
thread (``asyncio.to_thread``) while the loop keeps serving the page.

Chromium comes from Debian (``apt-get install -y chromium chromium-driver``);
``Service("/usr/bin/chromedriver")`` keeps selenium-manager from downloading
anything. Without Chromium the tests fail when ``CI=true`` (a CI machine must
have it) and are skipped with the install line otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Screenshots and browser logs of the browser tests (gitignored).
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=1100,1000",
]


def _require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    node_modules = ROOT / "player" / "web" / "node_modules" / "@noble" / "curves"
    if not node_modules.is_dir():
        missing.append("player/web/node_modules (npm ci --prefix player/web)")
    if missing:
        message = (
            f"browser tests need {', '.join(missing)}: "
            "apt-get install -y chromium chromium-driver; npm ci --prefix player/web"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


class Browser:
    """One Chromium, driven from async tests without blocking the gateway's loop."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run a blocking selenium call in a worker thread."""
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        """Navigate to ``url`` (the old page gets pagehide)."""
        await self.call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        """``execute_script``: the value of ``return …`` in the page."""
        return await self.call(self.driver.execute_script, script, *args)

    async def wait_for(self, expression: str, *, timeout: float = 30, what: str = "") -> Any:
        """Poll the JS ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.js(f"return ({expression});")
            if value:
                return value
            await asyncio.sleep(0.1)
        logs = await self.console()
        raise AssertionError(f"timed out waiting for {what or expression} (last {value!r}); "
                             f"browser console: {logs}")

    async def click(self, css: str) -> None:
        """Click the element matching ``css``."""
        from selenium.webdriver.common.by import By

        element = await self.call(self.driver.find_element, By.CSS_SELECTOR, css)
        await self.call(element.click)

    async def type(self, css: str, text: str, *, clear: bool = True) -> None:
        """Type ``text`` into the input matching ``css``."""
        from selenium.webdriver.common.by import By

        element = await self.call(self.driver.find_element, By.CSS_SELECTOR, css)
        if clear:
            await self.call(element.clear)
        await self.call(element.send_keys, text)

    async def text(self, css: str) -> str:
        """The visible text of the element matching ``css``."""
        from selenium.webdriver.common.by import By

        element = await self.call(self.driver.find_element, By.CSS_SELECTOR, css)
        return str(await self.call(lambda: element.text))

    async def screenshot(self, name: str) -> Path:
        """Save a PNG of the page under test-artifacts/ and return its path."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        assert await self.call(self.driver.save_screenshot, str(path)), "screenshot failed"
        return path

    async def console(self) -> list[str]:
        """Browser console messages since the last call."""
        try:
            entries = await self.call(self.driver.get_log, "browser")
        except Exception:  # a driver without logs: nothing to add
            return []
        return [f"{e.get('level')}: {e.get('message')}" for e in entries]


@pytest.fixture(scope="session")
def chromium_driver() -> Iterator[Any]:
    """One headless Debian Chromium for the test session (fresh profile dir)."""
    _require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="paystream-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium_driver: Any) -> Iterator[Browser]:
    """The session's Chromium on a blank page (each gateway is a new origin: new storage)."""
    chromium_driver.get("about:blank")
    yield Browser(chromium_driver)
    chromium_driver.get("about:blank")  # pagehide for the last page, before its gateway stops
