"""Evaluation: per-case metrics (:mod:`.metrics`) and the HTML run report (:mod:`.report`).

Importing this package imports neither torch nor MONAI nor matplotlib; they load on first use.
"""

from .metrics import (
    METRICS,
    EvaluationError,
    EvaluationResult,
    evaluate,
    evaluate_case,
    format_summary_table,
    load_results,
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
