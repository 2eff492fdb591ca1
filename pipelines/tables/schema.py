"""The output tables' schemas: `tags` (one row per image per run), `current`, `runs` (one row per committed
run) and `drift` (one row per label per comparison of two runs)."""

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


# What the catalog's listing (or a metadata request) says of an object: its size, ETag (S3) and
# modification time. Equal values mean unchanged bytes, so the next run can skip it without a download.
OBJECT_FIELDS = [("size", pa.int64()), ("etag", pa.string()), ("mtime", UTC_TS)]
OBJECT_COLUMNS = tuple(name for name, _ in OBJECT_FIELDS)


# One row per catalog image_id ever seen (until a --prune run drops it): what its labels are now.
# status / error: the outcome of the last run that saw the image; labels ... tags_version: the last
# run that tagged its bytes ok (null when none ever did); last_seen_*: the last run that listed it;
# size / etag / mtime: the object as listed when its bytes were last read (or found unchanged) ok.
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
        *OBJECT_FIELDS,  # added after the first release: tables written before lack them until their next update
    ]
)
# the columns that come with a tagging (a `tags` row); the rest say when the image was last seen, and as what
LABEL_COLUMNS = tuple(
    n
    for n in CURRENT_SCHEMA.names
    if n not in ("uri", "status", "error", "last_seen_run_id", "last_seen_at", *OBJECT_COLUMNS)
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
        # what the inference actors ran (fp32, bf16, int8); added later: a runs table written before
        # gains it at its next append (`commit.ensure_run_row`), its older rows null
        ("precision", pa.string()),
    ]
)


RUN_FIELDS = tuple(RUNS_SCHEMA.names)


# `mumic drift`: one row per label per comparison (from_run_id, to_run_id, scope); the comparison's own
# facts (rows compared, models, centroid shift, the test's settings) repeat on each of its rows.
DRIFT_SCHEMA = pa.schema(
    [
        *_strings("from_run_id", "to_run_id", "scope", "label"),
        ("images_from", pa.int64()),  # rows whose taxonomy has this label; null when it has not
        ("images_to", pa.int64()),
        ("above_from", pa.int64()),  # of those, rows scoring at or above the label's threshold
        ("above_to", pa.int64()),
        ("rate_from", pa.float64()),
        ("rate_to", pa.float64()),
        ("change", pa.float64()),  # rate_to - rate_from
        ("mean_score_from", pa.float64()),
        ("mean_score_to", pa.float64()),
        ("p_value", pa.float64()),  # two-proportion z-test
        ("q_value", pa.float64()),  # Benjamini-Hochberg across the comparison's labels
        ("flagged", pa.bool_()),
        ("threshold_source", pa.string()),  # `model`, `fallback`, or `model+fallback`
        *_strings("from_run_date", "to_run_date", "models_from", "models_to"),
        ("rows_from", pa.int64()),
        ("rows_to", pa.int64()),
        ("centroid_model", pa.string()),
        ("centroid_shift", pa.float64()),  # cosine distance of the mean embeddings; null across models
        ("alpha", pa.float64()),
        ("min_change", pa.float64()),
        ("computed_at", UTC_TS),
    ]
)


def retag_app_id(run_id: str) -> str:
    return f"mumic-retag:{run_id}"


def current_app_id(run_id: str) -> str:
    return f"mumic-current:{run_id}"


def runs_app_id(run_id: str) -> str:
    return f"mumic-runs:{run_id}"


# `mumic duplicates`: one row per image in a group of near-duplicates (rewritten by each invocation).
# group_id 1 is the largest group; a group's first image is its lowest image_id; similarity is the cosine
# similarity of the row's embedding to the first image's (1 for the first image itself).
DUPLICATES_SCHEMA = pa.schema(
    [
        ("group_id", pa.int64()),
        ("group_size", pa.int64()),
        *_strings("image_id", "uri", "content_sha256", "first_image_id"),
        ("similarity", pa.float32()),
        ("exact_duplicate", pa.bool_()),  # another image of the group has the same bytes (content_sha256)
        *_strings("model_name", "model_version"),
        ("threshold", pa.float64()),
        ("current_version", pa.int64()),  # the `current` version the groups were computed from
        ("run_id", pa.string()),  # the latest committed run at that time
        ("computed_at", UTC_TS),
    ]
)
