"""M-BEIR evaluation: metrics (light), the protocol, the one evaluator object every caller uses
(:class:`MBEIREvaluator`: ``jfe eval``, the trainer's validation, the study), run files and reports.

``jfe.eval.metrics`` imports only numpy; the rest loads lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalResult", "MBEIREvaluator", "Sample", "evaluate", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "EvalResult"):
        from jfe.eval import protocol

        return getattr(protocol, name)
    if name in ("MBEIREvaluator", "Sample"):
        from jfe.eval import evaluator

        return getattr(evaluator, name)
    if name == "write_report":
        from jfe.eval.report import write_report

        return write_report
    raise AttributeError(f"module 'jfe.eval' has no attribute {name!r}")
