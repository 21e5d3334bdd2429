"""Headless chromium for the tests that check a page in a real browser (the features dashboard,
`dvc plots show`'s page): skipped where none is installed (.ci/run installs it in CI). Pages are
rendered with the network off: every request goes to a proxy at a closed port, loopback included,
so a page that needs anything but its own files shows that it does."""

from __future__ import annotations

import shutil
import subprocess

import pytest

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs it)")


def rendered_dom(url: str) -> str:
    """The DOM of the page at `url` (e.g. a file:// URI) after its scripts ran, offline."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
