"""Tiny randomly initialised mlx-lm models and a character tokenizer: no downloads."""

import importlib
import string

import mlx.core as mx

TINY_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=3,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    vocab_size=40,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    # gemma3_text alternates sliding and global attention; keep both in 3 layers
    sliding_window_pattern=2,
    sliding_window=4,
)


def build_tiny_lm(arch: str, seed: int = 0, **overrides):
    """A random mlx-lm model of architecture `arch` (mlx_lm.models.<arch>), float32."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    args = module.ModelArgs.from_dict({**TINY_CONFIG, **overrides, "model_type": arch})
    model = module.Model(args)
    mx.eval(model.parameters())
    return model


def build_char_tokenizer():
    """A character-level tokenizer (mlx-lm TokenizerWrapper) built offline with `tokenizers`."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + " .,!?"
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    assert len(vocab) <= TINY_CONFIG["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    return TokenizerWrapper(hf)
