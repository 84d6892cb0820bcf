"""The stage-1 pretraining corpus: real image-text pairs from registry packages (icon sets, Tux Paint stamps,
openclipart's MiniBEIR training split), in the M-BEIR layout, with nothing of MiniBEIR's val/test bases.

    from jfe.data.pretrain import build_pretrain
    summary = build_pretrain(Path("runs/pretrain"), minibeir="runs/minibeir")

Modules: :mod:`.sources` reads the packages, :mod:`.leakage` holds the MiniBEIR val/test reference,
:mod:`.build` renders, filters, assigns ids and writes.
"""

from jfe.data.pretrain.build import PretrainSummary, build_pretrain
from jfe.data.pretrain.leakage import LeakageReference

__all__ = ["LeakageReference", "PretrainSummary", "build_pretrain"]
