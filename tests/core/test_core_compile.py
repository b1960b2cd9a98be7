"""Everything works under mx.compile, and the compiled result equals the eager one.

Compilation may fuse elementwise ops and so change float32 rounding slightly: the bound is
1e-6 relative (norm-wise), ten times tighter than the reference tolerance.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_mhc
import numpy as np
import pytest
from core_testlib import as_mx, assert_matches, draw, site_params, to_numpy
from mlx.utils import tree_flatten

import mhc_mlx as mhc

TOL = 1e-6


def same(compiled_out, eager_out, what):
    if isinstance(eager_out, (tuple, list)):
        assert len(compiled_out) == len(eager_out), what
        for k, (c, e) in enumerate(zip(compiled_out, eager_out)):
            same(c, e, f"{what}[{k}]")
        return
    assert compiled_out.dtype == eager_out.dtype, f"{what}: dtype {compiled_out.dtype} vs eager {eager_out.dtype}"
    assert_matches(compiled_out, to_numpy(eager_out), TOL, f"{what}: compiled vs eager")


@pytest.mark.parametrize("path,dtype", [("reference", mx.float32), ("compiled", mx.float32), ("compiled", mx.bfloat16)],
                         ids=["reference-float32", "compiled-float32", "compiled-bfloat16"])
def test_functions_under_compile(path, dtype, rng):
    with mhc.use_backend(path):
        check_functions_under_compile(dtype, rng)


def check_functions_under_compile(dtype, rng):
    n, C = 3, 7
    x, _ = draw(rng, (2, 4, n, C), dtype)
    f, _ = draw(rng, (2, 4, C), dtype)
    L, _ = draw(rng, (2, n, n), dtype)
    (phi, _), (alpha, _), (bias, _) = site_params(rng, n, C)
    H_pre = as_mx(rng.uniform(0, 1, (2, 4, n)))
    H_post = as_mx(rng.uniform(0, 2, (2, 4, n)))
    H_res = mhc.sinkhorn_knopp(as_mx(rng.standard_normal((2, 4, n, n))))
    calls = {
        "sinkhorn_knopp": (lambda L: mhc.sinkhorn_knopp(L, iters=9), (L,)),
        "coefficients dynamic": (lambda x, p, a, b: mhc.mhc_coefficients(x, p, a, b), (x, phi, alpha, bias)),
        "coefficients static": (lambda x, b: mhc.mhc_coefficients(x, None, None, b), (x, bias)),
        "mhc_pre": (mhc.mhc_pre, (x, H_pre)),
        "mhc_post": (mhc.mhc_post, (x, f, H_post, H_res)),
        "expand_streams": (lambda f: mhc.expand_streams(f, n), (f,)),
        "reduce_streams": (mhc.reduce_streams, (x,)),
        "rms_norm": (lambda f, w: mhc.rms_norm(f, w), (f, as_mx(rng.standard_normal(C)))),
        "mlx_mhc.sinkhorn_knopp log": (lambda L: mlx_mhc.sinkhorn_knopp(L), (L,)),
        "mlx_mhc.sinkhorn_knopp direct": (lambda L: mlx_mhc.sinkhorn_knopp(L, log_space=False), (L,)),
    }
    for name, (fn, args) in calls.items():
        same(mx.compile(fn)(*args), fn(*args), name)


def modules(rng, C, n):
    rewire_block = nn.Sequential(nn.Linear(C, C), nn.GELU())
    return {
        "HyperConnection dynamic": (mhc.HyperConnection(C, n=n), "streams"),
        "HyperConnection static": (mhc.HyperConnection(C, n=n, dynamic=False), "streams"),
        "HyperConnection hc": (mhc.HyperConnection(C, n=n, variant="hc"), "streams"),
        "MHCLayer": (mhc.MHCLayer(n, C), "layer"),
        "MHCRewire hidden": (mhc.MHCRewire(rewire_block, dims=C, n=n), "hidden"),
        "MHCRewire streams": (mhc.MHCRewire(nn.Linear(C, C), dims=C, n=n, stream_state=True), "layer"),
        "ManifoldHyperConnection hidden": (mlx_mhc.ManifoldHyperConnection(C, expansion=n), "mhc-hidden"),
        "ManifoldHyperConnection streams": (mlx_mhc.ManifoldHyperConnection(C, expansion=n), "mhc-streams"),
    }


def test_modules_under_compile(backend, rng):
    n, C = 4, 12
    sub = nn.Linear(C, C)
    x, _ = draw(rng, (3, n, C))
    h, _ = draw(rng, (3, C))
    for name, (module, kind) in modules(rng, C, n).items():
        # Random parameters, so the compiled graph is not the trivial init one.
        module.update(nn.utils.tree_map(lambda p: p + 0.3 * mx.random.normal(p.shape), module.trainable_parameters()))
        call = {
            "streams": lambda x: module(x, sub),
            "layer": lambda x: module(x),
            "hidden": lambda x: module(h),
            "mhc-hidden": lambda x: module(h, sub(h)),
            "mhc-streams": lambda x: module(x, sub(h)),
        }[kind]
        eager = call(x)
        compiled = mx.compile(call, inputs=[module.state, sub.state])(x)
        same(compiled, eager, name)


def test_compiled_training_step_equals_eager(rng):
    """The usual mlx-lm training step, compiled with the model and optimizer state as inputs
    and outputs, takes the same step as the eager one (default path only: compiling a whole
    training step costs ~20 s of C++ builds per path on a cold 2-core CPU)."""
    n, C = 4, 16

    def build():
        mx.random.seed(1234)
        return nn.Sequential(nn.Linear(C, C), nn.Tanh()), mhc.HyperConnection(C, n=n)

    x, _ = draw(rng, (8, C))
    target, _ = draw(rng, (8, C))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.sub, self.site = build()

        def __call__(self, h):
            return mhc.reduce_streams(self.site(mhc.expand_streams(h, n), self.sub))

    results = []
    for compiled in (False, True):
        model, opt = Net(), optim.SGD(learning_rate=0.5)
        loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.mse_loss(m(x), y))

        def step(x, y):
            loss, grads = loss_and_grad(model, x, y)
            opt.update(model, grads)
            return loss

        if compiled:
            step = partial(mx.compile, inputs=[model.state, opt.state], outputs=[model.state, opt.state])(step)
        losses = [step(x, target) for _ in range(3)]
        mx.eval(model.parameters(), losses)
        results.append((np.array([loss.item() for loss in losses]), dict(tree_flatten(model.parameters()))))
    (eager_losses, eager_params), (comp_losses, comp_params) = results
    np.testing.assert_allclose(comp_losses, eager_losses, rtol=1e-5)
    assert eager_losses[-1] < eager_losses[0], "three SGD steps should lower the loss"
    for name, p in eager_params.items():
        assert_matches(comp_params[name], to_numpy(p), 1e-5, f"parameter {name} after 3 compiled steps")


def _primitives(*arrays) -> list[str]:
    """The primitives of the arrays' unevaluated graph (MLX's DOT export)."""
    import os
    import re
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "graph.dot")
        mx.export_to_dot(path, *arrays)
        with open(path) as f:
            return re.findall(r'label ="(\w+)"', f.read())


def test_an_inner_compile_fuses_only_when_the_step_is_compiled():
    # What README and mhc-mlx train rely on (MLX 0.32.4): under mx.grad a compiled function's
    # arrays are tracers and mx.compile runs its ops unfused, also inside a custom function's
    # backward; compiling the whole step fuses them. If MLX changes this, the advice changes.
    inner = mx.compile(lambda v: mx.exp(v) * 2 + 1)

    @mx.custom_function
    def f(v):
        return v * 3

    @f.vjp
    def f_vjp(primal, cotangent, output):
        return inner(cotangent)

    x = mx.ones((8,))
    mx.eval(x)
    assert any(p.startswith("Compiled") for p in _primitives(inner(x)))  # eager: fused
    loss = lambda v: (inner(v) + f(v)).sum()  # noqa: E731
    eager = _primitives(mx.grad(loss)(x))
    assert not any(p.startswith("Compiled") for p in eager) and "Exp" in eager
    assert any(p.startswith("Compiled") for p in _primitives(mx.compile(mx.grad(loss))(x)))
