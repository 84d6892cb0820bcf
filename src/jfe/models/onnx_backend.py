"""The ONNX Runtime backend: a tower model exported to two ONNX graphs, encoded without PyTorch's eager kernels.

``jfe export onnx MODEL OUT`` (:func:`export_onnx`) writes a folder::

    jfe_onnx.json   the manifest: JFE version, the model's arch and config, the source weights' sha256, opset,
                    precision (fp32 | int8), each graph's sha256 and quantization, the calibration sample, the CPU
    vision.onnx     MobileNetV2's trunk, batch norm folded: pixels [m, 3, S, S] -> feature maps [m, 1280, h, w]
    fusion.onnx     the model's ``fuse``: feature maps + packed inputs -> [n, d] unit vectors
    text/           MiniLM's tokenizer and config (what :func:`jfe.models.packing.pack` reads)

and ``load_model(OUT)`` (or any model with ``backend="onnx"``) encodes with it: the same
:func:`~jfe.models.packing.pack` (image decoding, resizing, tokenising) as PyTorch, the same feature cache (keyed
by the graph), the two graphs run by ONNX Runtime. int8 uses ONNX Runtime's own quantization tools: dynamic int8
with per-channel weights for the fusion graph's matrix products (activations quantised per batch at run time),
static QDQ int8 with per-channel weights for MobileNetV2, its activation ranges calibrated on a sample of the
pool's images. Parity is measured as retrieval quality (docs/results/onnx.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from jfe.data.images import load_image
from jfe.data.items import ImageLike, Item
from jfe.errors import ConfigError
from jfe.hardware import ComputePrecision, check_precision, machine_summary
from jfe.models.base import Encoder
from jfe.models.feature_cache import feature_maps
from jfe.models.packing import FUSION_INPUTS, pack
from jfe.models.pretrained import sha256_of
from jfe.models.towers import TEXT_ASSETS_DIR, TowerConfig, TowerEncoder
from jfe.models.vision import FEATURE_DIM, PREPROCESS_VERSION, feature_map_side, fold_batchnorm, preprocess
from jfe.paths import ArtefactKind, atomic_dir, cache_dir

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("torch", "onnx", "openvino")
#: the backends that run an export folder (OpenVINO runs the same fp32 graphs: jfe.models.openvino_backend)
EXPORT_BACKENDS: tuple[str, ...] = ("onnx", "openvino")
ONNX_PRECISIONS: tuple[str, ...] = ("fp32", "int8")
MANIFEST_NAME = "jfe_onnx.json"
FORMAT = "jfe-onnx/1"
OPSET = 18
VISION_GRAPH, FUSION_GRAPH = "vision.onnx", "fusion.onnx"
ONNX_KIND = ArtefactKind("JFE ONNX export", (MANIFEST_NAME,))
#: pool images MobileNetV2's int8 activation ranges are calibrated on (a seeded sample)
CALIBRATION_IMAGES = 128
_CALIBRATION_BATCH = 16

# the dynamic axes of each fusion input, by fusion kind: "n" items, "t" text rows, "l" tokens, "w" slots
_AXES: dict[str, dict[str, dict[int, str]]] = {
    "joint": {"input_ids": {0: "n", 1: "l"}, "attention_mask": {0: "n", 1: "l"}, "visual_index": {0: "n", 1: "l"}},
    "towers": {"input_ids": {0: "t", 1: "l"}, "attention_mask": {0: "t", 1: "l"}, "image_of": {0: "n"},
               "text_of": {0: "n"}},
    "features": {"input_ids": {0: "t", 1: "l"}, "attention_mask": {0: "t", 1: "l"}, "image_of": {0: "n"},
                 "source": {0: "n", 1: "w"}},
}


def check_backend(backend: str | None) -> str | None:
    """``backend`` itself (lower case) when it is None or one of :data:`BACKENDS`; else a ConfigError."""
    if backend is None:
        return None
    value = str(backend).strip().lower()
    if value not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError('the ONNX backend needs the optional onnx extra: pip install "jfe[onnx]" '
                          '(onnxruntime, onnx, onnxscript)') from None
    return onnxruntime


class GraphInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str
    quantization: str  # "none", "dynamic int8 (per-channel weights)", "static QDQ int8 (per-channel weights)"


class OnnxManifest(BaseModel):
    """``jfe_onnx.json``: what an export holds and how it was made."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["jfe-onnx/1"]
    jfe_version: str
    arch: str
    fusion_kind: str
    config: dict[str, Any]
    source: str
    source_sha256: str
    opset: int
    precision: Literal["fp32", "int8"]
    graphs: dict[str, GraphInfo]
    inputs: list[str]
    calibration: dict[str, Any] | None = None
    exported_on: dict[str, Any]
    versions: dict[str, str]


def is_onnx_export(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's state dict (names and bytes, sorted): what an export was made from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def exportable(model: Encoder, what: str) -> TowerEncoder:
    """``model`` if it can be exported (an encoder on the MobileNetV2 + MiniLM towers), else a ConfigError."""
    if isinstance(model, TowerEncoder) and model.kind == "encoder" and model.fusion_kind in FUSION_INPUTS:
        return model
    kind = "a reranker" if model.kind == "reranker" else f"arch {model.arch or type(model).__name__!r}"
    raise ConfigError(f"{what} is {kind}: the ONNX export covers the encoders on the MobileNetV2 + MiniLM towers "
                      f"(jfe-mini, two-tower-mini, late-fusion-sf-mini, late-fusion-ff-mini and folders trained from "
                      f"them); an hf: MLLM can be exported with Hugging Face optimum, outside JFE")


# ------------------------------------------------------------------------------------------------ export
class _FusionGraph(torch.nn.Module):
    """``model.fuse`` with positional inputs, in the order :data:`FUSION_INPUTS` names them."""

    def __init__(self, model: TowerEncoder) -> None:
        super().__init__()
        self.model = model
        self.names = FUSION_INPUTS[model.fusion_kind]

    def forward(self, features: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.fuse(features, **dict(zip(self.names, inputs, strict=True)))


def _sample_items() -> list[Item]:
    """A mixed batch in which every dynamic size is at least 2 and differs from the others (an exporter fixes
    sizes of 0 or 1, and may tie equal ones)."""
    images = [Image.new("RGB", (40 + 8 * i, 48), (60 * i, 120, 200 - 50 * i)) for i in range(2)]
    return [Item(text="a red dress with long sleeves and a belt"), Item(text="blue"), Item(image=images[0]),
            Item(image=images[1], text="the same, but green")]


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, names: list[str],
            shapes: Any) -> None:
    import warnings

    _ort()  # the extra's presence, with its clear error, before torch's exporter complains about onnxscript
    # the exporter's chatter (deprecations, "torchvision is not installed" per op) is not the user's business
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=True, dynamic_shapes=shapes, input_names=names,
                              output_names=["output"], opset_version=OPSET, external_data=False, verbose=False,
                              report=False)
    finally:
        exporter_log.setLevel(level)


def _export_vision(model: TowerEncoder, path: Path) -> None:
    trunk = fold_batchnorm(model.vision.features).float().eval()
    size = model.config.image_size
    _export(trunk, (torch.zeros(2, 3, size, size),), path, ["pixels"], ({0: torch.export.Dim("m")},))


def _export_fusion(model: TowerEncoder, path: Path) -> None:
    kind = model.fusion_kind
    packed = pack(kind, _sample_items(), model.config, model.text.path)
    side = model.vision.grid_size
    features = torch.randn(len(packed.images), FEATURE_DIM, side, side, generator=torch.Generator().manual_seed(0))
    names = FUSION_INPUTS[kind]
    dims: dict[str, Any] = {}
    axes = _AXES[kind]
    shapes = ({0: torch.export.Dim("m")},
              tuple({axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes[name].items()}
                    for name in names))
    _export(_FusionGraph(model).eval(), (features, *(packed.inputs[name] for name in names)), path,
            ["features", *names], shapes)


def _calibration_pixels(images: Sequence[ImageLike], image_size: int) -> list[np.ndarray]:
    pil = [load_image(image, min_side=image_size) for image in images]
    return [preprocess(pil[i:i + _CALIBRATION_BATCH], image_size).numpy()
            for i in range(0, len(pil), _CALIBRATION_BATCH)]


def calibration_reader(pixels: Sequence[np.ndarray]) -> Any:
    """ONNX Runtime's ``CalibrationDataReader`` over batches of preprocessed pixels (the vision graph's input)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(pixels)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch}

    return Reader()


def _quantize_vision(fp32: Path, out: Path, pixels: list[np.ndarray]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    prepared = out.with_suffix(".pre.onnx")
    # ONNX's own shape inference suffices (same quantised outputs); ORT's symbolic one, when it fails, saves a
    # sym_shape_infer_temp.onnx into the current directory, which is the user's, not ours
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), calibration_reader(pixels), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()


def _vision_products(path: Path) -> list[str]:
    """The fusion graph's matrix products that read MobileNetV2's 1280-wide features (a projector's first layer)."""
    import onnx

    graph = onnx.load(str(path)).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "MatMul"
            and any(shapes.get(name, (0,))[0] == FEATURE_DIM for name in node.input[1:])]


def _quantize_fusion(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    prepared = out.with_suffix(".pre.onnx")
    # the exporter's graph defeats ORT's symbolic shape inference (which then litters the working directory);
    # ONNX's own shape inference suffices here
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    # per-channel weights: per-tensor int8 (the tool's default) cost 0.04 cosine on MiniLM; the matrix products
    # only (Gather, LayerNorm and softmax stay fp32), and not those reading the vision features: their activations
    # (mostly small, a few up to 6) lose most to one int8 scale per batch, and they are a small share of the work
    quantize_dynamic(str(prepared), str(out), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=_vision_products(prepared))
    prepared.unlink()


def export_onnx(model: Encoder, out: str | os.PathLike, *, source: str | None = None, precision: str = "fp32",
                vision_int8: bool = False, calibration: Sequence[ImageLike] | None = None,
                calibration_source: str | None = None, overwrite: bool = False) -> Path:
    """Export ``model`` (a loaded tower encoder) to an ONNX folder at ``out``, atomically; returns ``out``.

    ``precision="int8"`` quantises the fusion graph (MiniLM and the glue: dynamic int8, per-channel weights).
    MobileNetV2 stays fp32 unless ``vision_int8``: static int8 doubles its speed again but moves image embeddings
    (per-embedding cosine to fp32 down to 0.89-0.92 on MiniBEIR, docs/results/onnx.md); it needs ``calibration``,
    images of the pool the model will encode (:data:`CALIBRATION_IMAGES` is plenty), which set its activation
    ranges. ``source`` is the name or folder the model was loaded from (recorded in the manifest). A folder at
    ``out`` that is not an ONNX export is refused unless ``overwrite``.
    """
    tower = exportable(model, source or model.arch)
    precision = str(precision).strip().lower()
    if precision not in ONNX_PRECISIONS:
        raise ConfigError(f"unknown ONNX precision {precision!r}: expected one of {', '.join(ONNX_PRECISIONS)}")
    if vision_int8 and precision != "int8":
        raise ConfigError("vision int8 is part of an int8 export: add --quantize int8")
    if vision_int8 and not calibration:
        raise ConfigError("int8 vision calibrates MobileNetV2's activation ranges on pool images: give calibration "
                          "images (jfe export onnx ... --int8-vision --calibration POOL --data-root ROOT)")
    ort = _ort()
    import onnx

    was_training = tower.training
    tower.eval()
    try:
        with atomic_dir(out, ONNX_KIND, overwrite=overwrite) as tmp:
            graphs = {}
            for name, file, write in (("vision", VISION_GRAPH, _export_vision), ("fusion", FUSION_GRAPH,
                                                                                 _export_fusion)):
                write(tower, tmp / file)
                quantization = "none"
                if precision == "int8" and (name == "fusion" or vision_int8):
                    fp32 = tmp / f"{name}.fp32.onnx"
                    (tmp / file).rename(fp32)
                    if name == "vision":
                        assert calibration is not None
                        _quantize_vision(fp32, tmp / file, _calibration_pixels(calibration, tower.config.image_size))
                        quantization = "static QDQ int8 (per-channel weights, MinMax calibration)"
                    else:
                        _quantize_fusion(fp32, tmp / file)
                        quantization = "dynamic int8 (per-channel weights, MatMul)"
                    fp32.unlink()
                graphs[name] = GraphInfo(file=file, sha256=sha256_of(tmp / file), quantization=quantization)
            tower.text.save_assets(tmp / TEXT_ASSETS_DIR)
            machine = machine_summary()
            manifest = OnnxManifest(
                format=FORMAT, jfe_version=_jfe_version(), arch=tower.arch, fusion_kind=tower.fusion_kind,
                config=tower.config.model_dump(), source=source or tower.arch, source_sha256=weights_sha256(tower),
                opset=OPSET, precision=precision, graphs=graphs, inputs=list(FUSION_INPUTS[tower.fusion_kind]),
                calibration=({"source": calibration_source or "given images", "images": len(calibration or [])}
                             if vision_int8 else None),
                exported_on={"cpu": machine["cpu"], "cpu_flags": machine["cpu_flags"]},
                versions={"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__})
            (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    finally:
        tower.train(was_training)
    return Path(out)


def _jfe_version() -> str:
    from jfe import __version__

    return __version__


# ------------------------------------------------------------------------------------------------ load
def read_manifest(folder: Path) -> OnnxManifest:
    """The folder's manifest, checked: format, graph files present and unchanged (sha256)."""
    path = folder / MANIFEST_NAME
    try:
        manifest = OnnxManifest.model_validate_json(path.read_text())
    except (OSError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if isinstance(exc, OSError) else \
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise ConfigError(f"{path}: not a readable JFE ONNX manifest ({first})") from None
    for name in ("vision", "fusion"):
        info = manifest.graphs.get(name)
        if info is None:
            raise ConfigError(f"{path}: names no {name} graph")
        graph = folder / info.file
        if not graph.is_file():
            raise ConfigError(f"{folder}: the {name} graph {info.file} is missing")
        if _cached_sha256(str(graph), graph.stat().st_mtime_ns, graph.stat().st_size) != info.sha256:
            raise ConfigError(f"{graph} does not match {MANIFEST_NAME} (sha256 differs): the graph was changed "
                              f"after export; export the model again (jfe export onnx)")
    if manifest.fusion_kind not in FUSION_INPUTS or manifest.inputs != list(FUSION_INPUTS[manifest.fusion_kind]):
        raise ConfigError(f"{path}: fusion inputs {manifest.inputs} are not what this JFE version packs for "
                          f"{manifest.fusion_kind!r}; export the model again with this version")
    return manifest


@lru_cache(maxsize=16)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:
    return sha256_of(Path(path))


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime settings: intra-op threads = torch's (one per core by default), one inter-op thread, so an
    encode uses every core and ORT and torch never run pools side by side."""
    options = _ort().SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # ORT's workers spin after each run by default, holding the cores while the next batch is decoded and
    # preprocessed by torch and PIL: measured, that made a batch-1 encode 2x slower than without spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxVision:
    """The exported vision graph behind :func:`jfe.models.feature_cache.feature_maps`: the same decoding and
    preprocessing as PyTorch, its own cache key (int8 features never mix with fp32 ones)."""

    cacheable = True
    chunk: int | None = 32  # ORT gains from larger batches than the memory-bounded eager default (6 at 224 px)

    def __init__(self, session: Any, image_size: int, digest: str, runtime: str = "onnx") -> None:
        self.session = session
        self.image_size = image_size
        self.digest = digest
        self.runtime = runtime  # what computes the features, in the cache key: "onnx", "openvino-bf16", ...

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def cache_key(self, dtype: torch.dtype) -> str:
        return f"{self.runtime}-{self.digest[:16]}-s{self.image_size}-p{PREPROCESS_VERSION}-{str(dtype).split('.')[-1]}"

    def frozen_part_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = preprocess(images, self.image_size).numpy()
        return torch.from_numpy(self.session.run(None, {"pixels": pixels})[0])

    features_of = frozen_part_of

    def trained_part(self, maps: torch.Tensor) -> torch.Tensor:
        return maps


class OnnxEncoder(Encoder):
    """A tower model exported to ONNX (:func:`export_onnx`), encoding through ONNX Runtime on the CPU.

    Loaded by ``load_model(folder)`` (or ``load_model(name, backend="onnx")``). It encodes like the PyTorch
    model it came from (same :func:`~jfe.models.packing.pack`, vectors float32 and unit-norm) but does not train:
    ``embed`` and ``save_pretrained`` are for the PyTorch model.
    """

    backend = "onnx"
    config: TowerConfig

    def __init__(self, folder: Path, manifest: OnnxManifest, config: TowerConfig, threads: int | None = None) -> None:
        super().__init__(config)
        self.folder = folder
        self.manifest = manifest
        self.source = str(folder)
        self.text_path = str(folder / TEXT_ASSETS_DIR)
        self.threads = threads or torch.get_num_threads()
        side = feature_map_side(config.image_size)
        self._placeholder = np.zeros((1, FEATURE_DIM, side, side), dtype=np.float32)
        self._opened: dict[str, tuple[OnnxVision, Any]] = {}
        self._graphs(self.resolve_compute()[0])  # a broken graph fails at load, not at the first encode

    def _graphs(self, compute: str) -> tuple[OnnxVision, Any]:
        """The vision and fusion graphs that compute in ``compute`` (opened once)."""
        if compute not in self._opened:
            vision, fusion, inputs = self._open(compute)
            expected = ["features", *self.manifest.inputs]
            if inputs != expected:
                raise ConfigError(f"{self.folder / self.manifest.graphs['fusion'].file} takes inputs {inputs}, but "
                                  f"the manifest says {expected}: export the model again")
            self._opened[compute] = vision, fusion
        return self._opened[compute]

    def _open(self, compute: str) -> tuple[OnnxVision, Any, list[str]]:
        """ONNX Runtime sessions of the two graphs (they compute in the export's precision), and the fusion
        graph's input names."""
        ort = _ort()
        options = session_options(self.threads)

        def session(name: str) -> Any:
            return ort.InferenceSession(str(self.folder / self.manifest.graphs[name].file), options,
                                        providers=["CPUExecutionProvider"])

        fusion = session("fusion")
        vision = OnnxVision(session("vision"), self.config.image_size, self.manifest.graphs["vision"].sha256)
        return vision, fusion, [node.name for node in fusion.get_inputs()]

    @property
    def image_input_size(self) -> int | None:
        return self.config.image_size

    @property
    def tokenizer(self) -> Any:
        """The export's MiniLM tokenizer (the service counts tokens and decodes token-array inputs with it)."""
        from jfe.models.text import load_tokenizer

        return load_tokenizer(self.text_path)

    def resolve_compute(self, precision: str | None = None) -> tuple[str, ComputePrecision]:
        if precision is None or str(precision).strip().lower() in ("auto", self.manifest.precision):
            return self.manifest.precision, "fp32"
        check_precision(precision)  # garbage gets the usual message
        raise ConfigError(f"{self.folder} is an ONNX export computing in {self.manifest.precision}; precision "
                          f"{precision!r} is a setting of the torch and openvino backends (use auto, or export again)")

    @property
    def graph_digests(self) -> tuple[str, ...]:
        """The graphs' sha256 (what identifies this model's vectors: it has no torch weights)."""
        return tuple(info.sha256 for _, info in sorted(self.manifest.graphs.items()))

    def set_precision(self, precision: str, vision: str | None = None) -> OnnxEncoder:
        self.resolve_compute(precision)  # only auto or the export's own precision
        self.precision = "auto"
        return self

    def encode_batch(self, items: list[Item], compute: str, vision: ComputePrecision) -> np.ndarray:
        vision_graph, fusion_graph = self._graphs(compute)
        packed = pack(self.manifest.fusion_kind, items, self.config, self.text_path)
        if packed.images:
            features = feature_maps(vision_graph, [item.required_image for item in packed.images],
                                    [item.id for item in packed.images]).numpy()
        else:
            features = self._placeholder
        feeds = {"features": features, **{name: value.numpy() for name, value in packed.inputs.items()}}
        vectors = fusion_graph.run(None, feeds)[0].astype(np.float32, copy=False)
        # int8 and bf16 arithmetic leave norms a little off 1
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def _no_training(self) -> ConfigError:
        return ConfigError(f"{self.folder} is an ONNX export: it encodes (encode) but does not train; train the "
                           f"PyTorch model ({self.manifest.source}) and export it again")

    def embed(self, items: Sequence[Item]) -> torch.Tensor:
        raise self._no_training()

    def set_trainable(self, phase: str) -> None:
        raise self._no_training()

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        raise ConfigError(f"{self.folder} is an ONNX export already; copy the folder, or save the PyTorch model")


@cache
def _onnx_class(arch: str, fusion_role: str, base: type[OnnxEncoder]) -> type[OnnxEncoder]:
    """A ``base`` subclass declaring the source arch's fusion role (reports compare by it)."""
    klass: type[OnnxEncoder] = type(f"{base.__name__}[{arch}]", (base,), {"fusion_role": fusion_role})
    klass.arch = arch  # set after creation: an export must not replace the arch's class in the load registry
    return klass


def load_onnx(folder: str | os.PathLike, manifest: OnnxManifest, source_class: type[Encoder],
              threads: int | None = None, runtime: type[OnnxEncoder] | None = None) -> OnnxEncoder:
    """The export at ``folder`` (its checked ``manifest``, :func:`read_manifest`) as an encoder of class ``runtime``
    (:class:`OnnxEncoder`, ONNX Runtime, by default; :class:`~jfe.models.openvino_backend.OpenVinoEncoder`);
    ``source_class`` is the class of its arch (the caller, :func:`jfe.models.load_model`, resolves it from the
    manifest)."""
    folder = Path(folder)
    settings = {k: v for k, v in manifest.config.items() if k != "arch"}
    try:
        config = source_class.config_class(**{**settings, "pretrained": False})
    except ValidationError as exc:
        raise ConfigError(f"{folder / MANIFEST_NAME}: its config does not fit arch {manifest.arch!r} "
                          f"({exc.errors()[0]['msg']})") from None
    if not isinstance(config, TowerConfig):
        raise ConfigError(f"{folder / MANIFEST_NAME}: arch {manifest.arch!r} is not a tower model")
    base: Any = runtime or OnnxEncoder  # a class is hashable (the cache key), which mypy does not see for a Module
    klass = _onnx_class(manifest.arch, source_class.fusion_role, base)
    return klass(folder, manifest, config, threads)


def cached_export_dir(source: str, digest: str) -> Path:
    """Where ``load_model(source, backend="onnx")`` keeps its fp32 export: JFE's cache, by name and a digest of the
    weights, so a retrained folder is exported again and an unchanged one once."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.strip("/"))[-60:] or "model"
    return cache_dir() / "onnx" / f"{slug}-{digest[:16]}-v{_jfe_version()}"


def cached_export(source: str, digest: str) -> Path | None:
    """The cached export of ``source`` with weights ``digest``, if one is there and intact."""
    folder = cached_export_dir(source, digest)
    try:
        read_manifest(folder)
    except ConfigError:
        return None
    return folder


def export_cached(source: str, model: Encoder, digest: str | None = None) -> Path:
    """The cached fp32 export of ``model`` (made once, atomically, when absent or unreadable); ``digest`` names its
    weights (default: :func:`weights_sha256` of the loaded model)."""
    digest = digest or weights_sha256(exportable(model, repr(source)))
    folder = cached_export(source, digest)
    if folder is not None:
        return folder
    folder = cached_export_dir(source, digest)
    logger.warning("exporting %s to ONNX once (cached in %s); `jfe export onnx` makes int8 exports", source, folder)
    return export_onnx(model, folder, source=source, overwrite=True)
