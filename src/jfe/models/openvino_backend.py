"""The OpenVINO backend: an fp32 ONNX export (:mod:`jfe.models.onnx_backend`) run by OpenVINO Runtime on the CPU.

The same export folder, the same :func:`~jfe.models.packing.pack` and feature cache as the ONNX Runtime backend;
only what runs the two graphs differs. OpenVINO's CPU plugin computes in bf16 where the CPU multiplies bf16
natively (AMX or AVX512-BF16: ``precision="auto"`` picks it there, as the torch backend's ``auto`` does) and in
fp32 elsewhere. Measured on a 2-core Xeon with AMX (docs/benchmarks.md): its bf16 runs MobileNetV2 2.2x and the
fusion graph 2-4x faster than ONNX Runtime fp32, with cosine >= 0.9995 to torch fp32, where ONNX Runtime's dynamic
int8 gives less speed (1.2-1.5x) at lower parity (0.994). ONNX Runtime's int8 graphs run slower under OpenVINO
than under ONNX Runtime, so this backend runs fp32 exports only.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from jfe.errors import ConfigError
from jfe.hardware import ComputePrecision, check_precision, cpu_bf16_flags
from jfe.models.onnx_backend import OnnxEncoder, OnnxManifest, OnnxVision
from jfe.models.towers import TowerConfig

logger = logging.getLogger(__name__)

# OpenVINO's names for the compute precisions
_HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16"}


@cache
def _core() -> Any:
    try:
        import openvino
    except ImportError:
        raise ConfigError('the OpenVINO backend needs the optional openvino extra: pip install "jfe[openvino]"'
                          ) from None
    return openvino.Core()


class OpenVinoGraph:
    """One ONNX graph compiled by OpenVINO for the CPU in one precision, called like an ONNX Runtime session
    (``run(None, feeds)`` -> list of outputs), so the encoder and the feature cache treat both alike."""

    def __init__(self, graph: Path | Any, compute: str, threads: int) -> None:
        # graph: an ONNX file, or an openvino.Model already in memory (benchmarks/vision_int8_probe.py's NNCF ones)
        # LATENCY: one stream using every thread, what an encode batch wants (THROUGHPUT splits the cores)
        self.compiled = _core().compile_model(str(graph) if isinstance(graph, Path) else graph, "CPU", {
            "INFERENCE_PRECISION_HINT": _HINTS[compute], "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY"})
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # a request per call (13 us): the compiled model is shared safely between threads, a request is not
        result = self.compiled.create_infer_request().infer(feeds)
        return [result[0]]


class OpenVinoEncoder(OnnxEncoder):
    """An fp32 ONNX export encoding through OpenVINO Runtime, in fp32 or (where the CPU has native bf16) bf16.

    Loaded by ``load_model(folder, backend="openvino")`` (or any tower model with ``backend="openvino"``: it is
    exported once into the cache). Unlike an ONNX Runtime export, its precision is a setting, as the torch
    backend's is: ``auto`` (bf16 where the CPU multiplies bf16 natively, else fp32), ``fp32``, ``bf16``.
    """

    backend = "openvino"

    def __init__(self, folder: Path, manifest: OnnxManifest, config: TowerConfig, threads: int | None = None) -> None:
        if manifest.precision != "fp32":
            raise ConfigError(f"{folder} is an {manifest.precision} export: the OpenVINO backend runs fp32 exports "
                              f"(in fp32 or bf16); run this one with --backend onnx, or export fp32")
        super().__init__(folder, manifest, config, threads)

    def resolve_compute(self, precision: str | None = None) -> tuple[str, ComputePrecision]:
        value = check_precision(precision or self.precision)
        native = bool(cpu_bf16_flags())
        if value == "auto":
            value = "bf16" if native else "fp32"
        elif value == "bf16" and not native:
            raise ConfigError("OpenVINO computes in bf16 only on CPUs that multiply bf16 natively (amx_bf16 or "
                              "avx512_bf16; `jfe env` lists this one's flags): use precision fp32 or auto")
        # the vision graph computes in the same precision (recorded as vision_precision in an index's meta.json)
        return value, "bf16" if value == "bf16" else "fp32"

    def set_precision(self, precision: str, vision: str | None = None) -> OpenVinoEncoder:
        self.resolve_compute(precision)  # refused now, not at the first encode
        self.precision = check_precision(precision)
        return self

    def _open(self, compute: str) -> tuple[OnnxVision, Any, list[str]]:
        def graph(name: str) -> OpenVinoGraph:
            return OpenVinoGraph(self.folder / self.manifest.graphs[name].file, compute, self.threads)

        fusion = graph("fusion")
        vision = OnnxVision(graph("vision"), self.config.image_size, self.manifest.graphs["vision"].sha256,
                            runtime=f"openvino-{compute}")
        return vision, fusion, fusion.input_names
