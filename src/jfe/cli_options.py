"""Typer options that commands of several layers share, declared once so they read and behave alike.

Top-level and torch-free like :mod:`jfe.errors`: the ``commands`` module of any layer may import it without
importing a layer above its own, and ``jfe --help`` stays fast. Values are checked where they are used
(``Encoder.set_precision`` raises a ``ConfigError`` naming the accepted ones).
"""

from __future__ import annotations

from typing import Annotated

import typer

DEFAULT_PRECISION = "auto"
PRECISION_HELP = "Compute precision: auto (bf16 where the CPU/GPU has native bf16, else fp32), fp32 or bf16."

#: ``precision: PrecisionOption = DEFAULT_PRECISION`` declares ``--precision`` (see :mod:`jfe.models.precision`)
PrecisionOption = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]

# reranking (jfe search, jfe eval): a reranker reorders the first stage's top N
RerankOption = Annotated[str | None, typer.Option(
    "--rerank", help="Reranker (jfe-mini-rerank, late-fusion-rerank-mini or a trained folder) that reorders the "
                     "first stage's top --rerank-k.")]
RerankKOption = Annotated[int, typer.Option("--rerank-k", min=1, max=1000, help="How many first-stage candidates "
                                                                                 "the reranker reads per query.")]

# what runs the encoder (jfe.models.onnx_backend, jfe.models.openvino_backend): None = what the model is (an ONNX
# export folder on ONNX Runtime, anything else on PyTorch); searching an index follows the backend its meta.json records
BackendOption = Annotated[str | None, typer.Option(
    "--backend", help="torch, onnx (ONNX Runtime; a PyTorch model is exported once, fp32, into the cache; "
                      "`jfe export onnx` makes int8 exports) or openvino (OpenVINO Runtime on an fp32 export; bf16 "
                      "where the CPU has it). Default: what --model is; for an index, what built it.")]
