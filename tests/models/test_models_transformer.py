"""The mHC transformer: wiring against a float64 reference, function-preserving init, modes."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mhc_mlx.models import MHCTransformer, ModelArgs, record_residual_matrices

SMALL = dict(vocab_size=48, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)


def build(residual, seed=0, **kw):
    mx.random.seed(seed)
    model = MHCTransformer(ModelArgs(residual=residual, **{**SMALL, **kw}))
    mx.eval(model.parameters())
    return model


def copy_shared_weights(src, dst):
    dst.load_weights(list(tree_flatten(src.parameters())), strict=False)
    mx.eval(dst.parameters())


def site64(x, phi, alpha, bias, iters, eps):
    """Float64 coefficients of one dynamic site (SPEC section 1), x [T, n, C]."""
    T, n, C = x.shape
    xf = x.reshape(T, n * C)
    r = np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + eps)
    scale = np.concatenate([np.full(n, alpha[0]), np.full(n, alpha[1]), np.full(n * n, alpha[2])])
    h = (xf @ phi) / r * scale + bias
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))
    L = h[:, 2 * n:].reshape(T, n, n)
    P = np.exp(L - L.max(axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        P = P / P.sum(axis=-2, keepdims=True)
        P = P / P.sum(axis=-1, keepdims=True)
    return sig(h[:, :n]), 2.0 * sig(h[:, n:2 * n]), P


def randomise_sites(model, rng):
    """Move every site far from its identity init so the test sees real mixing."""
    for layer in model.layers:
        for site in (layer.attention_site, layer.mlp_site):
            site.phi = mx.array(rng.normal(0, 0.1, site.phi.shape), dtype=mx.float32)
            site.alpha = mx.array(rng.uniform(0.2, 0.6, 3), dtype=mx.float32)
            site.bias = mx.array(rng.normal(0, 1.0, site.bias.shape), dtype=mx.float32)


def test_block_matches_float64_site_equations():
    rng = np.random.default_rng(11)
    model = build("mhc", seed=3)
    randomise_sites(model, rng)
    block = model.layers[1]
    B, L, n, C = 2, 5, 4, SMALL["hidden_size"]
    x = rng.normal(0, 1, (B, L, n, C))
    got = np.array(block(mx.array(x, dtype=mx.float32), "causal"), dtype=np.float64)

    def apply(site, x, sublayer):
        pre, post, res = site64(
            x.reshape(B * L, n, C), np.array(site.phi, np.float64), np.array(site.alpha, np.float64),
            np.array(site.bias, np.float64), site.sinkhorn_iters, site.eps,
        )
        h_in = np.einsum("ti,tic->tc", pre, x.reshape(B * L, n, C)).reshape(B, L, C)
        f = np.array(sublayer(mx.array(h_in, dtype=mx.float32)), np.float64).reshape(B * L, C)
        out = np.einsum("tij,tjc->tic", res, x.reshape(B * L, n, C)) + post[:, :, None] * f[:, None, :]
        return out.reshape(B, L, n, C)

    ref = apply(block.attention_site, x, lambda h: block.self_attn(block.input_layernorm(h), "causal"))
    ref = apply(block.mlp_site, ref, lambda h: block.mlp(block.post_attention_layernorm(h)))
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err


@pytest.mark.parametrize("residual", ["hc", "mhc"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_streams_at_init_compute_the_baseline(residual, dynamic):
    baseline = build("baseline", seed=1)
    model = build(residual, seed=2, dynamic=dynamic)
    copy_shared_weights(baseline, model)
    tokens = mx.array(np.random.default_rng(5).integers(0, SMALL["vocab_size"], (3, 17)))
    ref, got = baseline(tokens), model(tokens)
    assert (mx.abs(got - ref).max() / mx.abs(ref).max()).item() < 1e-4


def test_modes_have_the_expected_parameters():
    names = {mode: {k for k, _ in tree_flatten(build(mode).parameters())} for mode in ("baseline", "hc", "mhc")}
    assert not any("site" in k for k in names["baseline"])
    sites = {k for k in names["mhc"] if "site" in k}
    # one attention site and one MLP site per block, each with phi, alpha, bias
    assert len(sites) == SMALL["num_hidden_layers"] * 2 * 3
    assert names["hc"] == names["mhc"]
    assert names["mhc"] - sites == names["baseline"]
    static = {k for k, _ in tree_flatten(build("mhc", dynamic=False).parameters()) if "site" in k}
    assert static and all(k.endswith(".bias") for k in static)


def test_records_one_residual_matrix_per_site_in_order():
    model = build("mhc")
    tokens = mx.array([[1, 2, 3, 4]])
    with record_residual_matrices() as matrices:
        model(tokens)
    assert len(matrices) == 2 * SMALL["num_hidden_layers"]
    assert all(tuple(m.shape) == (1, 4, 4, 4) for m in matrices)
    # nothing is recorded outside the context
    model(tokens)
    assert len(matrices) == 2 * SMALL["num_hidden_layers"]


def test_training_changes_sites_and_lowers_loss():
    model = build("mhc", seed=4)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "site" in k}
    tokens = mx.array(np.random.default_rng(0).integers(0, SMALL["vocab_size"], (4, 17)))
    loss_fn = lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean")
    step = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=1e-2)
    losses = []
    for _ in range(6):
        loss, grads = step(model, tokens[:, :-1], tokens[:, 1:])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = dict(tree_flatten(model.parameters()))
    changed = [k for k, v in before.items() if np.abs(np.array(after[k]) - v).max() > 0]
    assert len(changed) == len(before), set(before) - set(changed)


def test_generate_step_with_kv_cache_matches_full_forward():
    from mlx_lm.generate import generate_step

    model = build("mhc", seed=6)
    randomise_sites(model, np.random.default_rng(2))
    prompt = mx.array([3, 7, 1, 9])
    tokens = [int(t) for t, _ in zip((tok for tok, _ in generate_step(prompt, model)), range(6))]
    # greedy decoding without a cache, recomputing the whole sequence each time
    seq = [3, 7, 1, 9]
    for _ in range(6):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    assert tokens == seq[4:]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(residual="mhc2"), "unknown residual mode"),
        (dict(hidden_size=30), "multiple of num_attention_heads"),
        (dict(n_streams=0), "n_streams"),
        (dict(site_init="zeros"), "unknown init"),
    ],
)
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**{**SMALL, **kw})


def test_bad_inputs_are_named():
    model = build("mhc")
    with pytest.raises(ValueError, match="integer token ids"):
        model(mx.zeros((2, 3)))
    with pytest.raises(ValueError, match="integer token ids"):
        model(mx.array([1, 2, 3]))


def test_from_dict_ignores_unknown_keys():
    args = ModelArgs.from_dict({**SMALL, "residual": "hc", "not_a_field": 1})
    assert args.residual == "hc" and args.hidden_size == SMALL["hidden_size"]
