"""AutoPatcher: turn an mlx-lm model's residual connections into mHC sites, in place."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn

from .. import _checks
from .._version import __version__
from ..models.residual import check_mode
from ..modules.init import check_init
from .architectures import layout_for, supported_architectures
from .block import PatchedBlock

# The largest relative logit change `verify` accepts: float32 keeps the patched model
# within 1e-4; half-precision activations round each site's mix to ~3 significant digits.
VERIFY_RTOL = {mx.float32: 1e-4, mx.bfloat16: 5e-2, mx.float16: 2e-2}


@dataclass(frozen=True)
class PatchConfig:
    """What `patch` did; saved as `mhc_patch` in config.json so a load can redo it."""

    n_streams: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    variant: str = "mhc"  # "mhc" or "hc"
    init: str = "identity"

    def __post_init__(self):
        _checks.check_positive_int(self.n_streams, "n_streams")
        _checks.check_positive_int(self.sinkhorn_iters, "sinkhorn_iters")
        if not isinstance(self.dynamic, bool):
            raise TypeError(f"dynamic must be a bool, got {self.dynamic!r}")
        if check_mode(self.variant) == "baseline":
            raise ValueError("variant must be 'mhc' or 'hc' (an unpatched model is the baseline)")
        check_init(self.init)

    def to_dict(self) -> dict:
        return {**asdict(self), "mhc_mlx_version": __version__}

    @classmethod
    def from_dict(cls, d: dict) -> "PatchConfig":
        if not isinstance(d, dict):
            raise ValueError(f"mhc_patch must be a JSON object, got {d!r}")
        fields = ("n_streams", "dynamic", "sinkhorn_iters", "variant", "init")
        return cls(**{k: d[k] for k in fields if k in d})


def _block_list(model: nn.Module) -> list:
    """The list object that holds the model's blocks (mutating it patches the model).

    `model.layers` may be a property returning a copy (qwen2 returns a pipeline slice), so
    the list is found where it is stored: the child list whose items are those blocks.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise ValueError(
            f"{type(model).__name__} has no list of transformer blocks at `.layers`; "
            "AutoPatcher takes an mlx-lm model (the object mlx_lm.load returns)"
        )
    if any(layer is None for layer in layers):
        raise ValueError("the model is split for pipeline parallelism (some layers are None); patch it before splitting")

    def search(node):
        if isinstance(node, list):
            if len(node) == len(layers) and all(a is b for a, b in zip(node, layers)):
                return node
            items = node
        elif isinstance(node, dict):
            items = node.values()
        else:
            return None
        for item in items:
            if isinstance(item, (list, dict)):
                found = search(item)
                if found is not None:
                    return found
        return None

    stored = search(model)
    if stored is None:
        raise ValueError(f"cannot find where {type(model).__name__} stores its blocks (`.layers` is a view of a subset)")
    return stored


def _hidden_size(block: nn.Module, index: int) -> int:
    for owner in (block, getattr(block, "args", None)):
        dims = getattr(owner, "hidden_size", None)
        if isinstance(dims, int):
            return dims
    raise ValueError(f"cannot tell the hidden size of layer {index} (no hidden_size on it or its args)")


def _probe_logits(model: nn.Module) -> mx.array:
    logits = model(mx.array([[0, 1, 2, 3, 1, 0]]))
    mx.eval(logits)
    return logits


class AutoPatcher:
    """Upgrade an existing mlx-lm model to mHC without changing what it computes.

        model, tokenizer = mlx_lm.load("mlx-community/Llama-3.2-1B-Instruct-4bit")
        AutoPatcher.patch(model, n_streams=4)          # same logits, now with mHC sites
        # ... fine-tune; AutoPatcher.save(model, "out", config=config, tokenizer=tokenizer)

    Each block's two residual connections become sites (HyperConnection, one per attention
    and per MLP sublayer); the first block copies the hidden state into `n_streams` streams
    and the last averages them. With `init="identity"` the patched model's logits equal the
    original's; `verify=True` checks that on a few tokens and undoes the patch if not.
    """

    @staticmethod
    def supported_architectures() -> tuple[str, ...]:
        return supported_architectures()

    @staticmethod
    def is_patched(model: nn.Module) -> bool:
        layers = getattr(model, "layers", None)
        return isinstance(layers, list) and any(isinstance(layer, PatchedBlock) for layer in layers)

    @staticmethod
    def patch_config(model: nn.Module) -> PatchConfig:
        """The PatchConfig a patched model was made with."""
        if not AutoPatcher.is_patched(model):
            raise ValueError("this model is not patched by AutoPatcher")
        return model.layers[0].patch_config

    @staticmethod
    def save(model: nn.Module, path, config=None, tokenizer=None, overwrite: bool = False):
        """Write a patched model as an mlx-lm directory (see mhc_mlx.patch.io.save)."""
        from . import io

        return io.save(model, path, config=config, tokenizer=tokenizer, overwrite=overwrite)

    @staticmethod
    def load(path, return_config: bool = False):
        """(model, tokenizer) from a directory `save` wrote (see mhc_mlx.patch.io.load)."""
        from . import io

        return io.load(path, return_config=return_config)

    @staticmethod
    def patch(
        model: nn.Module,
        n_streams: int = 4,
        dynamic: bool = True,
        sinkhorn_iters: int = 20,
        variant: str = "mhc",
        init: str = "identity",
        verify: bool = True,
    ) -> nn.Module:
        """Patch `model` in place and return it.

        Args:
            n_streams: residual streams n (each a full-width copy of the hidden state).
            dynamic: per-token coefficients (paper); False: one learned set per site.
            sinkhorn_iters: Sinkhorn–Knopp iterations for H_res.
            variant: "mhc" (doubly stochastic H_res) or "hc" (unconstrained, for comparison).
            init: "identity" (function-preserving) or "paper".
            verify: with init="identity", run 6 tokens through the model before and after and
                raise (leaving the model unpatched) if the logits moved more than rounding.
        """
        config = PatchConfig(n_streams, dynamic, sinkhorn_iters, variant, init)
        if AutoPatcher.is_patched(model):
            raise ValueError("this model is already patched (AutoPatcher.patch was called on it before)")
        layers = _block_list(model)
        plans = [layout_for(block, i) for i, block in enumerate(layers)]
        dims = [_hidden_size(block, i) for i, block in enumerate(layers)]
        check = verify and init == "identity"
        before = _probe_logits(model) if check else None

        originals = list(layers)
        last = len(layers) - 1
        for i, (block, (arch, layout)) in enumerate(zip(originals, plans)):
            patched = PatchedBlock(
                block, layout, arch, dims[i], n_streams, dynamic, sinkhorn_iters, variant, init,
                expand_input=i == 0, reduce_output=i == last,
            )
            patched.patch_config = config
            layers[i] = patched
        mx.eval(model.parameters())

        if check:
            after = _probe_logits(model)
            scale = mx.abs(before.astype(mx.float32)).max().item() or 1.0
            change = mx.abs(after.astype(mx.float32) - before.astype(mx.float32)).max().item() / scale
            rtol = VERIFY_RTOL.get(before.dtype, 1e-4)
            if not change <= rtol:
                layers[:] = originals
                raise RuntimeError(
                    f"patching changed the logits by {change:.2e} (relative; allowed {rtol:.0e}): "
                    "the blocks do not compute the residual form AutoPatcher assumes; the model "
                    "was left unpatched"
                )
        return model
