"""Build what a run trains: the task (data) and one model per residual mode.

`--model` is one of
  - "mhc_transformer" (default): mhc_mlx.models.MHCTransformer with the run's sizes;
  - an mlx-lm architecture name (llama, qwen2, gemma2, ...): a small random model of it;
  - a directory holding an mlx-lm model (config.json + safetensors): that model.
For hc and mhc the mlx-lm models are patched with AutoPatcher. Every mode starts from the
same weights (the sites are added on top), so the runs differ only in their residuals.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models import MHCTransformer, ModelArgs
from .config import BUILTIN_MODEL, TrainConfig
from .data import ByteTokenizer, SyntheticLanguage, TextFile


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.startswith(".") or Path(name).exists()


def _lm_utils():
    try:
        from mlx_lm import utils
    except ImportError as e:
        raise ValueError("--model with an mlx-lm architecture needs mlx-lm: pip install 'mhc-mlx[lm]'") from e
    return utils


def model_kind(config: TrainConfig) -> str:
    """'builtin', 'architecture' or 'directory' (raising for anything else)."""
    if config.model == BUILTIN_MODEL:
        return "builtin"
    if _looks_like_path(config.model):
        path = Path(config.model)
        if not path.exists():
            raise FileNotFoundError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not an mlx-lm model directory (no config.json)")
        return "directory"
    if importlib.util.find_spec("mlx_lm") is None:
        raise ValueError(
            f"--model {config.model!r} needs mlx-lm (pip install 'mhc-mlx[lm]'); "
            f"without it the model is {BUILTIN_MODEL!r}"
        )
    try:
        importlib.import_module(f"mlx_lm.models.{config.model}")
    except ImportError:
        raise ValueError(
            f"unknown model type {config.model!r}: use {BUILTIN_MODEL!r}, an mlx-lm architecture "
            "(a module of mlx_lm.models, e.g. llama, qwen2, gemma2) or an mlx-lm model directory"
        ) from None
    return "architecture"


def build_task(config: TrainConfig, tokenizer=None, vocab_size: int | None = None):
    if config.data is None:
        return SyntheticLanguage(seed=config.seed)
    task = TextFile(config.data, tokenizer or ByteTokenizer(), seed=config.seed, vocab_size=vocab_size)
    task.check_fits(config.batch_size, config.seq_len)
    return task


def _architecture_config(config: TrainConfig, vocab_size: int) -> dict:
    head_dim = config.hidden_size // config.heads
    return dict(
        model_type=config.model,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.layers,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        max_position_embeddings=max(2048, config.seq_len + 1),
        tie_word_embeddings=True,
    )


class Setup:
    """The task, the tokenizer (for text data) and a model factory for one run."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.kind = model_kind(config)
        tokenizer, vocab = None, None
        if self.kind == "directory":
            utils = _lm_utils()
            path = Path(config.model)
            self._lm_config = utils.load_config(path)
            vocab = self._lm_config.get("vocab_size")
            if config.data is not None:
                tokenizer = utils.load_tokenizer(path)
        self.task = build_task(config, tokenizer, vocab)
        self.vocab_size = vocab or self.task.vocab_size

    def _base(self) -> nn.Module:
        cfg = self.config
        mx.random.seed(cfg.seed)
        if self.kind == "builtin":
            return MHCTransformer(self._builtin_args("baseline"))
        utils = _lm_utils()
        if self.kind == "directory":
            model, _ = utils.load_model(Path(cfg.model))
            return model
        arch = importlib.import_module(f"mlx_lm.models.{cfg.model}")
        try:
            args = arch.ModelArgs.from_dict(_architecture_config(cfg, self.vocab_size))
            return arch.Model(args)
        except (TypeError, KeyError, AssertionError) as e:
            raise ValueError(f"cannot build a small random {cfg.model} model from the run's sizes: {e!r}") from None

    def _builtin_args(self, mode: str) -> ModelArgs:
        cfg = self.config
        return ModelArgs(
            vocab_size=self.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate_size, residual=mode,
            n_streams=cfg.n_streams, dynamic=cfg.dynamic, sinkhorn_iters=cfg.sinkhorn_iters,
        )

    def build(self, mode: str) -> nn.Module:
        """A fresh model for `mode` with the run's shared initial weights (deterministic)."""
        cfg = self.config
        base = self._base()
        if mode == "baseline":
            model = base
        elif self.kind == "builtin":
            mx.random.seed(cfg.seed + 1)  # the sites' own random init
            model = MHCTransformer(self._builtin_args(mode))
            model.load_weights(list(tree_flatten(base.parameters())), strict=False)
        else:
            from ..patch import AutoPatcher

            mx.random.seed(cfg.seed + 1)
            model = AutoPatcher.patch(
                base, n_streams=cfg.n_streams, dynamic=cfg.dynamic, sinkhorn_iters=cfg.sinkhorn_iters, variant=mode,
            )
        mx.eval(model.parameters())
        model.train()
        return model
