"""``jfe export sentence-transformers MODEL OUT``: a folder that ``SentenceTransformer(OUT, trust_remote_code=True)``
loads (offline) and that encodes texts, images and image+text pairs as the JFE model does.

The folder is sentence-transformers' own layout, written by sentence-transformers itself: ``modules.json`` naming
one module, :class:`jfe.models.st_module.JFEModule` (``trust_remote_code=True`` is sentence-transformers' consent
to import a class outside its own package), its config, ``config_sentence_transformers.json`` (cosine similarity),
and the JFE model saved in ``jfe_model/`` (``load_model("OUT/jfe_model")`` loads it in JFE too). Written atomically;
a non-empty OUT that is not such an export is refused unless ``overwrite``. Needs the ``sentence-transformers``
extra; the tower models and ``hf:`` models export alike (whatever ``save_pretrained`` writes).
"""

from __future__ import annotations

import os
from pathlib import Path

from jfe.errors import ConfigError
from jfe.models.base import Encoder
from jfe.paths import ArtefactKind, atomic_dir

ST_CONFIG = "jfe_sentence_transformers.json"
ST_KIND = ArtefactKind("sentence-transformers export of a JFE model", (ST_CONFIG,))

_CARD = """# {source} for sentence-transformers

A JFE encoder ({arch}, {dim}-d, {role}) exported with `jfe export sentence-transformers`. It encodes texts, images
and image+text pairs into one space:

```python
from PIL import Image
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{out}", trust_remote_code=True)  # needs `pip install jfe`
vectors = model.encode(["a red dress", Image.open("dress.jpg"), {{"text": "the same, in blue", "image": "dress.jpg"}}])
```

A string that names an existing image file is an image (sentence-transformers' convention); a prompt becomes the
JFE instruction. The JFE model itself is in `jfe_model/` (`jfe.load_model("{out}/jfe_model")`).
"""


def export_sentence_transformers(model: Encoder, out: str | os.PathLike, *, source: str,
                                 overwrite: bool = False) -> Path:
    """Write ``model`` (loaded from ``source``) as a sentence-transformers folder at ``out``."""
    if model.backend != "torch":
        raise ConfigError(f"{source} runs on {model.backend}: export the PyTorch model it came from "
                          f"(sentence-transformers runs PyTorch modules)")
    try:
        from sentence_transformers import SentenceTransformer

        from jfe.models.st_module import MODEL_SUBDIR, JFEModule
    except ImportError:
        raise ConfigError('exporting for sentence-transformers needs it: pip install "jfe[sentence-transformers]"'
                          ) from None
    out = Path(out)
    with atomic_dir(out, ST_KIND, overwrite=overwrite) as tmp:
        wrapper = SentenceTransformer(modules=[JFEModule(model, MODEL_SUBDIR)], device="cpu",
                                      similarity_fn_name="cosine")
        wrapper.save(str(tmp), create_model_card=False)
        (tmp / "README.md").write_text(_CARD.format(source=source, arch=model.arch, dim=model.dim,
                                                    role=model.fusion_role, out=out))
    return out
