"""Evaluation: per-case metrics and summaries (:mod:`.metrics`), the files to compare (:mod:`.cases`),
prediction folders scored and their tables (:mod:`.files`), the HTML run report (:mod:`.report`)
and cross-validation scores (:mod:`.cv`).

Importing this package imports neither torch nor MONAI nor matplotlib; they load on first use.
"""

from .files import evaluate, load_results
from .metrics import (
    METRICS,
    EvaluationError,
    EvaluationResult,
    evaluate_case,
    format_summary_table,
    summarize,
    worst_cases,
)
from .report import write_report

__all__ = [
    "METRICS",
    "EvaluationError",
    "EvaluationResult",
    "evaluate",
    "evaluate_case",
    "format_summary_table",
    "load_results",
    "summarize",
    "worst_cases",
    "write_report",
]
