"""The nightly retag job, one module per step of its flow:

    options (RetagOptions) → plan (resources) → catalog (snapshot of what to tag) → dataset (Ray Data:
    fetch → decode → infer) → staging (parts) → commit (one Delta transaction + the runs row) ← run

`run.run_retag` composes them; every stage but `dataset` and `run` is testable without Ray.
"""

# Exported lazily (PEP 562): `mumic <command> --help` reads the options module without importing Ray
# and torch through the rest of the room.
_EXPORTS = {
    "RUN_ID_PATTERN": "options",
    "RetagError": "options",
    "RetagOptions": "options",
    "new_run_id": "options",
    "Plan": "plan",
    "plan_resources": "plan",
    "format_summary": "run",
    "run_retag": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module  # the room's module named in _EXPORTS, on first use

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
