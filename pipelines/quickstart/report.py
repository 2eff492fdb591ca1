"""A self-contained HTML report of a run: summary, per-class AP, PR curves and a contact sheet of tagged
images (every picture embedded, so the file can be mailed or logged to MLflow as one artifact)."""

from __future__ import annotations

import base64
import html
import io
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow.dataset as pds
from PIL import Image, ImageDraw

from mumic_core import images

from .. import storage
from ..tables import arrow_dataset, open_table, tags_uri

TEMPLATE = Path(__file__).with_name("template.html")


def _b64_png(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def sample_tagged(output: str, run: Mapping, n: int = 24) -> list[dict]:
    """Up to n `ok` rows of a committed run (image_id, uri, labels with scores)."""
    table = open_table(tags_uri(output))
    if table is None:
        return []
    cond = (pds.field("run_id") == run["run_id"]) & (pds.field("status") == "ok")
    rows: list[dict] = []
    for batch in arrow_dataset(table).to_batches(columns=["image_id", "uri", "labels"], filter=cond):
        rows.extend(batch.to_pylist())
        if len(rows) >= n:
            break
    return sorted(rows, key=lambda r: r["image_id"])[:n]


def contact_sheet(rows: Sequence[dict], thumb: int = 128, cols: int = 6, max_labels: int = 4) -> Image.Image:
    """A grid of thumbnails, each captioned with its predicted labels and scores."""
    line_h, caption_lines = 12, max_labels
    cell_w, cell_h = thumb + 8, thumb + 8 + line_h * caption_lines
    n_rows = max(1, -(-len(rows) // cols))
    sheet = Image.new("RGB", (cell_w * cols, cell_h * n_rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        try:
            im = images.decode(storage.read_bytes(row["uri"]))
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except Exception:  # a report must not fail on one unreadable picture
            draw.rectangle([x, y, x + thumb, y + thumb], outline="red")
        for j, lb in enumerate((row.get("labels") or [])[:max_labels]):
            draw.text((x, y + thumb + 2 + j * line_h), f"{lb['label'][:18]} {lb['score']:.2f}", fill="black")
    return sheet


def write_html(
    path: str | Path,
    title: str,
    summary: Mapping[str, object],
    metrics: Mapping[str, float] | None = None,
    charts: Sequence[tuple[str, str | Path]] = (),
    sheet: Image.Image | None = None,
    next_steps: Sequence[str] = (),
) -> Path:
    """Write the report; `charts` are (caption, PNG path) pairs."""
    path = Path(path)
    esc = html.escape
    parts = ["<h2>Run summary</h2><table>"]
    parts += [f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in summary.items()]
    parts.append("</table>")
    if metrics:
        parts.append("<h2>Evaluation</h2><table>")
        parts += [f"<tr><th>{esc(k)}</th><td>{v:.4f}</td></tr>" for k, v in metrics.items()]
        parts.append("</table>")
    for caption, png in charts:
        parts.append(f"<h2>{esc(caption)}</h2><img alt='{esc(caption)}' src='data:image/png;base64,{_b64_png(png)}'>")
    if sheet is not None:
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode()
        parts.append(
            "<h2>Contact sheet: images with their predicted tags</h2>"
            f"<img alt='contact sheet' src='data:image/png;base64,{data}'>"
        )
    if next_steps:
        parts.append("<h2>Next</h2><pre>" + esc("\n".join(next_steps)) + "</pre>")
    page = string.Template(TEMPLATE.read_text(encoding="utf-8"))
    path.write_text(page.substitute(title=esc(title), body="\n".join(parts)), encoding="utf-8")
    return path
