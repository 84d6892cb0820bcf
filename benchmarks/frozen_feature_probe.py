"""How far can the frozen towers go on cross-modal retrieval? A probe (issue 11), not a model of the package.

The image side is the frozen MobileNetV2 (ImageNet) feature map, mean-pooled to 1,280 numbers; the text side
is the frozen MiniLM sentence vector (mean-pooled, 384). Two small heads (linear, or an MLP with 1,024 hidden
units) map both into 256 dimensions and are trained with a symmetric InfoNCE loss (learnable temperature,
AdamW lr 1e-3, ``--steps`` x ``--batch`` pairs drawn with replacement) on caption -> image pairs from:

* ``corpus``: ``--pairs`` task-0 pairs sampled from the pretraining corpus (``jfe data build-pretrain``);
* ``mini``: MiniBEIR's own task-0 training pairs (emoji and clip-art, ~1,850);
* ``corpus+mini``: both, the MiniBEIR pairs repeated 5 times so they are not drowned.

It reports R@5 (%) every ``--eval-every`` steps on MiniBEIR **test** with the full local pools: text -> image (task 0)
and image -> text (task 3) for emoji and clip-art, plus the corpus's own val split (its captions against
its val images) as an in-domain check. Whatever these heads reach is roughly what the frozen features carry
for unseen emoji and clip-art; jfe-mini trains more (the LM itself) but starts from the same features.

    python benchmarks/frozen_feature_probe.py --train corpus --pairs 20000 --image-size 128 \\
        --out runs/bench/probe_corpus_128.json

Features are cached per image size under ``--cache`` (a 20k-pair run extracts ~30k images: ~5 min at 128 px,
~12 min at 224 px on 2 cores).

``--tune-blocks K`` also trains the top ``K`` modules of MobileNetV2's trunk (of 19: the last 1x1 convolution
is one, each inverted-residual block another; batch norm keeps its ImageNet statistics): the trunk below them
stays frozen and its output is cached, so this costs a few times the frozen probe, not a CNN fine-tune. It
asks whether the frozen ImageNet features are what caps cross-modal retrieval.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from jfe.data.mbeir import read_candidates, read_queries
from jfe.hardware import machine_summary
from jfe.models.text import TextTower
from jfe.models.vision import TRUNK_MODULES, VisionTower


class Pool(nn.Module):
    """Mean-pool a feature map (a pooled vector passes through), then standardise it."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.mean((2, 3)) if x.dim() == 4 else x) - self.mean) / self.std


class Features:
    """Frozen image and text features, cached as .npy per name.

    With ``tune_blocks`` = 0 an image feature is the pooled 1,280-d vector; otherwise it is the float16 output of
    the tower's frozen part (the map entering module ``split``), which the trainable top turns into a vector.
    """

    def __init__(self, image_size: int, cache: Path, tune_blocks: int = 0) -> None:
        self.vision, self.text = VisionTower(image_size).eval(), TextTower().eval()
        self.vision.set_trainable_top(tune_blocks)  # the tower's frozen part is what gets cached
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)

    @property
    def split(self) -> int:
        return self.vision.split

    def _image_batch(self, batch: list[Image.Image]) -> np.ndarray:
        if self.split == TRUNK_MODULES:
            with torch.no_grad():
                return self.vision.features_of(batch).float().mean((2, 3)).numpy()
        return self.vision.frozen_part_of(batch).half().numpy()

    def images(self, root: Path, paths: list[str], name: str) -> np.ndarray:
        suffix = "" if self.split == TRUNK_MODULES else f"_split{self.split}"
        path = self.cache / f"{name}_img{suffix}.npy"
        if path.exists():
            return np.load(path)
        out = []
        for i in range(0, len(paths), 32):
            out.append(self._image_batch([Image.open(root / p).convert("RGB") for p in paths[i:i + 32]]))
        feats = np.concatenate(out)
        np.save(path, feats)
        return feats

    def texts(self, texts: list[str], name: str) -> np.ndarray:
        path = self.cache / f"{name}_txt.npy"
        if path.exists():
            return np.load(path)
        out = []
        for i in range(0, len(texts), 256):
            with torch.no_grad():
                out.append(self.text.sentence(texts[i:i + 256]).float().numpy())
        feats = np.concatenate(out)
        np.save(path, feats)
        return feats


def task0_pairs(feats: Features, root: Path, split: str, name: str, limit: int | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    queries = [q for p in sorted((root / "query" / split).glob(f"*task0_{split}.jsonl")) for q in read_queries(p)]
    pool = {c.did: c for p in (root / "cand_pool" / "local").glob("*task0_cand_pool.jsonl")
            for c in read_candidates(p)}
    if limit is not None:
        random.Random(seed).shuffle(queries)
        queries = queries[:limit]
    images = [pool[q.pos_cand_list[0]].img_path or "" for q in queries]
    return feats.images(root, images, name), feats.texts([q.query_txt or "" for q in queries], name)


def minibeir_tests(feats: Features, mini: Path) -> list[tuple[str, int, np.ndarray, np.ndarray, list[str], list]]:
    tests = []
    for dataset in ("emoji", "clipart"):
        for task in (0, 3):
            queries = read_queries(mini / "query" / "test" / f"mbeir_{dataset}_task{task}_test.jsonl")
            pool = read_candidates(mini / "cand_pool" / "local" / f"mbeir_{dataset}_task{task}_cand_pool.jsonl")
            name = f"{dataset}{task}"
            if task == 0:
                q = feats.texts([x.query_txt or "" for x in queries], name + "q")
                c = feats.images(mini, [x.img_path or "" for x in pool], name + "c")
            else:
                q = feats.images(mini, [x.query_img_path or "" for x in queries], name + "q")
                c = feats.texts([x.txt or "" for x in pool], name + "c")
            tests.append((f"{dataset} task {task}", task, q, c, [x.did for x in pool],
                          [set(x.pos_cand_list) for x in queries]))
    return tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("runs/pretrain"))
    parser.add_argument("--minibeir", type=Path, default=Path("runs/minibeir"))
    parser.add_argument("--train", choices=("corpus", "mini", "corpus+mini"), default="corpus")
    parser.add_argument("--pairs", type=int, default=20000, help="corpus pairs sampled (corpus, corpus+mini)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head", choices=("linear", "mlp"), default="linear")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune-blocks", type=int, default=0,
                        help="also train the top K modules of MobileNetV2's trunk (0: frozen, max 18)")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (worth it with AMX/AVX512-BF16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="head learning rate (the tuned trunk gets lr/10)")
    parser.add_argument("--cache", type=Path, default=Path("runs/probe_cache"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.time()
    if not 0 <= args.tune_blocks < TRUNK_MODULES:
        parser.error(f"--tune-blocks must be in 0..{TRUNK_MODULES - 1}")
    feats = Features(args.image_size, args.cache / f"s{args.image_size}", tune_blocks=args.tune_blocks)
    tests = minibeir_tests(feats, args.minibeir)
    parts = []
    if args.train != "mini":
        parts.append(task0_pairs(feats, args.corpus, "train", f"corpus{args.pairs}s{args.seed}", args.pairs,
                                 args.seed))
        val_img, val_txt = task0_pairs(feats, args.corpus, "val", "corpusval")
        ids = [str(i) for i in range(len(val_img))]
        tests.append(("corpus val task 0", 0, val_txt, val_img, ids, [{i} for i in ids]))
    if args.train != "corpus":
        parts.extend([task0_pairs(feats, args.minibeir, "train", "minitrain")] * (5 if parts else 1))
    train_img = np.concatenate([p[0] for p in parts])
    train_txt = np.concatenate([p[1] for p in parts])
    print(f"{len(train_img)} training pairs, features in {time.time() - started:.0f} s", file=sys.stderr)

    def head(dim: int) -> nn.Module:
        return nn.Linear(dim, 256) if args.head == "linear" else \
            nn.Sequential(nn.Linear(dim, 1024), nn.GELU(), nn.Linear(1024, 256))

    text_head = head(train_txt.shape[1])
    log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    if args.tune_blocks:
        top = copy.deepcopy(feats.vision.features[feats.split:]).float().train()  # trainable: set_trainable_top
        top.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)  # ImageNet BN statistics
        with torch.no_grad():  # the head's input scale, from a sample of the (untuned) top's output
            sample = top(torch.from_numpy(train_img[:512]).float()).mean((2, 3)).numpy()
        mean, std = torch.from_numpy(sample.mean(0)), torch.from_numpy(sample.std(0) + 1e-6)
        image_proj = head(sample.shape[1])
        image_head: nn.Module = nn.Sequential(top, Pool(mean, std), image_proj)
        groups = [{"params": top.parameters(), "lr": args.lr / 10},
                  {"params": [*image_proj.parameters(), *text_head.parameters(), log_scale]}]
    else:
        mean_np, std_np = train_img.mean(0), train_img.std(0) + 1e-6
        image_head = nn.Sequential(Pool(torch.from_numpy(mean_np), torch.from_numpy(std_np)),
                                   head(train_img.shape[1]))
        groups = [{"params": [*image_head.parameters(), *text_head.parameters(), log_scale]}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.05)
    images = torch.from_numpy(train_img)
    texts = torch.from_numpy(train_txt).float()

    def embed_images(x: np.ndarray) -> torch.Tensor:
        out = [image_head(torch.from_numpy(x[i:i + 256]).float()) for i in range(0, len(x), 256)]
        return F.normalize(torch.cat(out), dim=-1)

    def embed_texts(x: np.ndarray) -> torch.Tensor:
        return F.normalize(text_head(torch.from_numpy(x).float()), dim=-1)

    def evaluate() -> dict[str, float]:
        scores = {}
        image_head.eval()
        with torch.no_grad():
            for name, task, q, c, dids, positives in tests:
                qe, ce = (embed_texts(q), embed_images(c)) if task == 0 else (embed_images(q), embed_texts(c))
                top = (qe @ ce.T).topk(5, dim=1).indices.numpy()
                hits = [bool({dids[j] for j in row} & pos) for row, pos in zip(top, positives, strict=True)]
                scores[name] = round(100 * float(np.mean(hits)), 1)
        image_head.train()
        if args.tune_blocks:
            image_head[0].apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
        return scores

    curve = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(images), (args.batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            a = F.normalize(image_head(images[idx].float()).float(), dim=-1)
            b = F.normalize(text_head(texts[idx]).float(), dim=-1)
        logits = log_scale.exp().clamp(max=100) * a @ b.T
        target = torch.arange(args.batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            point = {"step": step, "loss": round(loss.item(), 3), "R@5": evaluate()}
            curve.append(point)
            print(json.dumps(point), flush=True)
    chance = {name: round(100 * 5 / len(dids), 2) for name, _, _, _, dids, _ in tests}
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "train_pairs": len(train_img),
              "machine": machine_summary(), "chance_R@5": chance, "curve": curve,
              "seconds": round(time.time() - started, 1)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
