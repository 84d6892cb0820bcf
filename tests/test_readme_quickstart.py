"""The README quick start, run as it stands: the block after the ``<!-- quickstart`` marker is extracted
from README.md here, so the README and this test cannot drift apart. It runs as right after install: the
package's shipped weights (and nothing a user registered), so ``jfe-mini`` is trained, loads without a warning
and ranks the green heart first for the red heart + "the same shape in green"."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from jfe.data import assets

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, flags=re.S)
    assert match, "README.md lost its <!-- quickstart --> python block"
    return match.group(1)


def test_quickstart_uses_only_shipped_files() -> None:
    code = quickstart_code()
    from jfe.data.samples import SAMPLES_DIR, sample

    for name in re.findall(r'"(\w+)"', code.split("names = ")[1].split("]")[0]) + ["red_heart", "cat"]:
        assert sample(name).is_file() and sample(name).parent == SAMPLES_DIR
    assert "Path(" not in code  # no paths a fresh clone does not have
    assert (SAMPLES_DIR / "README.md").read_text().count("CC BY-SA 4.0") >= 1  # the licence is recorded
    with pytest.raises(FileNotFoundError, match="shipped: blue_heart, cat"):
        sample("unicorn")


@pytest.mark.assets
def test_readme_quickstart_runs(monkeypatch: pytest.MonkeyPatch, shipped_weights: Path) -> None:
    missing = [n for n in ("minilm", "mobilenet_v2") if not assets.is_fetched(n)]
    if missing:
        pytest.fail(f"assets not fetched: {missing} (run `jfe assets fetch`; CI does)")
    from jfe import api
    from jfe.models.pretrained import UntrainedModelWarning

    monkeypatch.setattr(api, "_LOADED", {})
    namespace: dict = {}
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("error", UntrainedModelWarning)  # the shipped weights are trained
        exec(compile(quickstart_code(), str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    vecs, hits, mixed = namespace["vecs"], namespace["hits"], namespace["mixed"]
    assert vecs.shape == (5, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert mixed.shape == (2, 384)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert {h["did"] for h in hits} <= set(namespace["names"]) and len({h["did"] for h in hits}) == 3
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert hits[0]["record"]["img_path"].endswith(".png")
    assert hits[0]["did"] in printed.getvalue()
    assert "red_heart" not in {h["did"] for h in hits}  # the query's own reference image is excluded
    assert hits[0]["did"] == "green_heart"  # "the same shape in green": a trained model gets it right
