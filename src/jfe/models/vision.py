"""The vision tower: torchvision's ImageNet MobileNetV2, defined here by hand (torchvision does not import
beside the local torch build) with torchvision's exact parameter names, so its state dict loads strictly.

The last feature map (``[1280, 7, 7]`` at 224 px) is a grid of visual tokens; :func:`grid_tokens` pools it
to ``g x g`` tokens (7, 4, 2, ...) plus an optional global (mean) token.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from jfe.errors import AssetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 1280
# modules of MobileNetV2's trunk (``features``): stem conv, 17 inverted-residual blocks, final 1x1 conv
TRUNK_MODULES = 19
# bump when preprocessing changes: it is part of the feature-cache key
# 2: EXIF orientation applied, large images reduced before the bicubic resize, 16-bit images scaled
PREPROCESS_VERSION = 2
# images larger than REDUCING_GAP x 2 x the input size are box-reduced to >= REDUCING_GAP x the input size
# first; PIL's documentation calls a gap of 3 indistinguishable from a direct resize in most cases
REDUCING_GAP = 3

# (expansion t, output channels c, repeats n, first stride s): torchvision's inverted_residual_setting
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))


class ConvBNReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation: keys ``0.weight`` (conv), ``1.*`` (batch norm)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's module names: ``features.*`` and ``classifier.1``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNReLU(cin, FEATURE_DIM, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:  # torchvision's initialisation, for the random-weight (test) tower
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean((2, 3))
        return self.classifier(pooled)


def load_mobilenet_v2_state() -> dict[str, torch.Tensor]:
    """The ImageNet state dict from the offline asset (clear :class:`AssetError` if it is not fetched)."""
    from jfe.data.assets import mobilenet_v2_weights

    path = mobilenet_v2_weights()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise AssetError(f"cannot read MobileNetV2 weights {path}: {exc}") from exc


def mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """MobileNetV2; ``pretrained`` loads the ImageNet weights strictly (every key must match).

    The pretrained network is read once per process and copied for every further tower.
    """
    return copy.deepcopy(_pristine_mobilenet_v2()) if pretrained else MobileNetV2()


@functools.lru_cache(maxsize=1)
def _pristine_mobilenet_v2() -> MobileNetV2:
    net = MobileNetV2()
    net.load_state_dict(load_mobilenet_v2_state(), strict=True)
    return net.eval()


def square_resize(image: Image.Image, image_size: int) -> Image.Image:
    """An RGB PIL image padded to a square on white and resized (bicubic) to ``image_size``: the geometric part of
    :func:`preprocess`, which leaves an image already at that size as it is (so a DataLoader worker may run it)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    factor = max(w, h) // (REDUCING_GAP * image_size)
    if factor >= 2:  # a box reduction first, as PIL's reducing_gap does: a 4000-px PNG resizes ~10x faster
        image = image.reduce(factor)
        w, h = image.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


def preprocess(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """RGB PIL images -> normalised ``[n, 3, S, S]`` float tensor.

    Each image is padded to a square on white (emoji and clip-art must be seen whole, so no centre crop),
    resized with bicubic filtering, and normalised with ImageNet statistics in one vectorised step.
    """
    arrays = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        arrays[i] = np.asarray(square_resize(image, image_size))
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def grid_tokens(feature_map: torch.Tensor, grid: int, global_token: bool = False) -> torch.Tensor:
    """``[n, C, h, w]`` feature maps -> ``[n, g*g (+1), C]`` visual tokens, row-major, global token last."""
    pooled = feature_map if feature_map.shape[-2:] == (grid, grid) else \
        nn.functional.adaptive_avg_pool2d(feature_map, grid)
    tokens = pooled.flatten(2).transpose(1, 2)
    if global_token:
        tokens = torch.cat([tokens, feature_map.mean((2, 3)).unsqueeze(1)], dim=1)
    return tokens


def fold_batchnorm(features: nn.Module) -> nn.Module:
    """A copy of ``features`` for inference with every BatchNorm folded into the convolution before it.

    Halves MobileNetV2's CPU time; outputs match the unfolded eval-mode network to float rounding (~1e-5).
    """
    fused = copy.deepcopy(features).eval()

    def fold(seq: nn.Sequential) -> None:
        children = list(seq.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(seq, conv_name, fuse_conv_bn_eval(conv, bn))  # torch's own folding (eval-mode statistics)
                setattr(seq, bn_name, nn.Identity())

    with torch.no_grad():
        for module in fused.modules():
            if isinstance(module, nn.Sequential):
                fold(module)
    for param in fused.parameters():
        param.requires_grad_(False)
    # torch's stub of Module.to lacks the memory_format keyword that the runtime accepts
    return fused.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def feature_map_side(image_size: int) -> int:
    """Side of MobileNetV2's last feature map for ``image_size`` px inputs (7 at 224)."""
    for _ in range(5):  # five stride-2 stages, each ceil-halving (padding 1, kernel 3)
        image_size = (image_size + 1) // 2
    return image_size


class FeatureTower(Protocol):
    """What :func:`jfe.models.feature_cache.feature_maps` runs: :class:`VisionTower` (PyTorch) or an exported
    graph of it (:class:`jfe.models.onnx_backend.OnnxVision`)."""

    image_size: int

    @property
    def device(self) -> torch.device: ...

    @property
    def cacheable(self) -> bool:
        """Whether a frozen part exists whose output the feature cache may keep."""
        ...

    @property
    def chunk(self) -> int | None:
        """Images per call (None: :func:`~jfe.models.feature_cache.vision_chunk`'s memory-bounded default)."""
        ...

    def cache_key(self, dtype: torch.dtype) -> str: ...

    def features_of(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def frozen_part_of(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def trained_part(self, maps: torch.Tensor) -> torch.Tensor: ...


class VisionTower(nn.Module):
    """MobileNetV2's convolutional trunk: images -> last feature map ``[n, 1280, S/32, S/32]``.

    Batch norm always uses its ImageNet running statistics (``train()`` leaves it in eval mode), so the
    features of a frozen tower are the same in training and evaluation, which lets them be cached. The trunk
    may also be trained in part (:meth:`set_trainable_top`): the modules below :attr:`split` stay frozen,
    and only their output (the *frozen part*) is cached. The frozen part runs a BN-folded, channels-last copy
    without autograd. ``fingerprint`` identifies the frozen part's weights for the feature cache; it (and the
    folded copy) is recomputed after any ``load_state_dict`` and whenever the split moves.
    """

    # Set with object.__setattr__ (not submodules); declared so torch's __getattr__ typing does not apply.
    _folded: nn.Module | None
    _folded_stamp: tuple[int, int]

    def __init__(self, image_size: int = 224, pretrained: bool = True) -> None:
        super().__init__()
        self.image_size = image_size
        self.features = mobilenet_v2(pretrained).features
        self.features.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stub lacks it
        self.features.eval()
        self.features.requires_grad_(False)  # frozen until set_trainable_top says otherwise
        self._fingerprint: tuple[tuple[int, int], str] | None = None  # (stamp, digest of the frozen part)
        # object.__setattr__ keeps the folded copy out of the submodules: never saved, rebuilt when stale
        object.__setattr__(self, "_folded", None)
        object.__setattr__(self, "_folded_stamp", (-1, -1))
        self.register_load_state_dict_post_hook(lambda module, _keys: module._invalidate())

    def _invalidate(self) -> None:
        self._fingerprint = None
        object.__setattr__(self, "_folded", None)

    def set_trainable_top(self, modules: int) -> None:
        """Train the top ``modules`` of the trunk's :data:`TRUNK_MODULES` (0: frozen; all: the whole trunk).

        The trunk's modules, bottom to top: the stem convolution, 17 inverted-residual blocks, the final 1x1
        convolution to 1,280 channels. Everything below the trained top stays frozen and cacheable.
        """
        if not 0 <= modules <= TRUNK_MODULES:
            raise ValueError(f"trainable vision modules must be in 0..{TRUNK_MODULES}, got {modules}")
        self.features.requires_grad_(False)
        if modules:
            self.features[TRUNK_MODULES - modules:].requires_grad_(True)

    def train(self, mode: bool = True) -> VisionTower:
        # ``features`` stays in eval mode: BN statistics remain ImageNet's (small contrastive batches would
        # wreck them), and skipping the recursion keeps model.train()/eval() cheap
        self.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return next(self.features.parameters()).device

    @property
    def cacheable(self) -> bool:
        return self.split > 0

    #: images per call: the memory-bounded default of :func:`jfe.models.feature_cache.vision_chunk`
    chunk: int | None = None

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.features.parameters())

    @property
    def split(self) -> int:
        """Index of the first trunk module with a trainable weight (:data:`TRUNK_MODULES` when frozen)."""
        for index, module in enumerate(self.features):
            if any(p.requires_grad for p in module.parameters()):
                return index
        return len(self.features)

    @property
    def grid_size(self) -> int:
        """Side of the last feature map (7 at 224 px)."""
        return feature_map_side(self.image_size)

    def _stamp(self, split: int) -> tuple[int, int]:
        """``(split, sum of the frozen part's tensor versions)``: it changes whenever the split moves or any frozen
        weight or statistic is changed in place (``add_``, ``copy_``, a compact checkpoint's deltas), so the
        fingerprint and the folded copy are never stale. (Optimisers only touch the trained top, never stamped.)"""
        part = self.features[:split]
        return split, sum(t._version for t in (*part.parameters(), *part.buffers()))

    def fingerprint(self) -> str:
        """sha1 over the frozen part's weights (and BN statistics): equal fingerprints give equal features.

        For a frozen tower that is the whole trunk; a partly trained one names its split as well."""
        split = self.split
        stamp = self._stamp(split)
        if self._fingerprint is None or self._fingerprint[0] != stamp:
            digest = hashlib.sha1()
            for name, tensor in sorted(self.features[:split].state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            value = digest.hexdigest()[:16]
            self._fingerprint = (stamp, value if split == len(self.features) else f"{value}-b{split}")
        return self._fingerprint[1]

    def cache_key(self, dtype: torch.dtype) -> str:
        """What (besides the image content) determines a cached feature map of the frozen part."""
        return f"mnv2-{self.fingerprint()}-s{self.image_size}-p{PREPROCESS_VERSION}-{str(dtype).split('.')[-1]}"

    def _folded_part(self, split: int, device: torch.device) -> nn.Module:
        """The BN-folded copy of ``features[:split]`` (rebuilt when the split, device or weights change)."""
        folded, stamp = self._folded, self._stamp(split)
        if folded is None or self._folded_stamp != stamp or next(folded.parameters()).device != device:
            folded = fold_batchnorm(self.features[:split])
            object.__setattr__(self, "_folded", folded)
            object.__setattr__(self, "_folded_stamp", stamp)
        return folded

    def frozen_part(self, pixels: torch.Tensor) -> torch.Tensor:
        """``features[:split]`` of normalised pixels, without autograd: what the feature cache stores."""
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        split = self.split
        if split == 0:
            return pixels
        with torch.no_grad():
            return self._folded_part(split, pixels.device)(pixels)

    def trained_part(self, maps: torch.Tensor) -> torch.Tensor:
        """``features[split:]`` of the frozen part's output, with autograd (identity for a frozen tower)."""
        split = self.split
        if split == len(self.features):
            return maps
        if split == 0:
            self._invalidate()  # every weight is being trained: fingerprint and folded copy go stale
        return self.features[split:](maps.contiguous(memory_format=torch.channels_last))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trained_part(self.frozen_part(pixels))

    def features_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess and run a batch of PIL images on the tower's device."""
        return self(self._pixels(images)).contiguous()

    def frozen_part_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The frozen part's output for a batch of PIL images (the whole trunk's when the tower is frozen)."""
        return self.frozen_part(self._pixels(images)).contiguous()

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return preprocess(images, self.image_size).to(next(self.features.parameters()).device)
