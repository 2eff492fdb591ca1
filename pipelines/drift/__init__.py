"""Drift between two committed runs (`mumic drift`), one module per step:

    sides (which runs, which rows) → thresholds (per model version) → tally (counts per label, embedding
    sums) → stats (the test per label, the centroid shift) → table (`drift`) and report (HTML + PNG) ← compare

It reads the output tables and writes only `drift` and the report.
"""

from ..lazy import exports

# exported lazily: `mumic drift --help` imports nothing of the room
_EXPORTS = {
    "compare": ("Drift", "run_drift"),
    "report": ("format_text",),
    "sides": ("SCOPES", "DriftError"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__ = exports(__name__, _EXPORTS)
