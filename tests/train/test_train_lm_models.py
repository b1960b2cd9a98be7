"""`mhc-mlx train --model <mlx-lm architecture | model directory> --data <text file>`."""

import math
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from train_helpers import TINY, metrics, train, weights

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
# the tiny mlx-lm builders of the model tests (tests/models/tiny_lm.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_mlx_lm_architecture_on_a_text_file(tmp_path, arch):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert train(*TINY, "--model", arch, "--data", data, "--steps", 3, "--log-every", 1, "--no-plot", "--out", out) == 0
    m = metrics(out)
    assert m["task"]["name"] == "text" and m["task"]["vocab_size"] == 256
    for mode in ("baseline", "hc", "mhc"):
        assert all(math.isfinite(x) for x in m["modes"][mode]["loss"])
    assert m["modes"]["mhc"]["gains"][-1]["composite"]["forward_max"] == pytest.approx(1.0, abs=1e-5)
    # the patched runs carry their sites; the baseline is the plain mlx-lm model
    assert any("attention_site" in k for k in weights(out, "mhc"))
    assert not any("_site" in k for k in weights(out, "baseline"))


def test_a_local_mlx_lm_model_directory_with_its_tokenizer(tmp_path):
    from mlx_lm.utils import save_config, save_model
    from tiny_lm import TINY_CONFIG, build_char_tokenizer, build_tiny_lm

    model = build_tiny_lm("llama", seed=3)
    directory = tmp_path / "tiny-llama"
    save_model(directory, model)
    save_config({**TINY_CONFIG, "model_type": "llama"}, directory / "config.json")
    build_char_tokenizer().save_pretrained(str(directory))
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert train(*TINY, "--model", directory, "--data", data, "--modes", "baseline,mhc", "--steps", 3,
                 "--log-every", 1, "--no-plot", "--out", out) == 0
    m = metrics(out)
    assert m["task"]["vocab_size"] == TINY_CONFIG["vocab_size"]  # the directory's tokenizer
    first = {mode: h["loss"][0] for mode, h in m["modes"].items()}
    # the patched copy of the pretrained model starts exactly where the model was
    assert first["mhc"] == pytest.approx(first["baseline"], rel=1e-5)
    saved = weights(out, "mhc")
    original = dict(mx.load(str(directory / "model.safetensors")))
    assert set(original) < set(saved)
