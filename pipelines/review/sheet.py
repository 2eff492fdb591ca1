"""The queue as an HTML contact sheet: one card per image (thumbnail, the label to check, its score against
the threshold, the model's guess), every picture embedded so the file opens anywhere on its own."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence

from PIL import Image

from mumic_core import images

from .. import storage
from .queue import LABEL_SEPARATOR

THUMB_PX = 192
MAX_BYTES = 64 << 20  # a thumbnail's source: far above any catalog photo, far below what would hurt

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax({px}px, 1fr)); gap: 12px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 6px; font-size: 12px; overflow-wrap: anywhere; }}
.card img {{ width: 100%; height: {px}px; object-fit: contain; background: #f4f4f4; }}
.missing {{ height: {px}px; display: flex; align-items: center; justify-content: center; background: #fee; }}
.check {{ font-weight: 600; }} .above {{ color: #1a7f37; }} .below {{ color: #b35900; }}
.guess {{ color: #555; }}
</style></head><body>
<h1>{title}</h1>
<p>{intro}</p>
<div class="grid">
{cards}
</div></body></html>
"""


def _thumbnail(data: bytes | None) -> str | None:
    """A JPEG data URI of the image shrunk to THUMB_PX, or None when it cannot be shown."""
    if data is None:
        return None
    try:
        img = images.decode(data)
    except images.ImageError:
        return None
    img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _card(row: Mapping, thumb: str | None, why: str) -> str:
    e = html.escape
    side = "above" if row["score"] >= row["threshold"] else "below"
    picture = f'<img src="{thumb}" alt="{e(row["image_id"])}">' if thumb else f'<div class="missing">{e(why)}</div>'
    guess = ", ".join(row["labels"].split(LABEL_SEPARATOR)) if row["labels"] else "(none)"
    return (
        f'<div class="card">{picture}<div>#{row["rank"]} <b>{e(row["image_id"])}</b></div>'
        f'<div class="check">check: {e(row["review_label"])}</div>'
        f'<div class="{side}">score {row["score"]:.3f} {side} threshold {row["threshold"]:.3f}</div>'
        f'<div class="guess">model says: {e(guess)}</div></div>'
    )


def contact_sheet(
    rows: Sequence[Mapping], uri: str, title: str, intro: str, on_read: Callable[[int], None] | None = None
) -> int:
    """Write the sheet of the queue's rows (QUEUE_COLUMNS as dicts) to `uri`; returns how many pictures
    could not be shown (each gets a card saying why: the queue itself never fails on a picture)."""
    cards, missing = [], 0
    step = 64  # read and shrink a few at a time: memory holds thumbnails, not every original
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        reads = storage.read_many([r["uri"] for r in chunk], max_bytes=MAX_BYTES)
        for row, (data, failed) in zip(chunk, reads, strict=True):
            thumb = _thumbnail(data)
            missing += thumb is None
            why = failed.reason if failed is not None else "cannot be decoded"
            cards.append(_card(row, thumb, why))
        if on_read is not None:
            on_read(start + len(chunk))
    page = _PAGE.format(title=html.escape(title), intro=html.escape(intro), cards="\n".join(cards), px=THUMB_PX)
    storage.write_bytes(uri, page.encode("utf-8"))
    return missing
