"""AutoPatcher on tiny random mlx-lm models: same logits, trains, saves, loads, generates."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mhc_mlx.models import MHCTransformer, ModelArgs
from mhc_mlx.patch import AutoPatcher, PatchedBlock
from mhc_mlx.patch import architectures

from tiny_lm import TINY_CONFIG, build_tiny_lm

ARCHS = AutoPatcher.supported_architectures()


def rel(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def fresh_tokens(seed, shape=(2, 13)):
    return mx.array(np.random.default_rng(seed).integers(0, TINY_CONFIG["vocab_size"], shape))


def test_llama_and_a_second_family_are_supported():
    assert "llama" in ARCHS and {"qwen2", "gemma2"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["mhc", "hc"])
def test_patched_logits_equal_the_original(arch, variant):
    model = build_tiny_lm(arch, seed=1)
    tokens = fresh_tokens(100 + len(arch))
    before = model(tokens)
    returned = AutoPatcher.patch(model, n_streams=4, variant=variant, verify=False)
    assert returned is model
    assert all(isinstance(layer, PatchedBlock) for layer in model.layers)
    assert rel(model(tokens), before) <= 1e-4


@pytest.mark.parametrize("dynamic, per_site", [(True, {"phi", "alpha", "bias"}), (False, {"bias"})])
def test_patch_adds_two_sites_per_block_and_keeps_weight_names(dynamic, per_site):
    model = build_tiny_lm("llama")
    names = set(dict(tree_flatten(model.parameters())))
    AutoPatcher.patch(model, n_streams=3, dynamic=dynamic)
    after = set(dict(tree_flatten(model.parameters())))
    assert names <= after  # the original weights keep their keys
    added = after - names
    layers = TINY_CONFIG["num_hidden_layers"]
    assert added == {
        f"model.layers.{i}.{site}.{p}" for i in range(layers) for site in ("attention_site", "mlp_site") for p in per_site
    }
    assert AutoPatcher.patch_config(model).n_streams == 3


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_patched_model_trains_its_sites_and_loss_falls(arch):
    model = AutoPatcher.patch(build_tiny_lm(arch, seed=2))
    sites = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "_site." in k}
    tokens = fresh_tokens(7, (4, 17))
    loss_fn = lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean")
    step = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=1e-2)
    losses = []
    for _ in range(5):
        loss, grads = step(model, tokens[:, :-1], tokens[:, 1:])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    now = dict(tree_flatten(model.parameters()))
    unchanged = [k for k, v in sites.items() if np.array_equal(np.array(now[k]), v)]
    assert not unchanged


def test_bfloat16_model_patches_within_rounding():
    model = build_tiny_lm("qwen2", seed=3)
    model.set_dtype(mx.bfloat16)
    tokens = fresh_tokens(9)
    before = model(tokens)
    AutoPatcher.patch(model)  # verify=True runs its own check and would raise
    assert model(tokens).dtype == mx.bfloat16
    assert rel(model(tokens), before) < 5e-2


def test_verify_catches_a_wrong_layout_and_leaves_the_model_unpatched(monkeypatch):
    model = build_tiny_lm("llama", seed=4)
    model.layers[0].post_attention_layernorm.weight = mx.full((TINY_CONFIG["hidden_size"],), 3.0)
    tokens = fresh_tokens(3)
    before = model(tokens)
    wrong = architectures.BlockLayout(mlp_norm="input_layernorm")  # not what llama computes
    monkeypatch.setitem(architectures.LAYOUTS, "llama", wrong)
    with pytest.raises(RuntimeError, match="changed the logits"):
        AutoPatcher.patch(model)
    assert not AutoPatcher.is_patched(model)
    assert mx.array_equal(model(tokens), before)


def test_save_load_roundtrip_records_the_patch(tmp_path):
    model = AutoPatcher.patch(build_tiny_lm("llama", seed=5), n_streams=2, dynamic=False, variant="hc")
    # give the sites non-initial values so a load that re-initialises them would show
    for layer in model.layers:
        layer.mlp_site.bias = layer.mlp_site.bias + 0.3
    tokens = fresh_tokens(11)
    expected = model(tokens)
    AutoPatcher.save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["mhc_patch"]["n_streams"] == 2 and config["mhc_patch"]["variant"] == "hc"
    assert config["mhc_patch"]["dynamic"] is False and config["model_type"] == "llama"
    loaded, tokenizer = AutoPatcher.load(tmp_path / "m")
    assert tokenizer is None
    assert AutoPatcher.patch_config(loaded).variant == "hc"
    assert mx.array_equal(loaded(tokens), expected)


def test_save_refuses_to_overwrite(tmp_path):
    model = AutoPatcher.patch(build_tiny_lm("llama"))
    AutoPatcher.save(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    other = AutoPatcher.patch(build_tiny_lm("llama", seed=9))
    with pytest.raises(FileExistsError, match="already holds a model"):
        AutoPatcher.save(other, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    AutoPatcher.save(other, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != before


def greedy(model, tokenizer, prompt, n=12):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    return generate(model, tokenizer, prompt, max_tokens=n, sampler=make_sampler(temp=0.0), verbose=False)


@pytest.mark.parametrize("quantize", [False, True])
def test_mlx_lm_generate_and_load_work_on_patched_models(tmp_path, char_tokenizer, quantize):
    import mlx_lm

    plain = build_tiny_lm("llama", seed=6)
    patched = build_tiny_lm("llama", seed=6)
    if quantize:
        nn.quantize(plain, group_size=32, bits=4)
        nn.quantize(patched, group_size=32, bits=4)
    AutoPatcher.patch(patched)
    if not quantize:
        # quantize after patching too: the sites have no Linear layers and stay float32
        nn.quantize(plain, group_size=32, bits=8)
        nn.quantize(patched, group_size=32, bits=8)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in patched.named_modules())
    prompt = "the quick brown fox"
    expected = greedy(plain, char_tokenizer, prompt)
    assert len(expected) > 0
    assert greedy(patched, char_tokenizer, prompt) == expected

    AutoPatcher.save(patched, tmp_path / "q", tokenizer=char_tokenizer)
    loaded, tokenizer = AutoPatcher.load(tmp_path / "q")
    assert greedy(loaded, tokenizer, prompt) == expected
    # mlx-lm's own loader rebuilds it through the model_file the save wrote
    via_mlx_lm, tokenizer = mlx_lm.load(str(tmp_path / "q"), trust_remote_code=True)
    assert AutoPatcher.is_patched(via_mlx_lm)
    assert greedy(via_mlx_lm, tokenizer, prompt) == expected


def test_unknown_architectures_and_double_patching_are_refused():
    ours = MHCTransformer(ModelArgs(residual="baseline", hidden_size=16, num_hidden_layers=2, intermediate_size=16))
    with pytest.raises(ValueError, match="does not know"):
        AutoPatcher.patch(ours)
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        AutoPatcher.patch(nn.Linear(4, 4))
    model = AutoPatcher.patch(build_tiny_lm("llama"))
    with pytest.raises(ValueError, match="already patched"):
        AutoPatcher.patch(model)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(variant="baseline"), ValueError, "variant"),
        (dict(variant="nope"), ValueError, "unknown residual mode"),
        (dict(n_streams=0), ValueError, "n_streams"),
        (dict(n_streams=2.0), TypeError, "n_streams"),
        (dict(init="zeros"), ValueError, "unknown init"),
    ],
)
def test_bad_patch_settings_are_named(kw, error, match):
    model = build_tiny_lm("llama")
    with pytest.raises(error, match=match):
        AutoPatcher.patch(model, **kw)
    assert not AutoPatcher.is_patched(model)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AutoPatcher.load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not an mHC-patched model"):
        AutoPatcher.load(tmp_path / "plain")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AutoPatcher.load(tmp_path / "bad")
