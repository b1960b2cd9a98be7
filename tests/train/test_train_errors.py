"""Bad input to `mhc-mlx train`: a clear error (exit 2, message naming the problem), and
nothing written or overwritten."""


import pytest

from train_helpers import TINY, latest_checkpoint, snapshot, train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(*TINY, "--steps", 2, "--log-every", 1, "--out", out) == 0
    return out


def expect_error(capsys, match, *args):
    assert train(*args) == 2
    err = capsys.readouterr().err
    assert "mhc-mlx train: error:" in err and match in err, err


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data", "{tmp}/missing.txt"], "does not exist"),
        (["--data", "{tmp}/empty.txt"], "is empty"),
        (["--data", "{tmp}/short.txt"], "larger than the data"),
        (["--model", "no_such_model"], "unknown model type 'no_such_model'"),
        (["--model", "{tmp}/no_dir"], "does not exist"),
        (["--modes", "baseline,mHC"], "unknown residual mode 'mHC'"),
        (["--modes", "hc,hc"], "duplicates"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--resume", "--overwrite"], "pick one"),
        (["--resume"], "no checkpoint to resume from"),
        (["--distributed", "--ranks", "3"], "does not split evenly"),
        (["--distributed", "--ranks", "0"], "--ranks must be >= 1"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(tmp_path, capsys, args, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a short text")
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    # flags given later win, so a test's own --steps replaces the short default here
    expect_error(capsys, match, *TINY, "--steps", 2, *args, "--out", out)
    assert not out.exists()


def test_an_out_path_that_cannot_be_created_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    expect_error(capsys, "cannot create the output directory", *TINY, "--steps", 2, "--out", blocker / "run")
    assert blocker.read_text() == "not a directory"


def test_an_earlier_run_is_never_replaced_by_surprise(finished_run, capsys):
    before = snapshot(finished_run)
    expect_error(capsys, "already holds a run", *TINY, "--steps", 2, "--out", finished_run)
    # --overwrite still checks everything before deleting anything
    expect_error(capsys, "does not exist", *TINY, "--overwrite", "--data", "/nonexistent/x.txt", "--out", finished_run)
    expect_error(capsys, "unknown model type", *TINY, "--overwrite", "--model", "nope", "--out", finished_run)
    expect_error(capsys, "settings differ", "--resume", "--layers", 3, "--steps", 4, "--out", finished_run)
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_optimizer_byte", "garble_state", "drop_state", "dangling_latest"])
def test_corrupt_checkpoint_is_refused(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert train(*TINY, "--steps", 2, "--out", out) == 0
    ckpt = latest_checkpoint(out)
    if damage == "truncate_weights":
        f = ckpt / "mhc.model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "flip_optimizer_byte":
        f = ckpt / "hc.optimizer.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "garble_state":
        (ckpt / "state.json").write_text("{ not json")
    elif damage == "drop_state":
        (ckpt / "state.json").unlink()
    else:
        (out / "checkpoints" / "latest").write_text("step-0009999")
    before = snapshot(out)
    expect_error(capsys, "corrupt checkpoint", "--resume", "--steps", 4, "--out", out, "--no-progress")
    assert snapshot(out) == before


def test_a_rank_process_needs_the_distributed_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLX_RANK", "0")
    expect_error(capsys, "add --distributed", *TINY, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
