"""Would a *static* int8 fusion graph make int8 batch-independent at parity? A probe, not an export option.

Dynamic int8 (``jfe export onnx --quantize int8``) scales each matrix product's activations per batch, so a
vector depends on its batch (benchmarks/int8_batch_dependence.py: about a point of R@5). Static int8 fixes the
scales from calibration, so it cannot depend on the batch. This quantises jfe-mini's fusion graph statically (QDQ,
per-channel weights, the same MatMuls as the dynamic export, calibrated on MiniBEIR pool items) and compares, on
other pool items, against the fp32 graph: cosine per item, batch dependence (the same items at batch 8 and 64),
and fusion-graph throughput at batch 64, beside the dynamic int8 graph.

    python benchmarks/fusion_static_int8_probe.py --data runs/minibeir --out runs/bench/fusion_static_int8.json
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _items(data: Path, n: int, seed: int) -> list[Any]:
    from jfe.data.items import candidate_item
    from jfe.data.mbeir import read_pool_files

    pools = sorted((data / "cand_pool" / "local").glob("*.jsonl"))
    candidates = list(read_pool_files(pools)[0].values())
    return [candidate_item(c, data) for c in random.Random(seed).sample(candidates, n)]


def _feeds(model: Any, items: list[Any], batch: int) -> list[dict[str, np.ndarray]]:
    """The fusion graph's inputs for ``items`` in batches, as the encoder builds them (pack + vision graph)."""
    from jfe.models.base import encode_batches
    from jfe.models.feature_cache import feature_maps
    from jfe.models.packing import pack

    vision, _ = model._graphs(model.resolve_compute()[0])
    out = []
    for rows in encode_batches(items, batch):
        chunk = [items[i] for i in rows]
        packed = pack(model.manifest.fusion_kind, chunk, model.config, model.text_path)
        features = feature_maps(vision, [it.required_image for it in packed.images]).numpy() if packed.images \
            else model._placeholder
        out.append({"features": features, **{k: v.numpy() for k, v in packed.inputs.items()}})
    return out


def _run(session: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    vectors = np.concatenate([session.run(None, f)[0] for f in feeds])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="jfe-mini")
    parser.add_argument("--calibration", type=int, default=256, help="pool items the static scales come from")
    parser.add_argument("--items", type=int, default=256, help="other pool items compared")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from jfe.hardware import machine_summary
    from jfe.models import load_model
    from jfe.models.base import encode_batches
    from jfe.models.onnx_backend import _vision_products, export_onnx, session_options

    result: dict[str, Any] = {"machine": machine_summary(), "model": args.model, "graphs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch_model = load_model(args.model, device="cpu")
        fp32 = load_model(export_onnx(torch_model, folder / "fp32", source=args.model))
        dynamic = export_onnx(torch_model, folder / "int8", source=args.model, precision="int8")
        calibration = _feeds(fp32, _items(args.data, args.calibration, seed=1), 16)
        items = _items(args.data, args.items, seed=2)
        by64, by8 = _feeds(fp32, items, 64), _feeds(fp32, items, 8)
        order64 = [i for rows in encode_batches(items, 64) for i in rows]
        order8 = [i for rows in encode_batches(items, 8) for i in rows]
        graphs = {"fp32": fp32.folder / "fusion.onnx", "dynamic int8": dynamic / "fusion.onnx"}
        prepared = folder / "pre.onnx"
        quant_pre_process(str(graphs["fp32"]), str(prepared), skip_symbolic_shape=True)
        # (ORT's histogram calibrators, Percentile and Entropy, cannot stack batches of different sequence lengths)
        for method in (CalibrationMethod.MinMax,):
            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.feeds = iter(calibration)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self.feeds, None)

            out = folder / f"static-{method.name}.onnx"
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul"], nodes_to_exclude=_vision_products(prepared),
                            calibrate_method=method, extra_options={"ActivationSymmetric": False})
            graphs[f"static int8 ({method.name})"] = out
        reference = None
        for name, path in graphs.items():
            session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
            at64 = _run(session, by64)[np.argsort(order64)]
            at8 = _run(session, by8)[np.argsort(order8)]
            if reference is None:
                reference = at64
            cosine = (at64 * reference).sum(1)
            session.run(None, by64[0])
            begin = time.perf_counter()
            for feeds in by64:
                session.run(None, feeds)
            seconds = time.perf_counter() - begin
            row = {"min_cosine_vs_fp32": round(float(cosine.min()), 5),
                   "mean_cosine_vs_fp32": round(float(cosine.mean()), 5),
                   "batch8_vs_batch64_max_abs": float(np.abs(at64 - at8).max()),
                   "items_per_s_b64": round(len(items) / seconds, 1)}
            result["graphs"][name] = row
            print(f"{name:<28} min cos {row['min_cosine_vs_fp32']:.5f}  mean {row['mean_cosine_vs_fp32']:.5f}  "
                  f"b8 vs b64 {row['batch8_vs_batch64_max_abs']:.2e}  {row['items_per_s_b64']} items/s", flush=True)
    if args.out:
        from jfe.paths import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
