"""Compute precision: detection, resolution, and bf16 vs fp32 parity of the real jfe-mini.

On a CPU without native bf16 (no amx_bf16 / avx512_bf16), PyTorch emulates it: slower, but the numbers are
the same as on a bf16 CPU, so the parity test is meaningful on every machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from conftest import drawn_image
from jfe import hardware as H
from jfe.data import assets
from jfe.errors import ConfigError
from jfe.models import precision as P
from jfe.models.registry import load_model
from jfe.models.toy import ToyEncoder

CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n"


def test_cpu_flags_parse_and_bf16_detection() -> None:
    flags = H.parse_cpu_flags(CPUINFO)
    assert {"avx2", "avx512_bf16", "amx_tile"} <= flags
    assert H.cpu_bf16_flags(flags) == ["avx512_bf16"]
    assert H.cpu_bf16_flags(H.parse_cpu_flags("flags : fpu avx2 fma\n")) == []


def test_resolve_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch, real_bf16_detection: None) -> None:
    monkeypatch.setattr(H, "cpu_bf16_flags", lambda flags=None: [])
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.resolve_precision("bf16", "cpu") == "bf16"  # honoured, emulated (with a warning)
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(H, "cpu_bf16_flags", lambda flags=None: ["amx_bf16"])
    assert P.resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        P.resolve_precision("fp16", "cpu")
    # the precision is an argument: the environment variable of earlier versions changes nothing any more
    monkeypatch.setenv("JFE_PRECISION", "fp32")
    assert P.resolve_precision("auto", "cpu") == "bf16"


def test_encode_returns_float32_unit_vectors_in_bf16() -> None:
    model = ToyEncoder().set_precision("bf16")
    vecs = model.encode(["a red square", "a blue circle"])
    assert vecs.dtype == np.float32 and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ConfigError):
        ToyEncoder().set_precision("half")


_image = drawn_image  # the seeded test picture (conftest)


needs_towers = pytest.mark.skipif(not (assets.is_fetched("minilm") and assets.is_fetched("mobilenet_v2")),
                                  reason="needs the minilm and mobilenet_v2 assets (jfe assets fetch)")


def _fp32_and_bf16() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    words = ["red", "green", "blue", "yellow", "heart", "star", "cat", "dog", "moon", "clock", "arrow", "tree"]
    pool = [f"a {a} {b}" for a in words[:6] for b in words[4:]]  # 48 texts
    pool += [_image(i) for i in range(24)]
    pool += [{"image": _image(100 + i), "text": f"the {words[i % 12]} one"} for i in range(24)]
    queries = [f"find the {w}" for w in words] + [{"image": _image(i), "text": "the same in green"} for i in range(12)]
    model = load_model("jfe-mini", device="cpu", pretrained=False, grid=2, image_size=96)
    fp32_pool = model.set_precision("fp32").encode(pool, batch_size=32)
    fp32_q = model.encode(queries, batch_size=32)
    bf16_pool = model.set_precision("bf16").encode(pool, batch_size=32)
    bf16_q = model.encode(queries, batch_size=32)
    return fp32_pool, fp32_q, bf16_pool, bf16_q


@pytest.mark.assets
@needs_towers
def test_bf16_embeddings_match_fp32_on_real_jfe_mini() -> None:
    fp32_pool, fp32_q, bf16_pool, bf16_q = _fp32_and_bf16()
    cosines = np.concatenate([(fp32_pool * bf16_pool).sum(1), (fp32_q * bf16_q).sum(1)])
    assert cosines.min() >= 0.999, cosines.min()


_MALLINFO_PROBE = """
import ctypes, sys
import torch
from jfe.hardware import allocator_tuned, tune_allocator
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
def mmapped_while_alive():  # bytes glibc serves from mmap() while a 40 MB tensor lives
    tensor = torch.empty(40 << 20, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd
    del tensor
    return mapped
before = mmapped_while_alive()
tuned = tune_allocator()
print(before, int(tuned), int(allocator_tuned()), mmapped_while_alive())
"""


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" and version else ()


@pytest.mark.skipif(_glibc_version() < (2, 33), reason="needs glibc >= 2.33 (malloc tuning, mallinfo2)")
@pytest.mark.parametrize("switch", ["1", "0"])
def test_tune_allocator_keeps_large_batches_out_of_fresh_mmaps(switch: str) -> None:
    env = {**os.environ, "JFE_MALLOC_TUNE": switch}
    result = subprocess.run([sys.executable, "-c", _MALLINFO_PROBE], env=env, capture_output=True, text=True,
                            check=True, timeout=120)
    before, tuned, reported, after = (int(v) for v in result.stdout.split())
    assert before >= 40 << 20  # glibc's default: a 40 MB block is a fresh mapping, page-faulted in on use
    if switch == "1":
        assert tuned == reported == 1
        assert after < 40 << 20  # now it comes from (and returns to) the heap
    else:
        assert tuned == reported == 0
        assert after >= 40 << 20


@pytest.mark.assets
@needs_towers
def test_vision_follow_runs_the_tower_in_bf16_under_a_cache_key_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from jfe.eval.protocol import model_fingerprint
    from jfe.models import feature_cache

    model = load_model("jfe-mini", device="cpu", pretrained=False, grid=2, image_size=96)
    images = [_image(i) for i in range(6)]
    with feature_cache.overridden(mode="memory"):
        feature_cache.clear()
        fp32 = model.set_precision("fp32").encode(images)
        package = model.set_precision("bf16").encode(images)  # the tower stays fp32: its features are reused
        assert (feature_cache.stats().misses, feature_cache.stats().hits) == (6, 6)
        fingerprint = model_fingerprint(model)
        follow = model.set_precision("bf16", vision="follow").encode(images)
        assert feature_cache.stats().misses == 12  # bf16 features never stand in for fp32 ones, or back
        again = model.encode(images, precision="fp32")  # an fp32 encode ignores the setting
    np.testing.assert_allclose(again, fp32, atol=1e-6)
    assert model_fingerprint(model) != fingerprint  # evaluation caches keep them apart too
    cos_package, cos_follow = (fp32 * package).sum(1).min(), (fp32 * follow).sum(1).min()
    assert 0.9 < cos_follow < cos_package, (cos_follow, cos_package)  # bf16 in the tower moves vectors more
    assert model.vision_follows("bf16") and not model.vision_follows("fp32")
    monkeypatch.setenv("JFE_VISION_PRECISION", "fp32")  # an argument, not the environment, decides
    assert model.vision_follows("bf16")
    with pytest.raises(ConfigError, match="vision precision"):
        model.set_precision("bf16", vision="bf8")
