"""M-BEIR evaluation: metrics (light), the protocol (whose rank and score steps training's validation uses
too), run files and reports.

``jfe.eval.metrics`` imports only numpy; ``evaluate``/``EvalResult``/``write_report`` load lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalResult", "evaluate", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "EvalResult"):
        from jfe.eval import protocol

        return getattr(protocol, name)
    if name == "write_report":
        from jfe.eval.report import write_report

        return write_report
    raise AttributeError(f"module 'jfe.eval' has no attribute {name!r}")
