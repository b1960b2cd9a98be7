"""Checkpoints: N steps == N/2 steps + resume + N/2 steps, bit for bit."""

import json

import mlx.core as mx

from train_helpers import TINY, metrics, snapshot, train, weights

MODES = ("baseline", "hc", "mhc")


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = (*TINY, "--log-every", 2, "--checkpoint-every", 2, "--seed", 5)
    assert train(*common, "--steps", 6, "--out", straight) == 0
    assert train(*common, "--steps", 3, "--out", split) == 0
    assert train("--resume", "--steps", 6, "--out", split, "--no-progress") == 0
    for mode in MODES:
        for kind in ("model", "optimizer"):
            a, b = weights(straight, mode, kind), weights(split, mode, kind)
            assert a.keys() == b.keys()
            different = [k for k in a if not mx.array_equal(a[k], b[k]).item()]
            assert not different, (mode, kind, different[:5])
    ma, mb = metrics(straight), metrics(split)
    for mode in MODES:
        a, b = ma["modes"][mode], mb["modes"][mode]
        for key in ("step", "loss", "grad_norm"):
            assert a[key] == b[key], (mode, key)
        # the interrupted run also logged gains where it stopped (step 3)
        at = dict(zip(b["gain_step"], b["gains"]))
        assert set(a["gain_step"]) <= set(at)
        assert a["gains"] == [at[s] for s in a["gain_step"]]


def test_resume_keeps_the_saved_settings(tmp_path):
    out = tmp_path / "run"
    assert train(*TINY, "--steps", 2, "--lr", 0.01, "--out", out) == 0
    before = snapshot(out)
    rc = train("--resume", "--steps", 4, "--lr", 0.02, "--out", out, "--no-progress")
    assert rc == 2 and snapshot(out) == before
    rc = train("--resume", "--steps", 3, "--out", out, "--no-progress")
    assert rc == 0
    m = metrics(out)
    assert m["config"]["lr"] == 0.01 and m["config"]["steps"] == 3
    assert m["modes"]["mhc"]["step"] == [1, 2, 3]


def test_resume_at_or_past_the_target_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*TINY, "--steps", 2, "--out", out) == 0
    before = snapshot(out)
    assert train("--resume", "--steps", 2, "--out", out, "--no-progress") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before


def test_checkpoint_records_what_it_holds(tmp_path):
    out = tmp_path / "run"
    assert train(*TINY, "--steps", 4, "--checkpoint-every", 1, "--modes", "hc,mhc", "--out", out) == 0
    root = out / "checkpoints"
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert kept == ["step-0000003", "step-0000004"]  # the newest two
    assert (root / "latest").read_text() == "step-0000004"
    state = json.loads((root / "step-0000004" / "state.json").read_text())
    assert state["step"] == 4 and state["modes"] == ["hc", "mhc"]
    assert set(state["files"]) == {f"{m}.{k}.safetensors" for m in ("hc", "mhc") for k in ("model", "optimizer")}
