"""Training: a CI-sized 4x4 Sudoku run learns; checkpoints resume exactly; the CLI end to end
with its errors."""

import json
import os

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mhc_mlx.cli.main import main
from mhc_mlx.hrm import sudoku
from mhc_mlx.hrm.dataset import load_metadata
from mhc_mlx.hrm.training import Trainer, TrainConfig, model_config_for

CHANCE = 0.25  # four digits


@pytest.fixture(scope="module")
def sudoku4(tmp_path_factory):
    d = tmp_path_factory.mktemp("hrm") / "sudoku4"
    sudoku.build_dataset(str(d), 4, num_train=1000, num_test=200, seed=0)
    return str(d)


def small_arch(**overrides):
    arch = dict(
        hidden_size=32,
        num_heads=2,
        H_layers=1,
        L_layers=1,
        H_cycles=2,
        L_cycles=2,
        expansion=4.0,
        ffn_multiple_of=32,
        halt_max_steps=2,
        puzzle_emb_ndim=32,
    )
    arch.update(overrides)
    return arch


@pytest.mark.slow
def test_ci_sized_sudoku_run_learns(sudoku4, tmp_path):
    """Held-out blank-cell accuracy well above the 0.25 of guessing, after ~250 CPU steps."""
    tc = TrainConfig(
        data=sudoku4,
        out=str(tmp_path / "run"),
        steps=250,
        batch_size=32,
        eval_every=250,
        eval_batch_size=200,
        lr=3e-3,
        puzzle_emb_lr=3e-3,
        lr_warmup_steps=20,
        seed=0,
    )
    trainer = Trainer(tc, model_config_for(load_metadata(sudoku4, "train"), **small_arch()))
    final = trainer.fit(progress=False)
    start = trainer.history["eval"][0]
    print(
        f"blank-cell accuracy {start['blank_accuracy']:.3f} -> {final['blank_accuracy']:.3f} "
        f"in {trainer.wall_time:.1f} s"
    )
    assert final["count"] == 200
    assert final["blank_accuracy"] > CHANCE + 0.07
    assert final["blank_accuracy"] > start["blank_accuracy"] + 0.07
    assert final["accuracy"] > final["blank_accuracy"]  # givens are easy: copy the input
    saved = json.load(open(tmp_path / "run" / "metrics.json"))
    assert saved["final_eval"]["blank_accuracy"] == final["blank_accuracy"]
    assert os.path.getsize(tmp_path / "run" / "accuracy.png") > 1000


class Stop(Exception):
    pass


def test_resume_continues_exactly(sudoku4, tmp_path):
    """Stopped after its step-3 checkpoint and resumed, a run ends where an unbroken one ends:
    weights, optimizer state, ACT carry and data position all come back."""
    arch = small_arch(
        hidden_size=16,
        ffn_multiple_of=16,
        puzzle_emb_ndim=16,
        residual="mhc",
        streams=2,
        halt_max_steps=4,
        halt_exploration_prob=0.5,
    )

    def config(out):
        return TrainConfig(
            data=sudoku4,
            out=str(out),
            steps=6,
            batch_size=8,
            eval_every=3,
            eval_batch_size=50,
            lr_warmup_steps=2,
            seed=3,
        )

    meta = load_metadata(sudoku4, "train")
    whole = Trainer(config(tmp_path / "whole"), model_config_for(meta, **arch))
    whole.fit(progress=False)

    broken = Trainer(config(tmp_path / "broken"), model_config_for(meta, **arch))

    def stop(trainer):
        if trainer.step == 3:
            raise Stop

    with pytest.raises(Stop):
        broken.fit(progress=False, on_eval=stop)
    assert not all(broken.carry.halted.tolist())  # rows are mid-puzzle: the carry matters
    resumed = Trainer.resume(str(tmp_path / "broken"))
    assert resumed.step == 3 and resumed.batches_used == 3
    resumed.fit(progress=False)

    a = dict(tree_flatten(whole.model.parameters()))
    b = dict(tree_flatten(resumed.model.parameters()))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    for x, y in zip(tree_flatten(whole.carry), tree_flatten(resumed.carry)):
        np.testing.assert_array_equal(np.array(x[1]), np.array(y[1]))
    assert [r["loss"] for r in whole.history["train"]] == [r["loss"] for r in resumed.history["train"]]
    assert whole.history["eval"][-1]["blank_accuracy"] == resumed.history["eval"][-1]["blank_accuracy"]


def run_cli(*argv):
    return main(["hrm", *map(str, argv)])


TINY = [
    "--hidden-size",
    16,
    "--ffn-multiple-of",
    16,
    "--num-heads",
    2,
    "--batch-size",
    8,
    "--eval-batch-size",
    64,
    "--quiet",
]


def test_cli_end_to_end(tmp_path, capsys):
    data, run = tmp_path / "s4", tmp_path / "run"
    assert (
        run_cli(
            "data", "sudoku", "--size", 4, "--train", 40, "--test", 10, "--seed", 1, "--out", data, "--quiet"
        )
        == 0
    )
    assert (
        run_cli(
            "data",
            "maze",
            "--size",
            7,
            "--train",
            8,
            "--test",
            2,
            "--seed",
            1,
            "--out",
            tmp_path / "maze",
            "--quiet",
        )
        == 0
    )
    assert (
        run_cli(
            "train",
            "--data",
            tmp_path / "maze",
            "--out",
            tmp_path / "maze-run",
            "--steps",
            1,
            "--eval-every",
            1,
            *TINY,
        )
        == 0
    )
    assert json.load(open(tmp_path / "maze-run" / "metrics.json"))["model_config"]["vocab_size"] == 6
    assert (
        run_cli(
            "train",
            "--data",
            data,
            "--out",
            run,
            "--steps",
            4,
            "--eval-every",
            2,
            "--residual",
            "mhc",
            "--streams",
            2,
            *TINY,
        )
        == 0
    )
    summary = json.load(open(run / "metrics.json"))
    assert summary["model_config"]["residual"] == "mhc" and summary["step"] == 4
    assert [r["step"] for r in summary["history"]["eval"]] == [0, 2, 4]
    assert len(summary["history"]["train"]) == 4
    assert (run / "accuracy.png").stat().st_size > 1000
    assert (run / "checkpoint" / "model.safetensors").exists()

    out_json = tmp_path / "eval.json"
    assert run_cli("eval", "--run", run, "--json", out_json) == 0
    result = json.load(open(out_json))
    for k in ("blank_accuracy", "exact_accuracy", "accuracy", "count"):
        assert result[k] == pytest.approx(summary["final_eval"][k], abs=1e-9)

    assert run_cli("train", "--out", run, "--resume", "--steps", 6, "--quiet") == 0
    assert json.load(open(run / "metrics.json"))["step"] == 6
    assert run_cli("plot", run, "--out", tmp_path / "p.png", "--labels", "mhc") == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_cli_errors_are_clear(tmp_path, capsys):
    data, run = tmp_path / "s4", tmp_path / "run"
    run_cli("data", "sudoku", "--size", 4, "--train", 20, "--test", 4, "--out", data, "--quiet")
    run_cli("data", "sudoku", "--size", 6, "--train", 2, "--test", 2, "--out", tmp_path / "s6", "--quiet")
    run_cli("train", "--data", data, "--out", run, "--steps", 1, "--eval-every", 1, *TINY)
    capsys.readouterr()

    def fails(*argv, match):
        assert run_cli(*argv) == 2
        err = capsys.readouterr().err
        assert match in err, err

    fails(
        "data",
        "sudoku",
        "--size",
        4,
        "--train",
        2,
        "--test",
        1,
        "--out",
        data,
        "--quiet",
        match="already holds a dataset",
    )
    fails("train", "--data", tmp_path / "nope", "--out", tmp_path / "r2", *TINY, match="does not exist")
    fails("train", "--data", tmp_path, "--out", tmp_path / "r3", *TINY, match="no dataset.json")
    fails("train", "--data", data, "--out", run, *TINY, match="already holds a run")
    fails("train", "--out", run, "--resume", "--lr", 0.1, match="drop --lr")
    fails("train", "--out", tmp_path / "r4", "--quiet", match="--data DIR is required")
    fails("eval", "--run", tmp_path / "norun", match="does not exist")
    fails("eval", "--run", data, match="no checkpoint")
    fails("eval", "--run", run, "--data", tmp_path / "s6", match="mismatched dataset")
    fails("plot", run, "--out", tmp_path / "q.png", "--labels", "a", "b", match="one label per run")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails("data", "sudoku", "--size", 4, "--train", 2, "--test", 1, "--out", blocker / "d", "--quiet",
          match=f"{blocker / 'd'}: Not a directory")
    fails("train", "--data", data, "--out", blocker / "r", *TINY, match="Not a directory")
    with pytest.raises(SystemExit):
        run_cli("train", "--data", data, "--out", tmp_path / "r5", "--residual", "nope")
