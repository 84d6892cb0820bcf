"""MiniBEIR: a small, real, offline benchmark in the exact M-BEIR layout, covering all eight task types.

    from jfe.data.minibeir import build_minibeir
    summary = build_minibeir(Path("data/minibeir"), seed=0)
    print(summary.to_markdown())

Modules: :mod:`.sources` reads the emoji and clip-art packages, :mod:`.tasks` builds the queries and local
pools of each task, :mod:`.templates` holds the wordings (with held-out rewordings), :mod:`.render` writes
deterministic PNGs and :mod:`.build` splits, assigns ids and writes everything.
"""

from jfe.data.minibeir.build import SPLITS, BuildConfig, MiniBEIRSummary, build_minibeir, split_of_base

__all__ = ["SPLITS", "BuildConfig", "MiniBEIRSummary", "build_minibeir", "split_of_base"]
