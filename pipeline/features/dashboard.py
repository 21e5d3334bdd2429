"""index.html: one SAE's features.json as a self-contained page (dashboard.html: inline CSS and JS,
no network, no CDN), so it opens from the file system in any browser, offline.

The report is inlined as a JSON script element. JSON has "<" only inside strings, and there it
is written as \\u003c, so no token text can end the element or open a comment.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = Path(__file__).with_name("dashboard.html")
PLACEHOLDER = "/*FEATURES_JSON*/"


def render_dashboard(report_json: str) -> str:
    """The page for a features.json document (its JSON text)."""
    return TEMPLATE.read_text(encoding="utf-8").replace(PLACEHOLDER, report_json.replace("<", "\\u003c"))
