"""The nightly retag job, one module per step of its flow:

    options (RetagOptions) → plan (resources) → catalog (snapshot of what to tag) → dataset (Ray Data:
    fetch → decode → infer) → staging (parts) → commit (one Delta transaction + the runs row) ← run

`run.run_retag` composes them; every stage but `dataset` and `run` is testable without Ray.
"""

from ..lazy import exports

# exported lazily: `mumic <command> --help` reads the options module without importing Ray and torch
_EXPORTS = {
    "options": ("RUN_ID_PATTERN", "CommitFailed", "RetagError", "RetagOptions", "StagingMismatch", "TooManyErrors", "new_run_id"),
    "plan": ("Plan", "plan_resources"),
    "run": ("format_summary", "run_retag"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__ = exports(__name__, _EXPORTS)
