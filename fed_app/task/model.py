"""Models: timm's DINO ViT-S/16 or any timm model by name with its pretrained tag (pretrained, a local
weights file, or random), and a tiny ViT for tests."""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from fed_app.config import RunConfig
from fed_app.errors import UserError, override_hint
from fed_app.task.head import head_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the tiny test ViT's normalization (pretrained models use timm's own)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_HEAD = ("head.mlp.", "head.last_layer.")  # DINO's projection head in its training checkpoints: no classifier


class ModelWeightsError(UserError, RuntimeError):
    """Pretrained weights that cannot be had; the message says how to point at a local file."""


@dataclass(frozen=True)
class ModelSpec:
    """What the data path needs to know about a model: input size, resize interpolation and normalization."""

    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    @classmethod
    def from_timm(cls, model: torch.nn.Module) -> ModelSpec:
        """timm's data configuration of a pretrained model (for vit_small_patch16_224.dino: 224 px, bicubic,
        ImageNet mean and std). Its crop_pct center crop is not applied: a CIFAR image is the whole object."""
        config = timm.data.resolve_data_config({}, model=model)
        return cls(config["input_size"][-1], tuple(config["mean"]), tuple(config["std"]), config["interpolation"])


def timm_model(name: str, num_classes: int, weights: str) -> torch.nn.Module:
    """timm's `name` (architecture.pretrained-tag) with a fresh `num_classes` classifier: its pretrained
    weights downloaded, read from a local file (its own classifier dropped), or random."""
    if weights == "random":
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if weights:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        state = without_head(model, read_weights(weights))
        _check_keys(model, state, weights)
        return timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=dict(state_dict=state)
        )
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as err:  # offline: huggingface_hub / urllib errors of many kinds
        hint = ("dino_deitsmall16_pretrain.pth (or timm's vit_small_patch16_224.dino)"
                if name == "vit_small_patch16_224.dino" else f"timm's {name} weights (pytorch_model.bin or .safetensors)")
        raise ModelWeightsError(
            f"could not fetch the weights of {name} ({type(err).__name__}); download {hint} elsewhere and "
            f"{override_hint('model-weights', repr('/abs/path/to/file.pth'))}, or model-weights='random' to "
            f"train from scratch."
        ) from err


def _vit_small_dino(num_classes: int, weights: str) -> torch.nn.Module:
    return timm_model("vit_small_patch16_224.dino", num_classes, weights)


def _vit_tiny_test(num_classes: int, weights: str) -> torch.nn.Module:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                              mlp_ratio=2.0, num_classes=num_classes)
    if weights not in ("", "random"):
        state = without_head(model, read_weights(weights))
        _check_keys(model, state, weights)
        model.load_state_dict(state, strict=False)
    return model


# name -> (factory, its spec; None: timm's data configuration of the built model)
MODELS: dict[str, tuple[Callable[[int, str], torch.nn.Module], ModelSpec | None]] = {
    "vit-small-dino": (_vit_small_dino, None),
    "vit-tiny-test": (_vit_tiny_test, ModelSpec(input_size=32)),
}


def build_model(cfg: RunConfig, num_classes: int) -> tuple[torch.nn.Module, ModelSpec]:
    """The model on CPU in fp32 with a fresh `num_classes` head seeded from cfg.seed, and its spec."""
    factory, spec = MODELS.get(cfg.model, (lambda n, w: timm_model(cfg.model, n, w), None))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = factory(num_classes, cfg.model_weights)
    return model, spec or ModelSpec.from_timm(model)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A backbone state dict from a timm file, DINO's released file, or a DINO training checkpoint."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelWeightsError(
            f"model-weights={path!r} is not a file; pass the absolute path of a .pth file, "
            f"'' to download, or 'random'."
        )
    try:  # tensors and plain values only: a pickle may run code. DINO's checkpoints keep their argparse args
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelWeightsError(
            f"model-weights={path!r} holds {_unsafe(file)} besides tensors, which fedit does not unpickle (that "
            f"could run code); pass a file of tensors, e.g. one saved with torch.save(model.state_dict(), path)."
        ) from None
    for key in ("teacher", "state_dict", "model"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state = {}
    for k, v in ckpt.items():
        for prefix in ("module.", "backbone.", "_orig_mod."):
            k = k.removeprefix(prefix)
        if torch.is_tensor(v) and not k.startswith(DINO_HEAD):  # a model's own classifier: see without_head
            state[k] = v
    return state


def _unsafe(file: Path) -> str:
    """What a weights file holds that a weights-only load refuses, by name (read from the pickle, never run)."""
    try:
        names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - {"argparse.Namespace"})
    except Exception:  # noqa: BLE001 - only the sentence's detail: a file too damaged to list is still refused
        names = []
    return ", ".join(names[:3]) or "objects"


def without_head(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without the model's classifier (the run builds its own for its classes)."""
    prefix = head_name(model) + "."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    prefix = head_name(model) + "."
    expected = {k for k in model.state_dict() if not k.startswith(prefix)}
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelWeightsError(
            f"model-weights={path!r} lacks {len(missing)} backbone tensors (e.g. {missing[:3]}); "
            f"pass a checkpoint of the same architecture as the run-config model."
        )
