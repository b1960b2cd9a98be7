"""The tensor-core coefficient kernel's data layout, checked on the CPU by a model of its lanes.

kernels/coefficients_mma.py is CUDA only. What can be checked here is its indexing: which x and packed-phi elements each lane loads, which A/B fragment
registers they become, and where each accumulator is written. The model below follows the
kernel body line by line and applies mma.sync m16n8k16 with the fragment layouts of the PTX
ISA (A row-major: a0a1 row g cols 2c..2c+1, a2a3 row g+8, a4a5 row g cols 2c+8.., a6a7 row
g+8; B col-major: b0b1 rows 2c..2c+1 col g, b2b3 rows 2c+8..; D: d0d1 row g cols 2c..2c+1,
d2d3 row g+8). If the kernel's permutation of k, the phi packing or the output placement
were wrong, the model's result would not be x @ phi.
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mhc_mlx.kernels import coefficients_mma as cm


def _lane_model(x, packed, K, W, MT, splits, ks, ku):
    """part [splits, T, 8 NT] and ssq [splits, T] as the kernel computes them (ku: X_UNROLL)."""
    T = x.shape[0]
    P, NT = packed.shape[0], packed.shape[2]
    tiles = -(-T // (16 * MT))
    part = np.full((splits, T, 8 * NT), np.nan)
    ssq = np.full((splits, T), np.nan)
    for gw in range(tiles * splits):
        split, tile = gw // tiles, gw % tiles
        k0, k1, t0 = split * ks, min(K, split * ks + ks), tile * 16 * MT
        acc = np.zeros((MT, NT, 32, 4))
        sq = np.zeros((MT, 2, 32))
        for kb in (kb0 + 32 * u for kb0 in range(k0, k1, 32 * ku) for u in range(ku)):
            u = (kb - k0) // 32 % ku
            # per lane: 8 x values of rows g and g+8 of each tile ("words" = pairs)
            xa = np.zeros((MT, 2, 32, 8))
            for lane in range(32):
                g, c = lane >> 2, lane & 3
                kx = kb - 32 * u + 8 * ku * c + 8 * u
                for m in range(MT):
                    for h in range(2):
                        t = t0 + 16 * m + g + 8 * h
                        if t < T:
                            for e in range(8):
                                if kx + e < K:
                                    xa[m, h, lane, e] = x[t, kx + e]
                        sq[m, h, lane] += np.sum(xa[m, h, lane] ** 2)
            for j in range(NT):
                for p in range(P):
                    b = packed[p, kb // 32, j]  # [32 lanes, 8]
                    for m in range(MT):
                        for s in range(2):
                            A = np.zeros((16, 16))
                            B = np.zeros((16, 8))
                            for lane in range(32):
                                g, c = lane >> 2, lane & 3
                                w = lambda h, q: xa[m, h, lane, 2 * q: 2 * q + 2]  # noqa: E731
                                A[g, 2 * c: 2 * c + 2] = w(0, 2 * s)
                                A[g + 8, 2 * c: 2 * c + 2] = w(1, 2 * s)
                                A[g, 2 * c + 8: 2 * c + 10] = w(0, 2 * s + 1)
                                A[g + 8, 2 * c + 8: 2 * c + 10] = w(1, 2 * s + 1)
                                B[2 * c: 2 * c + 2, g] = b[lane, 4 * s: 4 * s + 2]
                                B[2 * c + 8: 2 * c + 10, g] = b[lane, 4 * s + 2: 4 * s + 4]
                            D = A @ B
                            for lane in range(32):
                                g, c = lane >> 2, lane & 3
                                acc[m, j, lane] += [D[g, 2 * c], D[g, 2 * c + 1], D[g + 8, 2 * c], D[g + 8, 2 * c + 1]]
        for lane in range(32):
            g, c = lane >> 2, lane & 3
            for m in range(MT):
                for h in range(2):
                    t = t0 + 16 * m + g + 8 * h
                    if t >= T:
                        continue
                    if c == 0:
                        ssq[split, t] = sum(sq[m, h, 4 * g + cc] for cc in range(4))
                    for j in range(NT):
                        part[split, t, 8 * j + 2 * c: 8 * j + 2 * c + 2] = acc[m, j, lane, 2 * h: 2 * h + 2]
    return part, ssq


@pytest.mark.parametrize("ku", [1, 2, 4])
@pytest.mark.parametrize("n,T,K,forced_splits", [(4, 40, 100, None), (2, 17, 64, None), (3, 33, 200, 3), (8, 9, 96, 2)])
def test_lane_model_of_the_mma_kernel_computes_x_phi(n, T, K, forced_splits, ku):
    rng = np.random.default_rng()
    W = n * (n + 2)
    x = np.array(mx.array(rng.standard_normal((T, K)).astype(np.float32)).astype(mx.bfloat16).astype(mx.float32),
                 dtype=np.float64)
    phi = rng.standard_normal((K, W)).astype(np.float32) / np.sqrt(K)
    packed = cm.pack_phi_reference(mx.array(phi), ku=ku)
    NT = cm.n_tiles(W)
    assert packed.shape == (cm.PHI_PARTS, cm.k_blocks(K, ku), NT, 32, 8) and packed.dtype == mx.bfloat16
    MT, splits, ks, warps = cm.plan(T, K, NT, ku)
    if forced_splits:
        ks = 32 * ku * -(-(-(-K // (32 * ku))) // forced_splits)
        splits = -(-K // ks)
    part, ssq = _lane_model(x, np.array(packed.astype(mx.float32), dtype=np.float64), K, W, MT, splits, ks, ku)
    assert not np.isnan(part).any() and not np.isnan(ssq).any(), "an output element was never written"
    dot = part.sum(axis=0)[:, :W]
    want = x @ phi.astype(np.float64)
    # three bfloat16 parts carry phi to ~2^-24: the model's float64 sums match to float32 precision
    assert np.linalg.norm(dot - want) / np.linalg.norm(want) <= 1e-6
    np.testing.assert_allclose(ssq.sum(axis=0), (x ** 2).sum(axis=1), rtol=1e-12)
    assert np.all(part[..., W:] == 0.0)  # padded columns hold zeros


def test_phi_parts_add_up_to_phi():
    rng = np.random.default_rng()
    phi = (rng.standard_normal((70, 24)) * 10.0 ** rng.uniform(-6, 2, (70, 24))).astype(np.float32)
    packed = np.array(cm.pack_phi_reference(mx.array(phi), ku=1).astype(mx.float32), dtype=np.float64)
    total = packed.sum(axis=0)  # [KB, NT, 32, 8] -> back to [K, W]
    KB, NT = total.shape[0], total.shape[1]
    back = total.reshape(KB, NT, 8, 4, 8).transpose(0, 3, 4, 1, 2).reshape(32 * KB, 8 * NT)
    np.testing.assert_array_equal(back[70:], 0.0)
    np.testing.assert_array_equal(back[:, 24:], 0.0)
    assert np.abs(back[:70, :24] - phi).max() <= np.abs(phi).max() * 2.0 ** -23


def test_float16_x_splits_exactly_into_two_bfloat16_parts():
    # the kernel's float16 path: hi = bf16(x), lo = bf16(x - hi), and hi + lo == x exactly
    rng = np.random.default_rng()
    x = (rng.standard_normal(4096) * 10.0 ** rng.uniform(-7, 4, 4096)).astype(np.float16)
    xf = x.astype(np.float32)
    hi = np.array(mx.array(xf).astype(mx.bfloat16).astype(mx.float32))
    lo = np.array(mx.array(xf - hi).astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_array_equal(hi + lo, xf)


def test_no_tokens_launch_nothing(monkeypatch):
    monkeypatch.setattr(cm, "launch", lambda *a, **k: pytest.fail("launched for zero tokens"))
    dot, ss = cm.dot_and_ssq(mx.zeros((0, 64), dtype=mx.bfloat16), mx.zeros((64, 24)))
    assert dot.shape == (0, 24) and ss.shape == (0,)


def test_plan_covers_every_token_and_k():
    for T, K, NT, ku in itertools.product((1, 15, 16, 33, 4096), (8, 100, 16384), (1, 3, 10), (1, 2, 4)):
        MT, splits, ks, warps = cm.plan(T, K, NT, ku)
        assert ks % (32 * ku) == 0 and splits * ks >= K and (splits - 1) * ks < K
        assert warps == -(-T // (16 * MT)) * splits
