"""``jfe models list``, ``jfe encode``, ``jfe rerank`` and ``jfe env``. Torch and the towers are imported inside the
commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from jfe.cli_options import DEFAULT_PRECISION, BackendOption, PrecisionOption
from jfe.errors import ConfigError

models_app = typer.Typer(help="Built-in and saved encoders.", no_args_is_help=True)
export_app = typer.Typer(help="Export a model for another runtime.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``models`` and ``export`` (groups), ``encode``, ``rerank`` and ``env`` to the ``jfe`` app."""
    app.add_typer(models_app, name="models")
    app.add_typer(export_app, name="export")
    app.command("encode")(encode)
    app.command("rerank")(rerank)
    app.command("env")(env)


def environment() -> dict[str, object]:
    """The machine facts that decide JFE's speed, and what ``precision="auto"`` resolves to on each device."""
    import os

    import torch

    import jfe
    from jfe.hardware import bf16_support, machine_summary, runtime_versions
    from jfe.models.precision import resolve_precision

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {"jfe": jfe.__version__, **machine_summary(), "runtimes": runtime_versions(),
            "precision_auto": {device: resolve_precision("auto", device) for device in devices},
            "bf16": {device: bf16_support(device).detail for device in devices},
            "JFE_MALLOC_TUNE": os.environ.get("JFE_MALLOC_TUNE")}


def env(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines.")) -> None:
    """Show this machine as JFE sees it: CPU, its bf16 flags, what --precision auto picks, threads, malloc tuning,
    the ONNX Runtime / OpenVINO versions installed (the --backend choices).

    Paste it into a bug report, and next to any speed figure you publish."""
    info = environment()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, list):
            value = " ".join(str(v) for v in value) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        typer.echo(f"{key:<22} {value}")


def _saved_differences(registered: dict, folder: str | None) -> dict:
    """The settings in which a trained folder's own config.json differs from what the registered name says
    (e.g. a 2x2 grid registered under a name whose description says 4x4); {} when untrained or alike."""
    if not folder:
        return {}
    try:
        saved = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    from jfe.models.registry import default_config

    expected = {**default_config(saved.get("arch", "")), **registered}
    return {k: v for k, v in saved.items() if k in expected and expected[k] != v and k not in ("seed",)}


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the registered model names and whether each has trained weights (and from where)."""
    from jfe.models.pretrained import table
    from jfe.models.registry import list_models

    infos = list_models()
    rows = {row["name"]: row for row in table({i.name: i.arch for i in infos})}
    for info in infos:  # what the trained weights really are comes from their saved config, not from the name
        rows[info.name]["differs"] = _saved_differences(info.config, rows[info.name]["folder"])
    if as_json:
        typer.echo(json.dumps([{"name": i.name, "arch": i.arch, "fusion_role": i.fusion_role, "embed_dim": i.embed_dim,
                                "config": i.config, "description": i.description, **rows[i.name]} for i in infos],
                              indent=2))
        return
    width = max(len(i.name) for i in infos)
    for info in infos:
        row = rows[info.name]
        where = "package" if row["shipped"] else row["folder"]
        trained = f"trained: {row['tag']} ({where}, sha256 {row['sha256'][:12]})" if row["trained"] else \
            "UNTRAINED (random glue)"
        if row["differs"]:
            trained += "; its weights are " + ", ".join(f"{k}={v}" for k, v in row["differs"].items())
        typer.echo(f"{info.name:<{width}}  {info.arch:<20} {info.fusion_role:<12} {trained}\n{'':<{width}}  "
                   f"{info.description}")
    typer.echo("also: hf:<path to a transformers MLLM folder> (hf-rerank:<path>: the same MLLM as a yes/no "
               "reranker), or a folder written by save_pretrained; register trained weights with "
               "`jfe models register NAME FOLDER`")


@models_app.command("register")
def models_register(
    name: str = typer.Argument(..., help="A registered model name (see `jfe models list`)."),
    folder: Path = typer.Argument(..., help="A saved model folder (config.json + model.safetensors)."),
    tag: str = typer.Option("local", help="Where the weights come from (demo, reproduce, ...)."),
) -> None:
    """Make NAME load FOLDER's trained weights (linked or copied into the pretrained cache, with sha256)."""
    from jfe.models.pretrained import register_pretrained
    from jfe.models.registry import list_models

    entry = register_pretrained(name, folder, tag=tag, known_names={i.name: i.arch for i in list_models()})
    typer.echo(f"{name}: trained weights {entry.tag} at {entry.folder} (sha256 {entry.sha256[:12]}...)")


@models_app.command("compact")
def models_compact(
    folder: str = typer.Argument(..., help="A trained tower model: a saved folder or a registered name."),
    out: Path = typer.Argument(..., help="Where to write the compact model (a new folder)."),
    rank: int = typer.Option(64, min=1, help="Rank of the low-rank deltas of the large tower matrices."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT even if it is not a saved model."),
) -> None:
    """Save what training changed in the pretrained towers, in fp16 with low-rank deltas (a few MB).

    The compact folder loads like any saved model, on the towers of the asset cache (`jfe assets fetch`).
    How close it ranks to the full model is measured by `jfe ship-weights` (docs/results/shipped_weights.md)."""
    from jfe.models.compact import state_bytes
    from jfe.models.registry import list_models, load_model
    from jfe.models.towers import TowerEncoder

    # a registered name must have trained weights: compacting random glue would be a mistake, not a model
    named = folder in {info.name for info in list_models()}
    model = load_model(folder, device="cpu", pretrained=True if named else None)
    if not isinstance(model, TowerEncoder):
        raise ConfigError(f"{folder}: only models on the MobileNetV2 + MiniLM towers have a compact form "
                          f"(a {type(model).__name__} saves LoRA adapters instead)")
    written = model.save_compact(out, rank=rank, overwrite=overwrite)
    full, compact = state_bytes(model.state_dict()) / 1e6, (written / "model.safetensors").stat().st_size / 1e6
    typer.echo(f"wrote {written}: {compact:.1f} MB (the full fp32 weights are {full:.1f} MB)")


@models_app.command("unregister")
def models_unregister(name: str = typer.Argument(..., help="The name whose trained weights to forget.")) -> None:
    """Forget NAME's trained weights in the cache (it loads untrained again, with a warning)."""
    from jfe.models.pretrained import unregister_pretrained

    if not unregister_pretrained(name):
        raise ConfigError(f"{name!r} has no registered trained weights in the cache")
    typer.echo(f"{name}: trained weights removed")


def encode(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the vectors (.npy, float32 [n, dim])."),
    model: str = typer.Option("jfe-mini", "--model", "-m", help="Registered name, hf:<path> or a saved folder."),
    text: list[str] = typer.Option(None, "--text", "-t", help="A text input (repeatable)."),
    image: list[Path] = typer.Option(None, "--image", "-i", help="An image file (repeatable)."),
    items_file: Path = typer.Option(None, "--items", help="JSONL file of {text, image} items (image paths "
                                    "relative to the file)."),
    instruction: str = typer.Option(None, "--instruction", help="Task instruction prefixed to every text "
                                    "(query side)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    precision: PrecisionOption = DEFAULT_PRECISION,
    backend: BackendOption = None,
) -> None:
    """Embed texts, images or image+text pairs into an .npy matrix, one row per input, in order.

    Given both --text and --image the same number of times, the i-th text and the i-th image form one
    image+text item; given only one kind, each is a unimodal item. --items reads any mix from a file.
    """
    items = _cli_items(text, image, items_file, "encode")
    if out.suffix != ".npy":
        raise ConfigError(f"--out must end in .npy, got {out}")
    from jfe.paths import check_writable_path

    check_writable_path(out, folder=False)

    import numpy as np

    from jfe.models.registry import load_model
    from jfe.paths import atomic_write

    encoder = load_model(model, device=device, backend=backend)
    vectors = encoder.encode(items, instruction=instruction, batch_size=batch_size, progress=len(items) > batch_size,
                             precision=precision)
    with atomic_write(out, "wb") as handle:
        np.save(handle, vectors)
    typer.echo(f"wrote {vectors.shape[0]} x {vectors.shape[1]} vectors to {out}")


def _cli_items(text: list[str] | None, image: list[Path] | None, items_file: Path | None, what: str) -> list:
    """The items of ``--text`` / ``--image`` (paired when both are given, equally often) and ``--items``."""
    from jfe.data.items import Item, read_items

    texts, images = list(text or []), list(image or [])
    if texts and images:
        if len(texts) != len(images):
            raise ConfigError(f"got {len(texts)} --text and {len(images)} --image: pass them in equal numbers to "
                              f"form image+text pairs, or use --items for a mix")
        items = [Item(text=t, image=p, id=f"pair #{i}") for i, (t, p) in enumerate(zip(texts, images, strict=True))]
    else:
        items = [Item(text=t, id=f"text #{i}") for i, t in enumerate(texts)]
        items += [Item(image=p, id=f"image #{i} ({p})") for i, p in enumerate(images)]
    if items_file is not None:
        items += read_items(items_file)  # the data layer's reader: errors name the file and the line
    if not items:
        raise ConfigError(f"nothing to {what}: give --text, --image or --items")
    return items


def rerank(
    model: str = typer.Option("jfe-mini-rerank", "--model", "-m", help="A reranker: registered name or saved "
                              "folder (jfe-mini-rerank, late-fusion-rerank-mini, hf-rerank:<path>)."),
    query_text: str = typer.Option(None, "--query-text", "-q", help="The query's text."),
    query_image: Path = typer.Option(None, "--query-image", help="The query's image."),
    text: list[str] = typer.Option(None, "--text", "-t", help="A candidate text (repeatable)."),
    image: list[Path] = typer.Option(None, "--image", "-i", help="A candidate image (repeatable)."),
    items_file: Path = typer.Option(None, "--items", help="JSONL file of {text, image} candidates (image paths "
                                    "relative to the file)."),
    instruction: str = typer.Option(None, "--instruction", help="Task instruction prefixed to the query's text."),
    top: int = typer.Option(None, "--top", "-k", min=1, help="Print only the best N (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (index, score, text, image per candidate)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Pairs per forward pass."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    precision: PrecisionOption = DEFAULT_PRECISION,
) -> None:
    """Score candidates against one query with a reranker that reads each (query, candidate) pair in one sequence;
    print them best first.

    Candidates are given as for `jfe encode` (--text / --image, paired when both are given equally often, and
    --items). A reranker that corrects a first stage gets it from its own retriever (config.retriever).
    """
    from jfe.api import rerank as rerank_items
    from jfe.data.items import Item
    from jfe.models.registry import load_model

    if not query_text and query_image is None:
        raise ConfigError("no query: give --query-text, --query-image, or both")
    candidates = _cli_items(text, image, items_file, "rerank")
    scores = rerank_items(Item(text=query_text or None, image=query_image, id="query"), candidates,
                          model=load_model(model, device=device), instruction=instruction, batch_size=batch_size,
                          precision=precision)
    order = sorted(range(len(candidates)), key=lambda i: -float(scores[i]))[:top]
    rows = [{"index": i, "score": round(float(scores[i]), 6), "text": candidates[i].text,
             "image": str(candidates[i].image) if candidates[i].image is not None else None} for i in order]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    typer.echo(f"{'rank':>4}  {'score':>10}  {'#':>4}  candidate")
    for rank, row in enumerate(rows, start=1):
        shown = " + ".join(str(v) for v in (row["image"], row["text"]) if v is not None)
        typer.echo(f"{rank:>4}  {row['score']:>10.4f}  {row['index']:>4}  {shown}")


@export_app.command("sentence-transformers")
def export_sentence_transformers(
    model: str = typer.Argument(..., help="Registered name (jfe-mini, ...), hf:<path>, or a saved model folder."),
    out: Path = typer.Argument(..., help="Folder to write (an export there is replaced atomically; any other "
                                         "non-empty folder is refused)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT folder that is not such an "
                                                              "export, and everything in it."),
) -> None:
    """Export a model as a sentence-transformers folder: SentenceTransformer(OUT, trust_remote_code=True) loads it.

    It encodes texts, images and {"text", "image"} dicts as `jfe encode --precision fp32` does (needs the
    sentence-transformers extra, and jfe installed where it is loaded).
    """
    from jfe.models.registry import load_model
    from jfe.models.st_export import ST_KIND
    from jfe.models.st_export import export_sentence_transformers as export
    from jfe.paths import check_out_dir

    check_out_dir(out, ST_KIND, overwrite=overwrite)  # before loading anything
    folder = export(load_model(model, device="cpu"), out, source=model, overwrite=overwrite)
    typer.echo(f"exported {model} for sentence-transformers to {folder}: "
               f"SentenceTransformer({str(folder)!r}, trust_remote_code=True)")


@export_app.command("onnx")
def export_onnx(
    model: str = typer.Argument(..., help="Registered name (jfe-mini, two-tower-mini, ...) or a saved model folder."),
    out: Path = typer.Argument(..., help="Folder to write (an export there is replaced atomically; any other "
                                         "non-empty folder is refused)."),
    quantize: str = typer.Option("fp32", "--quantize", help="fp32, or int8: MiniLM and the glue in dynamic int8 "
                                                            "(MobileNetV2 stays fp32 unless --int8-vision)."),
    int8_vision: bool = typer.Option(False, "--int8-vision", help="MobileNetV2 in static int8 as well: faster, but "
                                     "image embeddings move more (docs/results/onnx.md); needs --calibration."),
    calibration: list[Path] = typer.Option(None, "--calibration", help="Candidate pool jsonl file(s) whose images "
                                           "calibrate --int8-vision (repeatable)."),
    data_root: Path = typer.Option(None, "--data-root", help="Dataset root the pools' image paths are relative to."),
    calibration_images: int = typer.Option(128, "--calibration-images", min=8, help="Pool images sampled (seeded) "
                                                                                   "for calibration."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT folder that is not an ONNX "
                                                              "export, and everything in it."),
) -> None:
    """Export a model to ONNX (a vision graph and a fusion graph, its tokenizer and a manifest) for ONNX Runtime.

    The folder then loads like any model: `jfe encode --model OUT`, `jfe index build --model OUT`, `jfe serve`.
    """
    import random
    import time

    from jfe.data.mbeir import read_pool_files
    from jfe.models.onnx_backend import ONNX_KIND
    from jfe.models.onnx_backend import export_onnx as export
    from jfe.models.registry import load_model
    from jfe.paths import check_out_dir

    check_out_dir(out, ONNX_KIND, overwrite=overwrite)  # before any work: a wrong OUT costs nothing
    if int8_vision and quantize.strip().lower() != "int8":
        raise ConfigError("--int8-vision is part of an int8 export: add --quantize int8")
    images: list[Path] = []
    if calibration:
        if not int8_vision:
            raise ConfigError("--calibration calibrates --int8-vision; add --int8-vision (and --quantize int8)")
        if data_root is None:
            raise ConfigError("--calibration needs --data-root, the dataset root its image paths are relative to")
        pool = [c for c in read_pool_files(calibration)[0].values() if c.img_path]
        if not pool:
            raise ConfigError("no candidate with an image in the --calibration pool(s): "
                              + ", ".join(map(str, calibration)))
        root = data_root
        sample = random.Random(0).sample(pool, min(calibration_images, len(pool)))
        images = [root / c.img_path for c in sample if c.img_path]
    started = time.perf_counter()
    encoder = load_model(model, device="cpu")
    folder = export(encoder, out, source=model, precision=quantize, vision_int8=int8_vision,
                    calibration=images or None,
                    calibration_source=(f"{', '.join(map(str, calibration))} under {data_root}: {len(images)} "
                                        f"images, a seed-0 sample") if calibration else None,
                    overwrite=overwrite)
    typer.echo(f"exported {model} ({quantize}{' + int8 vision' if int8_vision else ''}) to {folder} in "
               f"{time.perf_counter() - started:.0f}s")
