"""The reranking study's report (jfe_study.rerank) on real evaluations of the tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

from jfe.eval import evaluate
from jfe.models.baselines import TwoTowerConfig, TwoTowerMini
from jfe.models.rerankers import JointRerankConfig, JointReranker, LateReranker
from jfe.models.toy import ToyEncoder
from jfe_study.rerank import JOINT, LATE, write_report


def test_untrained_rerankers_report_a_zero_margin(tiny_mbeir: Path, tmp_path: Path) -> None:
    """Rerankers whose heads are still zero rank as the retriever: every margin is +0.0 with a [+0.0, +0.0]
    interval, while the tables carry the retriever's scores for every run."""
    runs: dict[str, list[str]] = {"toy": [], f"+ {JOINT}": [], f"+ {LATE}": []}
    evaluate(ToyEncoder(), tiny_mbeir, out_dir=tmp_path / "alone", progress=False, run_name="toy")
    runs["toy"].append(str(tmp_path / "alone"))
    for seed in (0, 1):
        for label, reranker in ((JOINT, JointReranker(JointRerankConfig(grid=2, seed=seed, retriever="toy"))),
                                (LATE, LateReranker.from_encoder(TwoTowerMini(TwoTowerConfig(seed=seed))))):
            out = tmp_path / f"{label}-{seed}"
            evaluate(ToyEncoder(), tiny_mbeir, out_dir=out, progress=False, reranker=reranker, rerank_k=4,
                     run_name=f"+ {label}")
            runs[f"+ {label}"].append(str(out))
    report = {"retriever": "toy", "seeds": [0, 1], "steps": 1, "rerank_k": 4, "precision": "fp32",
              "runs": {"local": runs}}
    text = write_report(report, tmp_path / "report").read_text()
    assert f"| toy + {JOINT} vs toy alone | +0.0 [+0.0, +0.0] |" in text
    assert f"| {JOINT} vs {LATE} (same lists, steps, batches) | +0.0 [+0.0, +0.0] |" in text
    assert "conditional" in text and "local pool" in text
    assert (tmp_path / "report" / "rerank_local_categories_r5.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    margin = saved["margins"]["local"][f"toy + {JOINT} vs toy alone"]["per_category"]["conditional"]
    assert margin["estimate"] == 0.0 and margin["low"] == 0.0
