"""index.html is self-contained and works: rendered from the file system by a real browser
with the network off (tests/browser.py: headless chromium; skipped where none is installed)."""

from __future__ import annotations

import json
import re

from pipeline.features.dashboard import render_dashboard
from tests.browser import needs_chromium
from tests.browser import rendered_dom as rendered_url


def top_token(report: dict, row: int) -> str:
    """The text of a store row's token, from the report's segments."""
    segment = next(s for s in report["segments"] if s["first_row"] <= row < s["first_row"] + len(s["tokens"]))
    return report["tokens"][str(segment["tokens"][row - segment["first_row"]])]


def rendered_dom(page, latent: int) -> str:
    """The page's DOM after its scripts ran, opened at one latent's view."""
    return rendered_url(f"{page.resolve().as_uri()}#latent={latent}")


def test_the_page_loads_nothing_from_elsewhere(features_run):
    html = features_run.dashboard.read_text()
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", html, re.I)
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.(com|net|org|io)/", html.replace("http://www.w3.org/2000/svg", ""), re.I)
    assert "@import" not in html and "url(" not in html


def test_token_text_cannot_end_the_data_element():
    page = render_dashboard('{"tokens": {"1": "</script><script>alert(1)</script>"}}')
    assert page.count("</script>") == 2  # the data element's and the page script's own


@needs_chromium
def test_chromium_shows_the_latent_count_and_example_text(features_run):
    report = features_run.train
    latent = max(range(len(report["latents"])), key=lambda j: report["latents"][j]["fires"])
    token = top_token(report, report["latents"][latent]["top"][0]["row"])

    dom = rendered_dom(features_run.dashboard, latent)

    dom = re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)  # what the page shows, not its data
    text = re.sub(r"<[^>]+>", "", dom)
    assert f"{len(report['latents'])} latents (" in text
    assert f"{len(report['latents'])} of {len(report['latents'])} latents" in text  # the table, unfiltered
    assert f"Latent {latent}" in text and "Top activations" in text and "Interval 1:" in text
    shown = re.search(r'<span class="tok self"[^>]*>([^<]*)</span>', dom)  # the first example's own token, shaded
    assert shown and shown.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">") == token.replace("\n", "\u21b5")
    assert "promoted" in text and "suppressed" in text and "Not shown:" not in text


@needs_chromium
def test_chromium_sorts_by_frequency_and_searches_token_text(features_run, tmp_path):
    """Clicks the frequency column and types into the search box (a script appended to a copy of
    the page does what a reader would), then reads the table the page drew."""
    report = features_run.train
    by_frequency = sorted(report["latents"], key=lambda entry: (-entry["frequency"], entry["latent"]))
    words = (top_token(report, entry["top"][0]["row"]).strip() for entry in report["latents"] if entry["top"])
    word = next(w for w in words if w.isalpha() and len(w) >= 3)  # some latent's top token
    actions = """<script>
      document.querySelector('th[data-key="frequency"]').click();
      var rows = document.querySelectorAll("#rows tr");
      document.body.setAttribute("data-sorted", [0, 1, 2].map(function (i) { return rows[i].getAttribute("data-latent"); }).join(","));
      var box = document.getElementById("search"); box.value = %s; box.dispatchEvent(new Event("input"));
      document.body.setAttribute("data-found", document.querySelectorAll("#rows tr").length);
    </script></body>""" % json.dumps(word)
    page = tmp_path / "index.html"
    page.write_text(features_run.dashboard.read_text().replace("</body>", actions))

    dom = rendered_dom(page, 0)

    sorted_rows = re.search(r'data-sorted="([\d,]+)"', dom).group(1)
    assert sorted_rows == ",".join(str(entry["latent"]) for entry in by_frequency[:3])
    found = int(re.search(r'data-found="(\d+)"', dom).group(1))
    assert 0 < found < len(report["latents"])  # the word is some latents' example token, not every latent's
    assert f"{found} of {len(report['latents'])} latents" in dom
