"""The repository as a new user finds it (issue 14 items 16 and 17).

A fresh clone holds ``media/`` (its README and ``.gitignore``); the demo's
steps, ``gateway media sample`` then ``gateway serve --demo``, work in it and
leave nothing untracked; the player line the demo prints is the README's.
The clone is made of the files git tracks here, copied into a new repository,
so that what is tested is what a clone gets.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.config import Config
from gateway.server_cli import _print_demo_hint

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def tracked() -> list[str]:
    """The files git tracks in this checkout (skips outside a git checkout)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    return _git("ls-files").splitlines()


def _clone(tracked: list[str], target: Path, paths: tuple[str, ...]) -> Path:
    """A new repository holding the tracked files among ``paths``, committed."""
    target.mkdir()
    for name in tracked:
        if name in paths or name.startswith(tuple(p + "/" for p in paths)):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    _git("init", "-q", cwd=target)
    _git("add", "-A", cwd=target)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone",
         "--allow-empty", cwd=target)
    return target


def test_media_is_tracked_with_a_readme_and_a_gitignore(tracked: list[str]) -> None:
    assert "media/README.md" in tracked and "media/.gitignore" in tracked
    readme = (REPO / "media" / "README.md").read_text()
    # The catalog's format, by hand and with the CLI, and where the sample comes from.
    for needed in ("catalog.toml", "[publishers.", "[items.", "rate_msat", "free_ms",
                   "gateway publisher add", "gateway publish ", "gateway media sample",
                   "gateway media list", "PyAV"):
        assert needed in readme, needed
    assert "http://" not in readme and "https://" not in readme  # nothing outside the repo


def test_the_demo_steps_work_in_a_fresh_clone_and_leave_nothing_untracked(
    tracked: list[str], tmp_path: Path
) -> None:
    clone = _clone(tracked, tmp_path / "clone", (".gitignore", "media"))
    assert (clone / "media" / "README.md").exists()  # media/ is there before the demo
    gateway = [sys.executable, "-m", "gateway.cli"]
    sample = subprocess.run([*gateway, "media", "sample", "--seconds", "2"], cwd=clone,
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert "published sample-video" in sample.stdout
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [*gateway, "serve", "--demo", "--port", "0", "--rpc-port", "0"],
            cwd=clone, stdout=out, stderr=subprocess.STDOUT)
    try:
        info_path = clone / "data" / "gateway.json"
        deadline = time.monotonic() + 60
        while not info_path.exists():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        web = json.loads(info_path.read_text())["web"]
        with urllib.request.urlopen(web + "api/catalog", timeout=20) as answer:
            ids = [item["id"] for item in json.load(answer)]
        assert ids == ["sample-music", "sample-video"]
    finally:
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
    # media/.lock, the catalog, the items, the sources, data/: all ignored.
    assert (clone / "media" / ".lock").exists() and (clone / "media" / "catalog.toml").exists()
    status = _git("status", "--porcelain", "--untracked-files=all", cwd=clone)
    assert status == ""


def test_the_player_line_the_demo_prints_is_the_readmes(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(\.venv/bin/player play .*?)```", readme, re.S)
    assert block is not None
    documented = shlex.split(block[1].replace("\\\n", " "))
    _print_demo_hint(Config())
    printed = capsys.readouterr().out.splitlines()[-1]
    assert shlex.split(printed) == documented
