"""Static int8 MobileNetV2 through ONNX Runtime and OpenVINO/NNCF: which calibration and which layers kept fp32
hold parity.

Exports the shipped jfe-mini's vision graph (fp32), quantises it several ways with ONNX Runtime's static QDQ tool
(per-channel weights), calibrated on 128 seeded images of the MiniBEIR local pools, and measures on 128 other
pool images: images/s at batch 64 and the cosine to fp32 of the mean-pooled features (what the two-tower embeds)
and of the whole feature map (what jfe-mini's grid tokens read).

    python benchmarks/vision_int8_probe.py --data runs/minibeir --out runs/bench/vision_int8_probe.json

Variants: MinMax, Percentile and Entropy calibration; MinMax with the depthwise convolutions, the projection
(linear-bottleneck) convolutions, both, or the last ten convolutions kept in fp32. With ``--nncf`` (needs
``pip install nncf openvino``) also OpenVINO's own path on the same graph: OpenVINO fp32 and bf16 as references,
then NNCF post-training int8 (its default preset, with bias correction; the mixed preset; full bias correction)
calibrated on the same 128 images and run by OpenVINO in fp32 and bf16 for what stays unquantised.
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


def _pixels(data: Path, n: int, seed: int) -> np.ndarray:
    from jfe.data.images import load_image
    from jfe.data.mbeir import read_pool_files
    from jfe.models.vision import preprocess

    pools = sorted((data / "cand_pool" / "local").glob("*.jsonl"))
    with_image = [c for c in read_pool_files(pools)[0].values() if c.img_path]
    chosen = random.Random(seed).sample(with_image, n)
    return preprocess([load_image(data / str(c.img_path), min_side=224) for c in chosen], 224).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run(data: Path, nncf_rows: bool = False) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from jfe.hardware import machine_summary
    from jfe.models import load_model
    from jfe.models.onnx_backend import _export_vision, calibration_reader, session_options

    calibration = _pixels(data, 128, seed=1)
    test = _pixels(data, 128, seed=2)
    batches = [calibration[i:i + 16] for i in range(0, len(calibration), 16)]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _export_vision(load_model("jfe-mini", device="cpu"), folder / "fp32.onnx")
        quant_pre_process(str(folder / "fp32.onnx"), str(folder / "pre.onnx"), skip_symbolic_shape=True)
        graph = onnx.load(str(folder / "pre.onnx")).graph
        convs = [n for n in graph.node if n.op_type == "Conv"]
        consumers: dict[str, list[str]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node.op_type)
        depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
        projection = [n.name for n in convs if not {"Clip", "Relu"} & set(consumers.get(n.output[0], []))]
        variants: dict[str, dict[str, Any]] = {
            "minmax": {}, "percentile": {"calibrate_method": CalibrationMethod.Percentile},
            "entropy": {"calibrate_method": CalibrationMethod.Entropy},
            "minmax, depthwise fp32": {"nodes_to_exclude": depthwise},
            "minmax, projections fp32": {"nodes_to_exclude": projection},
            "minmax, depthwise + projections fp32": {"nodes_to_exclude": depthwise + projection},
            "minmax, last 10 convolutions fp32": {"nodes_to_exclude": [n.name for n in convs[-10:]]},
        }
        options = session_options()

        def measure(path: Path) -> tuple[float, np.ndarray]:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            session.run(None, {"pixels": test[:64]})
            start = time.perf_counter()
            session.run(None, {"pixels": test[:64]})
            seconds = time.perf_counter() - start
            return 64 / seconds, session.run(None, {"pixels": test})[0]

        speed, reference = measure(folder / "fp32.onnx")
        rows = [{"variant": "fp32", "images_per_s": round(speed, 1), "pooled_min_cosine": 1.0,
                 "pooled_mean_cosine": 1.0, "map_min_cosine": 1.0}]
        for name, kwargs in variants.items():
            out = folder / f"{len(rows)}.onnx"
            quantize_static(str(folder / "pre.onnx"), str(out), calibration_reader(batches),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, **kwargs)
            speed, maps = measure(out)
            rows.append(_row(name, speed, maps, reference))
            print(f"{name}: {rows[-1]}", file=sys.stderr)
        if nncf_rows:
            rows += _nncf_rows(folder / "fp32.onnx", calibration, test, reference)
    return {"machine": machine_summary(), "calibration_images": len(calibration), "test_images": len(test),
            "rows": rows}


def _nncf_rows(fp32: Path, calibration: np.ndarray, test: np.ndarray, reference: np.ndarray) -> list[dict[str, Any]]:
    """OpenVINO fp32 / bf16 and NNCF int8 variants of the same vision graph, measured as the ORT rows are."""
    import nncf
    import openvino as ov
    import torch

    from jfe.models.openvino_backend import OpenVinoGraph

    core = ov.Core()

    def measure(model: Any, compute: str) -> tuple[float, np.ndarray]:
        graph = OpenVinoGraph(model, compute, torch.get_num_threads())  # the backend's settings
        graph.run(None, {"pixels": test[:64]})
        start = time.perf_counter()
        graph.run(None, {"pixels": test[:64]})
        seconds = time.perf_counter() - start
        return 64 / seconds, np.concatenate([graph.run(None, {"pixels": test[i:i + 64]})[0]
                                             for i in range(0, len(test), 64)])

    source = core.read_model(str(fp32))
    variants: dict[str, Any] = {"OpenVINO": source}
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    for name, kwargs in {"NNCF int8": {}, "NNCF int8, mixed preset": {"preset": nncf.QuantizationPreset.MIXED},
                         "NNCF int8, full bias correction": {"fast_bias_correction": False}}.items():
        variants[name] = nncf.quantize(source, dataset, subset_size=len(calibration), **kwargs)
    rows = []
    for name, model in variants.items():
        for compute in ("fp32", "bf16"):
            speed, maps = measure(model, compute)
            rows.append(_row(f"{name} (OpenVINO {compute})", speed, maps, reference))
            print(f"{rows[-1]['variant']}: {rows[-1]}", file=sys.stderr)
    return rows


def _row(name: str, speed: float, maps: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    pooled = _cosine(maps.mean((2, 3)), reference.mean((2, 3)))
    whole = _cosine(maps.reshape(len(maps), -1), reference.reshape(len(reference), -1))
    return {"variant": name, "images_per_s": round(speed, 1), "pooled_min_cosine": round(float(pooled.min()), 4),
            "pooled_mean_cosine": round(float(pooled.mean()), 4), "map_min_cosine": round(float(whole.min()), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MiniBEIR root (make minibeir)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--nncf", action="store_true", help="add OpenVINO and NNCF int8 rows (pip install nncf)")
    args = parser.parse_args(argv)
    result = run(args.data, nncf_rows=args.nncf)
    machine = result["machine"]
    print(f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}\n")
    print(f"{'variant':<52}{'img/s b64':>10}{'pooled min cos':>16}{'pooled mean':>13}{'map min cos':>13}")
    for row in result["rows"]:
        print(f"{row['variant']:<52}{row['images_per_s']:>10}{row['pooled_min_cosine']:>16}"
              f"{row['pooled_mean_cosine']:>13}{row['map_min_cosine']:>13}")
    if args.out:
        from jfe.paths import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
