"""Ablations (`mumic ablate`): `options` (AblationConfig), `plan` (grid → runs, loss presets, config
hashes), `data` (generated or given data, unseen labels, the warm-start share), `baselines` (zero-shot,
linear probe), `results` (CSV + Markdown) and `run` (the runs, MLflow parent and child runs, resume)."""

from ..lazy import exports

# exported lazily: `mumic ablate --help` reads the options module without importing Ray and torch
_EXPORTS = {
    "options": ("AblationConfig", "AblationError", "BASELINES"),
    "plan": ("LOSS_PRESETS", "Cell", "Step", "expand", "steps"),
    "results": ("Results", "markdown"),
    "run": ("AblationResult", "run_ablation"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__ = exports(__name__, _EXPORTS)
