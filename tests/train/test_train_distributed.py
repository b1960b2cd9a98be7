"""Data parallel: 2 ranks on localhost (mlx.launch, ring backend) == one process with the
combined batch; a failing rank makes the command fail."""

import numpy as np
import pytest

from train_helpers import TINY, flat, metrics, train, weights

MODES = ("baseline", "hc", "mhc")
RUN = (*TINY, "--steps", 3, "--log-every", 1, "--no-plot")


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_combined_batch(tmp_path, capsys):
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    assert train(*RUN, "--out", single) == 0
    assert train(*RUN, "--distributed", "--ranks", 2, "--backend", "ring", "--out", ranks) == 0
    m = metrics(ranks)
    assert m["world_size"] == 2
    for mode in MODES:
        a, b = flat(weights(ranks, mode)), flat(weights(single, mode))
        assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-6, mode
        la, lb = np.array(m["modes"][mode]["loss"]), np.array(metrics(single)["modes"][mode]["loss"])
        assert np.abs(la - lb).max() / np.abs(lb).max() <= 1e-6, mode
    # one writer: one log with each step once
    log = (ranks / "train.log").read_text()
    assert log.count("step 3/3") == 1


@pytest.mark.slow
def test_a_slow_rank_still_checks_the_out_directory_before_rank_0_writes(tmp_path, capsys, monkeypatch):
    # rank 1 joins 3 s late: rank 0 must not create train.log before rank 1 has checked --out
    monkeypatch.setenv("MHC_MLX_SLOW_RANK", "1:3")
    out = tmp_path / "run"
    assert train(*TINY, "--steps", 1, "--no-plot", "--distributed", "--ranks", 2,
                 "--backend", "ring", "--out", out) == 0, capsys.readouterr().err
    assert metrics(out)["world_size"] == 2


@pytest.mark.slow
def test_a_failing_rank_fails_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MHC_MLX_FAIL_RANK", "1")
    out = tmp_path / "run"
    assert train(*RUN, "--distributed", "--ranks", 2, "--backend", "ring", "--out", out) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "rank 1 failed" in err
    assert not (out / "metrics.json").exists()
