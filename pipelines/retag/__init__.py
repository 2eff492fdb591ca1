"""The nightly retag job, one module per step of its flow:

    options (RetagOptions) → plan (resources) → catalog (snapshot of what to tag) → dataset (Ray Data:
    fetch → decode → infer) → staging (parts) → commit (one Delta transaction + the runs row) ← run

`run.run_retag` composes them; every stage but `dataset` and `run` is testable without Ray.
"""

from .options import RUN_ID_PATTERN, RetagError, RetagOptions, new_run_id
from .plan import Plan, plan_resources
from .run import format_summary, run_retag

__all__ = [
    "RUN_ID_PATTERN",
    "Plan",
    "RetagError",
    "RetagOptions",
    "format_summary",
    "new_run_id",
    "plan_resources",
    "run_retag",
]
