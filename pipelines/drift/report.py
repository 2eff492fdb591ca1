"""What a comparison shows people: the text printout (biggest movers first) and an HTML page with an
embedded PNG of the rates per label (from vs to, biggest movers first, flagged labels marked)."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

MAX_BARS = 40  # labels drawn in the chart; the table below it lists every label


def by_movement(rows: list[dict]) -> list[dict]:
    """Flagged labels first, then by |change| (labels without one last), then by name."""
    return sorted(rows, key=lambda r: (not r["flagged"], r["change"] is None, -abs(r["change"] or 0.0), r["label"]))


def _num(value, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def summary_lines(summary: dict) -> list[str]:
    s = summary
    shift = "null" if s["centroid_shift"] is None else f"{s['centroid_shift']:.4f}"
    return [
        f"scope {s['scope']}: run {s['from_run_id']} ({s['from_run_date']}, {s['rows_from']} images, {s['models_from']})"
        f" -> run {s['to_run_id']} ({s['to_run_date']}, {s['rows_to']} images, {s['models_to']})",
        f"centroid shift (cosine distance): {shift}, {s['centroid_note']}",
        f"{s['flagged']} of {s['labels']} labels flagged (Benjamini-Hochberg q < {s['alpha']} and |change| >= {s['min_change']})",
    ]


def format_text(summary: dict, rows: list[dict], top: int) -> str:
    header = ("label", "rate_from", "rate_to", "change", "mean_from", "mean_to", "q_value", "flag")
    table = [
        (r["label"], _num(r["rate_from"]), _num(r["rate_to"]), _num(r["change"], "+.3f"), _num(r["mean_score_from"]),
         _num(r["mean_score_to"]), _num(r["q_value"], ".2g"), "DRIFT" if r["flagged"] else "")
        for r in by_movement(rows)[:top]
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    lines = [*summary_lines(summary), "", "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table]
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more labels in the drift table and the report")
    return "\n".join(lines)


def chart_png(summary: dict, rows: list[dict]) -> bytes:
    """Horizontal bars per label: the from and to rates, biggest movers on top, flagged labels in red."""
    shown = by_movement(rows)[:MAX_BARS][::-1]  # barh draws bottom-up
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(shown) + 1.2)))
    y = range(len(shown))
    ax.barh([i + 0.2 for i in y], [r["rate_from"] or 0.0 for r in shown], height=0.4, color="0.65",
            label=f"from {summary['from_run_id']}")
    ax.barh([i - 0.2 for i in y], [r["rate_to"] or 0.0 for r in shown], height=0.4, color="tab:blue",
            label=f"to {summary['to_run_id']}")
    ax.set_yticks(list(y), [("* " if r["flagged"] else "") + r["label"] for r in shown])
    for tick, r in zip(ax.get_yticklabels(), shown, strict=True):
        if r["flagged"]:
            tick.set_color("tab:red")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of images at or above the label's threshold")
    ax.set_title(f"label rates, {summary['scope']} scope (* flagged)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def html_page(summary: dict, rows: list[dict], warnings: list[str]) -> str:
    esc = html.escape
    title = f"mumic drift: {summary['from_run_id']} -> {summary['to_run_id']} ({summary['scope']})"
    png = base64.b64encode(chart_png(summary, rows)).decode()
    parts = [f"<h1>{esc(title)}</h1>", *(f"<p>{esc(line)}</p>" for line in summary_lines(summary))]
    parts += [f"<p class='warn'>warning: {esc(w)}</p>" for w in warnings]
    parts.append(f"<img alt='label rates' src='data:image/png;base64,{png}'>")
    cols = ("label", "images_from", "images_to", "rate_from", "rate_to", "change", "mean_score_from",
            "mean_score_to", "p_value", "q_value", "flagged", "threshold_source")
    parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
    for r in by_movement(rows):
        cells = [r[c] if isinstance(r[c], str | bool | int) or r[c] is None else f"{r[c]:.4g}" for c in cols]
        mark = " class='flagged'" if r["flagged"] else ""
        parts.append(f"<tr{mark}>" + "".join(f"<td>{esc('-' if v is None else str(v))}</td>" for v in cells) + "</tr>")
    parts.append("</table>")
    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{padding:2px 8px;"
             "border-bottom:1px solid #ddd;text-align:left} .flagged td{color:#b00;font-weight:bold} .warn{color:#a60}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
