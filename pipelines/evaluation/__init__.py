"""Evaluation: `scoring` (annotated images → scores, through `mumic_core.scoring`), `report` (the metrics
of a split), `artifacts` (tables and charts for MLflow) and `evaluate` (the `mumic evaluate` job)."""

from .artifacts import write_artifacts
from .evaluate import EvaluationResult, evaluate
from .report import OPEN_VOCABULARY, Report, confused_pairs, report
from .scoring import BatchScorer, Scored, score_dataset

__all__ = [
    "OPEN_VOCABULARY",
    "BatchScorer",
    "EvaluationResult",
    "Report",
    "Scored",
    "confused_pairs",
    "evaluate",
    "report",
    "score_dataset",
    "write_artifacts",
]
