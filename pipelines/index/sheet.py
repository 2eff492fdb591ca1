"""The HTML sheet of `mumic duplicates`: the largest groups first, each image a small JPEG thumbnail
embedded in the page (one file to open or mail), with its id and similarity to the group's first image."""

from __future__ import annotations

import base64
import html
import io

import pyarrow as pa

from mumic_core.images import ImageError, decode

from .. import storage

THUMB = 112  # pixels, the longer side
MAX_THUMB_BYTES = 32 << 20  # an image above this is shown as a caption only


def write_sheet(rows: pa.Table, uri: str, title: str, max_groups: int = 50, per_group: int = 12) -> str:
    """Write the sheet of `rows` (the `duplicates` table, in its order) to `uri`; returns `uri`."""
    groups: dict[int, list[dict]] = {}
    for row in rows.to_pylist():
        if row["group_id"] <= max_groups and len(groups.setdefault(row["group_id"], [])) < per_group:
            groups[row["group_id"]].append(row)
    shown = [row for members in groups.values() for row in members]
    thumbs = _thumbnails([row["uri"] for row in shown])
    sections = []
    for group_id, members in groups.items():
        size, same = members[0]["group_size"], sum(1 for r in members if r["exact_duplicate"])
        cells = "".join(_cell(row, thumbs.get(row["uri"])) for row in members)
        more = f" (first {len(members)} shown)" if size > len(members) else ""
        sections.append(
            f"<section><h2>group {group_id}: {size} images{more}"
            f"{f', {same} with the same bytes as another' if same else ''}</h2><div class='grid'>{cells}</div></section>"
        )
    n_groups = len(set(rows.column("group_id").to_pylist())) if rows.num_rows else 0
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} .grid{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0;width:{THUMB + 16}px;font-size:11px;word-break:break-all}} img{{display:block;max-width:{THUMB}px}}
.same{{color:#b00;font-weight:bold}} .first{{outline:2px solid #36c}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{n_groups} groups, {rows.num_rows} images; the {len(groups)} largest shown,
first image (lowest image_id) outlined; the number is the cosine similarity to it.</p>
{''.join(sections) or '<p>No near-duplicates at this threshold.</p>'}</body></html>"""
    storage.write_bytes(uri, page.encode("utf-8"))
    return uri


def _cell(row: dict, thumb: str | None) -> str:
    first = row["image_id"] == row["first_image_id"]
    img = f"<img alt='' src='data:image/jpeg;base64,{thumb}'>" if thumb else "<div>(unreadable)</div>"
    mark = " <span class='same'>same bytes</span>" if row["exact_duplicate"] else ""
    return (
        f"<figure class='{'first' if first else ''}'>{img}<figcaption>{html.escape(row['image_id'])}<br>"
        f"{row['similarity']:.3f}{mark}</figcaption></figure>"
    )


def _thumbnails(uris: list[str]) -> dict[str, str]:
    """uri → base64 JPEG thumbnail, for those that can be read and decoded."""
    unique = sorted(set(uris))
    out = {}
    for uri, (data, _failure) in zip(unique, storage.read_many(unique, max_bytes=MAX_THUMB_BYTES), strict=True):
        if data is None:
            continue
        try:
            img = decode(data)
        except ImageError:
            continue
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        out[uri] = base64.b64encode(buf.getvalue()).decode()
    return out
