"""Save and load patched mlx-lm models: mlx-lm's own safetensors layout plus `mhc_patch`.

A saved directory is an mlx-lm model directory (model.safetensors, its index, config.json,
tokenizer files if given) whose config.json also records the patch (`mhc_patch`) and names
a small `model_file` so `mlx_lm.load(path, trust_remote_code=True)` rebuilds it too.
`load` here needs no remote-code flag: it reads the patch record and rebuilds the model
itself, never executing a file from the directory.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Optional

import mlx.nn as nn

from .patcher import AutoPatcher, PatchConfig

PATCH_KEY = "mhc_patch"
MODEL_FILE = "mhc_patched_model.py"

_SHIM = '''"""Written by mhc-mlx: lets mlx_lm.load(path, trust_remote_code=True) rebuild this model.

It is the mlx-lm architecture {arch!r} with its residual connections patched into mHC sites
(AutoPatcher, settings below); the weights in this directory include the sites' parameters.
"""
from mhc_mlx.patch.io import patched_model_classes

Model, ModelArgs = patched_model_classes({arch!r}, {patch!r})
'''


def _lm_utils():
    try:
        from mlx_lm import utils
    except ImportError as e:  # pragma: no cover - mlx-lm is a declared extra
        raise ImportError("saving and loading patched models needs mlx-lm: pip install 'mhc-mlx[lm]'") from e
    return utils


def _architecture_module(config: dict):
    """mlx-lm's module for config['model_type'] (following mlx-lm's own remapping)."""
    model_class, _ = _lm_utils()._get_classes(config)
    return importlib.import_module(model_class.__module__)


def patched_model_classes(model_type: str, patch: dict):
    """(Model, ModelArgs) for mlx-lm: Model(args) builds the architecture and patches it."""
    arch = _architecture_module({"model_type": model_type})
    settings = PatchConfig.from_dict(patch)

    def build(args) -> nn.Module:
        model = arch.Model(args)
        return AutoPatcher.patch(model, **dataclasses.asdict(settings), verify=False)

    return build, arch.ModelArgs


def _quantization(model: nn.Module) -> Optional[dict]:
    """group_size/bits/mode of the model's quantized layers (mlx-lm infers per-layer bits)."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"group_size": module.group_size, "bits": module.bits, "mode": getattr(module, "mode", "affine")}
    return None


def _config_of(model: nn.Module) -> dict:
    args = getattr(model, "args", None)
    if args is None or not dataclasses.is_dataclass(args):
        raise ValueError("pass config= (the dict mlx_lm.load(..., return_config=True) gives): the model has no args dataclass")
    # None means "the architecture's default"; Hugging Face config classes reject it.
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


def save(
    model: nn.Module,
    path,
    config: Optional[dict] = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a patched model to directory `path`; refuses to replace an existing model there."""
    settings = AutoPatcher.patch_config(model)
    utils = _lm_utils()
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if path.is_dir() and not overwrite and (any(path.glob("*.safetensors")) or (path / "config.json").exists()):
        raise FileExistsError(f"{path} already holds a model; pass overwrite=True to replace it")
    cfg = dict(config) if config is not None else _config_of(model)
    quantization = _quantization(model)
    if quantization is not None:
        cfg["quantization"] = quantization
    else:
        cfg.pop("quantization", None)
        cfg.pop("quantization_config", None)
    arch = _architecture_module(cfg).__name__.rsplit(".", 1)[-1]
    cfg[PATCH_KEY] = settings.to_dict()
    cfg["model_file"] = MODEL_FILE
    path.mkdir(parents=True, exist_ok=True)
    utils.save_model(path, model)
    utils.save_config(cfg, path / "config.json")
    patch = {k: v for k, v in settings.to_dict().items() if k != "mhc_mlx_version"}
    (path / MODEL_FILE).write_text(_SHIM.format(arch=arch, patch=patch))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load(path, return_config: bool = False):
    """(model, tokenizer) from a directory written by `save`; tokenizer is None if none was saved."""
    utils = _lm_utils()
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    if PATCH_KEY not in config:
        raise ValueError(f"{path} is not an mHC-patched model (config.json has no {PATCH_KEY!r}); use mlx_lm.load")
    patch = PatchConfig.from_dict(config[PATCH_KEY])
    model_type = config.get("model_type")

    def classes(config):
        return patched_model_classes(model_type, dataclasses.asdict(patch))

    model, config = utils.load_model(path, model_config={"model_file": None}, get_model_classes=classes)
    config.pop("model_file", None)
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        tokenizer = utils.load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return (model, tokenizer, config) if return_config else (model, tokenizer)
