"""index.html is self-contained and works: rendered from the file system by a real browser
(headless chromium; skipped where none is installed, installed by .ci/run in CI)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from pipeline.features.dashboard import render_dashboard

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


def rendered_dom(page, latent: int) -> str:
    """The page's DOM after its scripts ran, opened at one latent's view."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--virtual-time-budget=5000", "--dump-dom", f"{page.resolve().as_uri()}#latent={latent}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_page_loads_nothing_from_elsewhere(features_run):
    html = features_run.dashboard.read_text()
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", html, re.I)
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.(com|net|org|io)/", html.replace("http://www.w3.org/2000/svg", ""), re.I)
    assert "@import" not in html and "url(" not in html


def test_token_text_cannot_end_the_data_element():
    page = render_dashboard('{"tokens": {"1": "</script><script>alert(1)</script>"}}')
    assert page.count("</script>") == 2  # the data element's and the page script's own


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs it)")
def test_chromium_shows_the_latent_count_and_example_text(features_run):
    report = features_run.train
    latent = max(range(len(report["latents"])), key=lambda j: report["latents"][j]["fires"])
    top = report["latents"][latent]["top"][0]
    segment = next(s for s in report["segments"] if s["first_row"] <= top["row"] < s["first_row"] + len(s["tokens"]))
    token = report["tokens"][str(segment["tokens"][top["row"] - segment["first_row"]])]

    dom = rendered_dom(features_run.dashboard, latent)

    dom = re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)  # what the page shows, not its data
    text = re.sub(r"<[^>]+>", "", dom)
    assert f"{len(report['latents'])} latents (" in text
    assert f"{len(report['latents'])} of {len(report['latents'])} latents" in text  # the table, unfiltered
    assert f"Latent {latent}" in text and "Top activations" in text and "Interval 1:" in text
    shown = re.search(r'<span class="tok self"[^>]*>([^<]*)</span>', dom)  # the first example's own token, shaded
    assert shown and shown.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">") == token.replace("\n", "\u21b5")
    assert "promoted" in text and "suppressed" in text and "Not shown:" not in text
