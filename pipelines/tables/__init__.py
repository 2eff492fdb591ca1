"""The output tables: their schemas (`schema`), opening and reading them (`delta`) and the read side
(`queries`: committed runs, the latest run, content hashes already tagged, embedding search)."""

from .delta import arrow_dataset, open_or_create, open_table
from .queries import (
    current_uri,
    get_run,
    iter_ok_hashes,
    latest_run,
    list_runs,
    runs_uri,
    search_embeddings,
    tags_uri,
)
from .schema import (
    CURRENT_SCHEMA,
    FLOATS_TYPE,
    LABEL_COLUMNS,
    LABEL_TYPE,
    LABELS_TYPE,
    PARTITION,
    RUN_FIELDS,
    RUNS_SCHEMA,
    TAGS_FILE_SCHEMA,
    TAGS_SCHEMA,
    UTC_TS,
    current_app_id,
    retag_app_id,
    runs_app_id,
)

__all__ = [
    "arrow_dataset",
    "CURRENT_SCHEMA",
    "LABEL_COLUMNS",
    "current_app_id",
    "current_uri",
    "FLOATS_TYPE",
    "LABELS_TYPE",
    "LABEL_TYPE",
    "PARTITION",
    "RUNS_SCHEMA",
    "RUN_FIELDS",
    "TAGS_FILE_SCHEMA",
    "TAGS_SCHEMA",
    "UTC_TS",
    "get_run",
    "iter_ok_hashes",
    "latest_run",
    "list_runs",
    "open_or_create",
    "open_table",
    "retag_app_id",
    "runs_app_id",
    "runs_uri",
    "search_embeddings",
    "tags_uri",
]
