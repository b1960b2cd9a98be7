"""How the emulated kernel tests compare an MLX result with its reference, and the set-ups
they share (test_kernels_emulated.py and test_kernels_emulated_shapes.py)."""

import mlx.core as mx
import numpy as np


def np64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def rel(got, want, floor: float = 0.0):
    """||got - want|| / ||want||, or / `floor` when that is larger: for sums whose terms can
    cancel, float32 rounding is relative to the terms (pass a tenth of their norm), not to
    the sum, which a few drawn elements can make arbitrarily small."""
    got, want = np64(got) if isinstance(got, mx.array) else got, np64(want) if isinstance(want, mx.array) else want
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "non-finite output (an element left unwritten?)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor, 1e-30))


def largest(grads):
    return max(float(np.linalg.norm(np64(g))) for g in grads)


def grad_rel(got, want, scale=0.0):
    # relative to the gradient's norm, or to `scale` (1 % of the call's largest gradient, as
    # scripts/gpu_check.py measures) when that is larger: a gradient that is small by
    # cancellation (a sum of ~100 products of random sign) or ~0 by symmetry has no
    # meaningful relative error of its own
    got, want = np64(got), np64(want)
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), scale, 1e-12))


def grad_errors(got, want):
    """Each gradient's grad_rel against 1 % of the largest, as gpu_check.py."""
    scale = 0.01 * largest(want)
    return [grad_rel(g, w, scale) for g, w in zip(got, want)]


def as_cuda(monkeypatch):
    """The dispatcher and kernels see a CUDA GPU (the emulator runs the CUDA source)."""
    from mhc_mlx import kernels
    from mhc_mlx.kernels import build

    monkeypatch.setattr(build, "gpu_backend", lambda: "cuda")
    monkeypatch.setattr(build, "on_gpu", lambda *a: True)
    monkeypatch.setattr(kernels, "gpu_backend", build.gpu_backend)
    monkeypatch.setattr(kernels, "on_gpu", build.on_gpu)


def random_dynamic_site(C: int, n: int):
    """(HyperConnection, parameter names, parameters): a dynamic site with drawn phi, alpha, bias
    (phi scaled so the logits are of order 1)."""
    import mhc_mlx as mhc

    hc = mhc.HyperConnection(C, n, init="paper")
    W = n * (n + 2)
    hc.phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
    hc.alpha, hc.bias = mx.random.uniform(0.2, 1.5, (3,)), mx.random.normal((W,))
    names = ["phi", "alpha", "bias"]
    return hc, names, [getattr(hc, k) for k in names]


def one_pass_inputs(T: int, n: int, C: int, dtype, iters: int = 20) -> dict:
    """kernels/one_pass_vjp.py's arguments for a dynamic site x [T, n, C]: the coefficients' forward
    (its kernels), drawn cotangents dh, g, dH_post, and the res logits' Sinkhorn Jacobian (its
    kernel). The launches go through the kernel modules' `launch` (the emulator's where patched)."""
    from mhc_mlx.kernels import coefficients

    W = n * (n + 2)
    x = mx.random.normal((T, n, C)).astype(dtype)
    phi = mx.random.normal((n * C, W)) / np.sqrt(n * C)
    alpha, bias = mx.random.uniform(0.2, 1.5, (3,)), mx.random.normal((W,))
    H_pre, H_post, H_res, m, invr = coefficients.dynamic_coefficients_forward(x, phi, alpha, bias, n, iters, 1e-6)
    jac = coefficients.sinkhorn_jacobian(m, alpha, bias, n, iters)
    return dict(x=x, dh=mx.random.normal((T, C)).astype(dtype), g=mx.random.normal((T, n, C)).astype(dtype),
                H_pre=H_pre, H_res=H_res, jac=jac, m=m, invr=invr, alpha=alpha, bias=bias, H_post=H_post,
                dH_post=mx.random.normal((T, n)), phi=phi)


def one_pass_composed(a: dict, n: int, C: int, iters: int = 20):
    """(dx, gs, c2, g_bias, g_alpha) as the kernels compute them today: pre's deferred backward
    (site.PRE_VJP_RES), the glue (coefficients._glue_kernel), then DX's dx = share + gs phi^T - x c2
    in float32 MLX ops."""
    from mhc_mlx.kernels import coefficients, site

    share, dH_pre, dH_res = site.pre_vjp_res(a["x"], a["H_pre"], a["H_res"], a["dh"], a["g"])
    gs, c2, g_bias, g_alpha, _ = coefficients._glue_kernel(a["m"], a["invr"], a["alpha"], a["bias"], a["H_pre"],
                                                           a["H_post"], [dH_pre, a["dH_post"], dH_res], n, n * C,
                                                           iters)
    T = a["x"].shape[0]
    x2 = a["x"].reshape(T, n * C).astype(mx.float32)
    dx = share.reshape(T, n * C).astype(mx.float32) + gs @ a["phi"].T - x2 * c2[:, None]
    return dx.reshape(T, n, C), gs, c2, g_bias, g_alpha


SITE_USES = ("site", "pre and post", "pre only", "post with other x", "post twice", "res too")


def site_use(hc, names, use: str, w):
    """A function of (x, *parameters named `names`) that uses HyperConnection hc as `use` says
    (SITE_USES): the site call, pre then post on the same x, pre's output alone, post on another
    array than pre's x, post twice on pre's x, or the caller also using H_res; the sublayer
    scales h by w [C]. The chained forms' tests run every use through the kernels and the
    reference."""

    def sub(h):
        return (h.astype(mx.float32) * w).astype(h.dtype)

    def site_fn(x_, *ps):
        hc.update(dict(zip(names, ps)))
        if use == "site":
            return hc(x_, sub)
        h, coeffs = hc.pre(x_)
        if use == "pre only":
            return mx.broadcast_to(h[..., None, :], x_.shape) * 2
        other = x_ * 1 if use == "post with other x" else x_
        out = hc.post(other, sub(h), coeffs)
        if use == "post twice":
            out = out + 0.5 * hc.post(other, sub(h) * 0.5, coeffs)
        if use == "res too":
            out = out + mx.sum(coeffs.res * coeffs.res, axis=(-1, -2))[..., None, None].astype(out.dtype)
        return out

    return site_fn


def assert_site_matches_reference(site_fn, x, params, names, cot, out, got, out_tol: float, grad_tol: float):
    """The kernels' (out, gradients) of site_fn against the reference backend's float32 autodiff:
    the output relative to a tenth of x's norm, each gradient to 5 % of the largest."""
    from mhc_mlx import dispatch

    with dispatch.use_backend("reference"):
        want_out, want = mx.vjp(site_fn, [x.astype(mx.float32), *params], [cot.astype(mx.float32)])
    assert rel(out[0], want_out[0], floor=0.1 * float(np.linalg.norm(np64(x)))) <= out_tol
    top = largest(want)
    for name, a, b in zip(["x", *names], got, want):
        assert grad_rel(a, b, 0.05 * top) <= grad_tol, name
