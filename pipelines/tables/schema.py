"""The output tables' schemas: `tags` (one row per image per run) and `runs` (one row per committed run)."""

from __future__ import annotations

import pyarrow as pa

LABEL_TYPE = pa.struct([pa.field("label", pa.string()), pa.field("score", pa.float32())])


LABELS_TYPE = pa.list_(LABEL_TYPE)


FLOATS_TYPE = pa.list_(pa.float32())


UTC_TS = pa.timestamp("us", tz="UTC")


PARTITION = "run_date"


def _strings(*names: str) -> list[tuple[str, pa.DataType]]:
    return [(name, pa.string()) for name in names]


TAGS_SCHEMA = pa.schema(
    [
        *_strings("image_id", "uri", "content_sha256", "status", "error"),
        ("labels", LABELS_TYPE),
        ("scores", FLOATS_TYPE),
        ("embedding", FLOATS_TYPE),
        *_strings("model_name", "model_version", "taxonomy_sha256", "run_id", "run_date"),
        ("processed_at", UTC_TS),
    ]
)


# One row per catalog image_id ever seen (until a --prune run drops it): what its labels are now.
# status / error: the outcome of the last run that saw the image; labels ... tags_version: the last
# run that tagged its bytes ok (null when none ever did); last_seen_*: the last run that listed it.
CURRENT_SCHEMA = pa.schema(
    [
        *_strings("image_id", "uri", "content_sha256", "status", "error"),
        ("labels", LABELS_TYPE),
        ("scores", FLOATS_TYPE),
        ("embedding", FLOATS_TYPE),
        *_strings("model_name", "model_version", "taxonomy_sha256", "run_id", "run_date"),
        ("processed_at", UTC_TS),
        ("tags_version", pa.int64()),  # the `tags` commit that holds these labels (time travel)
        ("last_seen_run_id", pa.string()),
        ("last_seen_at", UTC_TS),
    ]
)
# the columns that come with a tagging (a `tags` row); the rest say when the image was last seen
LABEL_COLUMNS = tuple(
    n for n in CURRENT_SCHEMA.names if n not in ("uri", "status", "error", "last_seen_run_id", "last_seen_at")
)


# Data files hold every column but the partition column, whose value lives in the commit (Delta's rule).
TAGS_FILE_SCHEMA = pa.schema([f for f in TAGS_SCHEMA if f.name != PARTITION])


RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("run_date", pa.string()),
        ("started_at", UTC_TS),
        ("finished_at", UTC_TS),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("taxonomy", pa.string()),  # JSON list of label names
        ("catalog", pa.string()),
        ("rows_ok", pa.int64()),
        ("rows_error", pa.int64()),
        ("rows_skipped", pa.int64()),
    ]
)


RUN_FIELDS = tuple(RUNS_SCHEMA.names)


def retag_app_id(run_id: str) -> str:
    return f"mumic-retag:{run_id}"


def current_app_id(run_id: str) -> str:
    return f"mumic-current:{run_id}"


def runs_app_id(run_id: str) -> str:
    return f"mumic-runs:{run_id}"
