"""`mhc-mlx demo`: build a small mHC network, check it starts as its plain twin, train it briefly."""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from .. import HyperConnection, expand_streams, reduce_streams


class MLPBlock(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.norm = nn.RMSNorm(dims)
        self.up = nn.Linear(dims, 2 * dims)
        self.down = nn.Linear(2 * dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(nn.gelu(self.up(self.norm(x))))


class TinyMHCNet(nn.Module):
    """x -> expand to n streams -> depth mHC sites around MLP blocks -> reduce -> head."""

    def __init__(self, dims: int, depth: int, n: int):
        super().__init__()
        self.n = n
        self.blocks = [MLPBlock(dims) for _ in range(depth)]
        self.sites = [HyperConnection(dims, n=n) for _ in range(depth)]
        self.head = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, plain: bool = False) -> mx.array:
        if plain:  # the residual network the sites replace
            for block in self.blocks:
                x = x + block(x)
            return self.head(x)
        s = expand_streams(x, self.n)
        for block, site in zip(self.blocks, self.sites):
            s = site(s, block)
        return self.head(reduce_streams(s))


def run(args: argparse.Namespace) -> int:
    mx.random.seed(args.seed)
    model = TinyMHCNet(args.dims, args.depth, args.n)
    teacher = nn.Sequential(nn.Linear(args.dims, args.dims), nn.Tanh(), nn.Linear(args.dims, args.dims))
    x0 = mx.random.normal((args.batch, args.dims))
    gap = mx.abs(model(x0) - model(x0, plain=True)).max().item()
    print(f"mHC network: {args.depth} sites, n={args.n} streams of width {args.dims}")
    print(f"at init it computes the plain residual network: max |mhc - plain| = {gap:.2e}")

    opt = optim.AdamW(learning_rate=args.lr)
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.mse_loss(m(x), y))
    start, first = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        x = mx.random.normal((args.batch, args.dims))
        loss, grads = loss_and_grad(model, x, teacher(x))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        first = loss.item() if first is None else first
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    res = [site.coefficients(expand_streams(x0[:1], args.n)).res[0] for site in model.sites]
    gain = res[0]
    for H in res[1:]:
        gain = H @ gain
    print(f"loss {first:.4f} -> {loss.item():.4f} in {args.steps} steps ({elapsed:.1f} s)")
    print(
        "composite H_res over depth: max row sum "
        f"{mx.sum(gain, axis=1).max().item():.4f}, max column sum {mx.sum(gain, axis=0).max().item():.4f}"
        " (doubly stochastic: both stay near 1)"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="a one-minute demo: a small mHC network trained a few steps")
    p.add_argument("--dims", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
