"""`mhc-mlx hrm ...`: the Hierarchical Reasoning Model on offline puzzles.

mhc-mlx hrm data sudoku --size 4 --train 2000 --test 200 --seed 0 --out data/sudoku4
mhc-mlx hrm data maze --size 11 --train 1000 --test 100 --seed 0 --out data/maze11
mhc-mlx hrm train --data data/sudoku4 --out runs/s4-plain [--residual mhc] [--resume]
mhc-mlx hrm eval --run runs/s4-plain
mhc-mlx hrm plot runs/s4-plain runs/s4-mhc --out curves.png
"""

from __future__ import annotations

import argparse
import json
import os

# Architecture and optimisation defaults sized to learn 4x4 Sudoku visibly in a few minutes
# on a 2-core CPU (MLX's CPU matmul runs at a few GFLOP/s); the original's are in docs/hrm.md.
ARCH_DEFAULTS = dict(
    hidden_size=64,
    num_heads=2,
    H_layers=1,
    L_layers=1,
    H_cycles=2,
    L_cycles=2,
    expansion=4.0,
    ffn_multiple_of=256,
    halt_max_steps=2,
    halt_exploration_prob=0.1,
    pos_encodings="rope",
    puzzle_emb_ndim=None,  # None: hidden_size, as the original's config
    residual="plain",
    streams=4,
    sinkhorn_iters=20,
    forward_dtype="float32",
)
TRAIN_DEFAULTS = dict(
    steps=600,
    batch_size=32,
    eval_every=100,
    eval_batch_size=256,
    lr=1e-3,
    lr_min_ratio=1.0,
    lr_warmup_steps=50,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    puzzle_emb_lr=1e-3,
    puzzle_emb_weight_decay=0.1,
    optimizer="adam_atan2",
    loss_type="stablemax_cross_entropy",
    seed=0,
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _LazyBar:
    """A tqdm bar drawn at the first update: an argument error then prints no empty bar first."""

    def __init__(self, **kwargs):
        self.kwargs, self.bar = kwargs, None

    def update(self, k: int = 1) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(**self.kwargs)
        self.bar.update(k)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_data_sudoku(args: argparse.Namespace) -> int:
    from ..hrm import sudoku

    with _LazyBar(
        total=args.train + args.test, desc=f"sudoku {args.size}x{args.size}", disable=args.quiet
    ) as bar:
        metas = sudoku.build_dataset(
            args.out,
            args.size,
            args.train,
            args.test,
            args.seed,
            num_aug=args.aug,
            max_blanks=args.max_blanks,
            progress=bar,
        )
    _report_data(args.out, metas)
    return 0


def cmd_data_maze(args: argparse.Namespace) -> int:
    from ..hrm import maze

    with _LazyBar(total=args.train + args.test, desc=f"maze {args.size}x{args.size}", disable=args.quiet) as bar:
        metas = maze.build_dataset(
            args.out,
            args.size,
            args.train,
            args.test,
            args.seed,
            aug=args.aug,
            min_path=args.min_path,
            loops=args.loops,
            progress=bar,
        )
    _report_data(args.out, metas)
    return 0


def _report_data(out: str, metas: dict) -> None:
    for split, meta in metas.items():
        print(
            f"{os.path.join(out, split)}: {meta.total_groups} groups, "
            f"seq_len {meta.seq_len}, vocab {meta.vocab_size}"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from ..hrm.training import CHECKPOINT, METRICS, PLOT, Trainer, TrainConfig, model_config_for
    from ..hrm.dataset import load_metadata

    given_arch = {k: getattr(args, k) for k in ARCH_DEFAULTS if getattr(args, k) is not None}
    given_train = {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None}
    has_checkpoint = os.path.exists(os.path.join(args.out, CHECKPOINT, "state.json"))
    if args.resume:
        changed = sorted(set(given_arch) | (set(given_train) - {"steps"}))
        if changed:
            raise ValueError(
                "--resume continues a run with its own settings; drop "
                + ", ".join(_flag(k) for k in changed)
                + " (only --steps may change)"
            )
        trainer = Trainer.resume(args.out, data=args.data, steps=given_train.get("steps"))
        print(f"resuming {args.out} at step {trainer.step} of {trainer.tc.steps}")
    else:
        if has_checkpoint:
            raise ValueError(
                f"{args.out!r} already holds a run; pass --resume to continue it or choose another --out"
            )
        if args.data is None:
            raise ValueError("--data DIR is required (make one with `mhc-mlx hrm data sudoku ...`)")
        arch = {**ARCH_DEFAULTS, **given_arch}
        if arch["puzzle_emb_ndim"] is None:
            arch["puzzle_emb_ndim"] = arch["hidden_size"]
        tc = TrainConfig(data=args.data, out=args.out, **{**TRAIN_DEFAULTS, **given_train})
        mc = model_config_for(load_metadata(args.data, "train"), **arch)
        trainer = Trainer(tc, mc)
    mc = trainer.mc
    print(
        f"HRM {mc.residual}{f' (n={mc.streams})' if mc.uses_streams else ''}: hidden {mc.hidden_size}, "
        f"{mc.H_layers}+{mc.L_layers} layers, cycles {mc.H_cycles}x{mc.L_cycles}, "
        f"halt_max_steps {mc.halt_max_steps}, "
        f"{trainer.parameter_count():,} parameters; data {trainer.tc.data} "
        f"({len(trainer.train_data)} train / {len(trainer.test_data)} test examples)"
    )
    final = trainer.fit(progress=not args.quiet)
    print(
        f"done: step {trainer.step}, held-out blank-cell accuracy {final['blank_accuracy']:.4f}, "
        f"exact accuracy {final['exact_accuracy']:.4f}, {trainer.wall_time:.1f} s training"
    )
    print(
        f"wrote {os.path.join(args.out, METRICS)}, {os.path.join(args.out, PLOT)}, "
        f"{os.path.join(args.out, CHECKPOINT)}/"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..hrm.dataset import PuzzleDataset
    from ..hrm.training import check_compatible, evaluate, load_run

    model, state = load_run(args.run)
    data_dir = args.data or state["train_config"]["data"]
    data = PuzzleDataset(data_dir, args.split, args.batch_size)
    check_compatible(model.config, data.metadata, f"{data_dir}/{args.split}")
    result = evaluate(model, data, state["train_config"]["loss_type"], args.max_batches)
    result = {"run": args.run, "data": data_dir, "split": args.split, "step": state["step"], **result}
    print(json.dumps(result, indent=1))
    if args.json:
        if os.path.exists(args.json) and not args.force:
            raise ValueError(f"{args.json!r} exists; pass --force to overwrite it")
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..hrm.plotting import plot_runs
    from ..hrm.training import METRICS

    labels = args.labels or [None] * len(args.runs)
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels needs one label per run ({len(args.runs)}), got {len(labels)}")
    runs = []
    for run, label in zip(args.runs, labels):
        path = os.path.join(run, METRICS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist: not an HRM run directory")
        with open(path) as f:
            summary = json.load(f)
        runs.append((label or summary["model_config"]["residual"], summary["history"]))
    if os.path.exists(args.out) and not args.force:
        raise ValueError(f"{args.out!r} exists; pass --force to overwrite it")
    if plot_runs(runs, args.out, args.title):
        print(f"wrote {args.out}")
    return 0


def _add_arch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults: small CPU model; the original's in docs/hrm.md)")
    types = {"pos_encodings": str, "residual": str, "forward_dtype": str}
    choices = {
        "pos_encodings": ("rope", "learned"),
        "residual": ("plain", "mhc", "hc"),
        "forward_dtype": ("float32", "bfloat16", "float16"),
    }
    for k, default in ARCH_DEFAULTS.items():
        kind = types.get(k, type(default) if default is not None else int)
        g.add_argument(
            _flag(k),
            dest=k,
            type=kind,
            default=None,
            choices=choices.get(k),
            help=f"default {default if default is not None else 'hidden size'}",
        )


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    choices = {
        "optimizer": ("adam_atan2", "adamw"),
        "loss_type": ("stablemax_cross_entropy", "softmax_cross_entropy"),
    }
    for k, default in TRAIN_DEFAULTS.items():
        g.add_argument(
            _flag(k),
            dest=k,
            type=type(default),
            default=None,
            choices=choices.get(k),
            help=f"default {default}",
        )


def register(subparsers) -> None:
    hrm = subparsers.add_parser("hrm", help="Hierarchical Reasoning Model: data, train, eval, plot")
    sub = hrm.add_subparsers(dest="hrm_command", metavar="hrm_command")
    sub.required = True

    data = sub.add_parser("data", help="generate a puzzle dataset in the original HRM format")
    kinds = data.add_subparsers(dest="kind", metavar="kind")
    kinds.required = True
    for kind, helptext in (
        ("sudoku", "unique-solution Sudoku (4, 6, 9, ...)"),
        ("maze", "mazes with the shortest path as label"),
    ):
        p = kinds.add_parser(kind, help=helptext)
        side = (
            "4..16 with rectangular boxes: 4, 6, 9, ..."
            if kind == "sudoku"
            else ">= 5 (odd sizes use every row)"
        )
        p.add_argument("--size", type=int, required=True, help=f"grid side, {side}")
        p.add_argument("--train", type=int, required=True, help="train puzzles (before augmentation)")
        p.add_argument("--test", type=int, required=True, help="held-out test puzzles")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True, help="output directory (must not hold a dataset)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if kind == "sudoku":
            p.add_argument(
                "--aug", type=int, default=0, help="augmented copies per train puzzle (original: num_aug)"
            )
            p.add_argument(
                "--max-blanks",
                type=int,
                default=None,
                help="stop blanking at this many cells (default: minimal puzzles)",
            )
            p.set_defaults(func=cmd_data_sudoku)
        else:
            p.add_argument(
                "--aug", action="store_true", help="add the 8 dihedral transforms of each train maze"
            )
            p.add_argument(
                "--min-path", type=int, default=None, help="shortest path length at least (default: size)"
            )
            p.add_argument(
                "--loops", type=float, default=0.0, help="fraction of inner walls removed to add cycles"
            )
            p.set_defaults(func=cmd_data_maze)

    train = sub.add_parser("train", help="train HRM; writes metrics.json, accuracy.png, checkpoint/")
    train.add_argument("--data", help="dataset directory (from `mhc-mlx hrm data`)")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_arch_flags(train)
    _add_train_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on a dataset split")
    ev.add_argument("--run", required=True, help="run directory (from `mhc-mlx hrm train`)")
    ev.add_argument("--data", help="dataset directory (default: the run's)")
    ev.add_argument("--split", default="test", choices=("train", "test"))
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--max-batches", type=int, default=None)
    ev.add_argument("--json", help="also write the metrics to this file")
    ev.add_argument("--force", action="store_true", help="overwrite --json")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plot", help="accuracy curves of one or more runs in one PNG")
    pl.add_argument("runs", nargs="+", help="run directories")
    pl.add_argument("--out", required=True, help="PNG path")
    pl.add_argument("--labels", nargs="+", help="one label per run (default: its residual)")
    pl.add_argument("--title")
    pl.add_argument("--force", action="store_true", help="overwrite --out")
    pl.set_defaults(func=cmd_plot)
