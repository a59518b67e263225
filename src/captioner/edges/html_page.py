"""One self-contained HTML page of thumbnails and their captions (`captioner export --html`).

Everything is inline (styles, thumbnails as data: URIs), so the file can be
mailed or opened offline. Object names and captions come from outside (an
uploader, a model): every one is escaped.
"""

from __future__ import annotations

import base64
from html import escape

from captioner.readback import CaptionRecord, who_wrote

_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
h1 { font-size: 1.3rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1rem; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6rem; }
figure img { display: block; width: 100%; height: 180px; object-fit: contain; background: #eee; }
.missing { height: 180px; display: flex; align-items: center; justify-content: center;
  background: #eee; color: #777; }
figcaption { margin-top: .5rem; }
.name { font: 12px ui-monospace, monospace; color: #555; overflow-wrap: anywhere; }
h2 { font-size: 1rem; margin: 1.2rem 0 .5rem; grid-column: 1 / -1; overflow-wrap: anywhere; }
.tags { color: #555; font-size: 13px; }
.by { color: #666; font-size: 12px; }
.status { font-size: 12px; padding: 0 .3rem; border-radius: 3px; background: #e4f2e4; }
.status.other { background: #f6e3e3; }
"""


def page_start(title: str) -> str:
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{escape(title)}</h1><div class=grid>\n"
    )


def card(record: CaptionRecord, thumbnail: bytes | None, mime_type: str = "image/jpeg") -> str:
    if thumbnail is not None:
        data = base64.b64encode(thumbnail).decode("ascii")
        alt = escape(record.alt or record.caption or "")
        picture = f'<img src="data:{escape(mime_type)};base64,{data}" alt="{alt}">'
    else:
        picture = "<div class=missing>no preview</div>"
    status_class = "status" if record.status == "ok" and record.current else "status other"
    if record.status == "none":
        status = "not captioned"
    else:
        status = record.status if record.current else f"{record.status} (older upload)"
    caption = escape(record.caption or "(no caption)")
    if record.written_by == "owner":
        caption += " <span class=tags>(the owner's own caption)</span>"
    parts = [f"<figure>{picture}<figcaption>", f"<div>{caption}</div>"]
    if record.tags:
        parts.append(f"<div class=tags>{escape(', '.join(record.tags))}</div>")
    if (who := who_wrote(record)) is not None:
        parts.append(f"<div class=by>by {escape(who)}</div>")
    parts.append(
        f"<div class=name>{_breakable(record.source)} "
        f"<span class='{status_class}'>{escape(status)}</span></div>"
    )
    parts.append("</figcaption></figure>\n")
    return "".join(parts)


def folder_heading(folder: str) -> str:
    return f"<h2>{_breakable(folder + '/') if folder else '(top level)'}</h2>\n"


def _breakable(name: str) -> str:
    """Escaped, with a line break allowed after each '/', '-', '_' and '.': a long
    name wraps between its parts, and mid-word only where a part is wider than a card."""
    text = escape(name)
    for mark in ("/", "-", "_", "."):
        text = text.replace(mark, mark + "<wbr>")
    return text


def page_end(count: int) -> str:
    return f"</div><p>{count} images.</p></body></html>\n"
