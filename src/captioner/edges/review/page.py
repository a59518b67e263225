"""The review page's HTML: a shell with no data in it but escaped attributes.

The cards are built by review.js from JSON, as text. The shell carries the session's
CSRF token and settings in ``<meta>`` attributes (escaped), because the
Content-Security-Policy lets no inline script run.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

STATUS_LABELS = (
    ("all", "every status"),
    ("ok", "ok"),
    ("blocked", "blocked"),
    ("error", "error"),
    ("stale", "stale (other model or prompt)"),
    ("never", "never captioned"),
    ("human", "by a person"),
)


def page(target: str, csrf: str, config: dict[str, Any]) -> str:
    options = "".join(
        f'<option value="{value}">{escape(label)}</option>' for value, label in STATUS_LABELS
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="captioner-csrf" content="{escape(csrf)}">
<meta name="captioner-config" content="{escape(json.dumps(config))}">
<title>Review {escape(target)}</title>
<link rel="stylesheet" href="/static/review.css">
<script src="/static/review.js" defer></script>
</head><body>
<header>
<h1>Review <span id="target">{escape(target)}</span></h1>
<form id="filters" role="search">
<label>Status <select id="status" name="status">{options}</select></label>
<label>Folder <input id="folder" name="folder" list="folder-list" placeholder="all folders"
  autocomplete="off"></label>
<datalist id="folder-list"></datalist>
<label>Text <input id="text" name="text" type="search" placeholder="in caption, alt, tags"></label>
</form>
<p id="keys">j / k next, previous · e edit · Ctrl+Enter save · a approve · Esc cancel</p>
<p id="progress" role="status" aria-live="polite">Listing…</p>
</header>
<main id="grid" aria-label="images"></main>
<div id="more"><button id="load-more" type="button">Load more</button></div>
</body></html>
"""
