"""`mumic runs`: the committed runs of an output location."""

from __future__ import annotations

import json

from pydantic.dataclasses import dataclass

from jobs.options import json_field, output_field

NAME = "runs"
HELP = "list committed runs: run id, date, model version, counts by status"


@dataclass(frozen=True)
class RunsArgs:
    output: str = output_field()
    json: bool = json_field("one object per run")


def options() -> tuple[type, ...]:
    return (RunsArgs,)


def run(args: RunsArgs) -> int:
    # lazily, where it is needed: `mumic --help` and usage errors load no pipeline
    from pipelines import tables

    runs = tables.list_runs(args.output).to_pylist()
    if args.json:
        for r in runs:
            print(json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()}))
        return 0
    if not runs:
        print(f"no committed runs in {args.output}")
        return 0
    header = ("run_id", "run_date", "finished_at", "model", "ok", "error", "skipped")
    rows = [
        (
            r["run_id"],
            r["run_date"],
            r["finished_at"].strftime("%Y-%m-%d %H:%M:%S") if r["finished_at"] else "",
            f"{r['model_name']}/{r['model_version']}",
            str(r["rows_ok"]),
            str(r["rows_error"]),
            str(r["rows_skipped"]),
        )
        for r in runs
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0
