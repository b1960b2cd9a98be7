"""`mhc-mlx train`: the default command (fewer steps), its outputs, the dashboard PNG."""

import math

import numpy as np
import pytest

from train_helpers import TINY, metrics, png_chunks, train, weights


@pytest.mark.slow
def test_default_command_with_fewer_steps(tmp_path, capsys):
    # The README's default run, shortened: every default (12 blocks x 32 wide, 3 modes,
    # batch 8 x 64, the synthetic language) except the number of steps.
    out = tmp_path / "run"
    assert train("--steps", 6, "--log-every", 3, "--out", out, "--no-progress") == 0
    m = metrics(out)
    assert set(m["modes"]) == {"baseline", "hc", "mhc"}
    assert m["config"]["layers"] == 12 and m["config"]["hidden_size"] == 32
    for mode, h in m["modes"].items():
        assert h["step"] == [1, 2, 3, 4, 5, 6]
        assert all(math.isfinite(x) for x in h["loss"] + h["grad_norm"])
        assert all(t > 0 for t in h["tokens_per_s"])
        assert h["loss"][-1] < h["loss"][0]
    # gains: recorded at steps 1, 3, 6 for the two stream modes, none for the baseline
    assert m["modes"]["baseline"]["gains"] == []
    for mode in ("hc", "mhc"):
        h = m["modes"][mode]
        assert h["gain_step"] == [1, 3, 6]
        for g in h["gains"]:
            assert len(g["sites"]) == 24 and len(g["composite_by_depth"]) == 24
            assert all(math.isfinite(v) and v > 0 for v in g["composite"].values())
    for g in m["modes"]["mhc"]["gains"]:
        c = g["composite"]
        assert 0.5 <= c["forward_min"] <= c["forward_max"] <= 2.0
    printed = capsys.readouterr().out
    assert "hc: loss" in printed and "composite gain fwd" in printed and "mhc: loss" in printed
    assert "best possible loss" in printed
    log = (out / "train.log").read_text()
    assert "step 6/6" in log


def test_dashboard_is_a_valid_png_with_the_expected_panels(tmp_path):
    out = tmp_path / "run"
    assert train(*TINY, "--steps", 3, "--log-every", 1, "--out", out) == 0
    chunks = png_chunks(out / "dashboard.png")
    width, height = np.frombuffer(chunks[0][1][:8], dtype=">u4")
    assert width >= 800 and height >= 500
    text = b"".join(body for kind, body in chunks if kind in (b"tEXt", b"iTXt")).decode("latin-1")
    for panel in ("Training loss", "Composite forward gain", "Composite backward gain", "Gradient norm", "Throughput"):
        assert panel in text
    from matplotlib.image import imread

    pixels = imread(out / "dashboard.png")
    assert pixels.std() > 0.05  # drawn, not blank


def test_modes_subset_and_static_sites(tmp_path):
    out = tmp_path / "run"
    assert train(*TINY, "--steps", 2, "--modes", "mhc", "--sites", "static", "--no-plot", "--out", out) == 0
    m = metrics(out)
    assert list(m["modes"]) == ["mhc"] and m["config"]["dynamic"] is False
    assert not (out / "dashboard.png").exists()
    assert all(k.endswith(".bias") for k in weights(out, "mhc") if "_site." in k)


def test_every_mode_starts_from_the_same_network(tmp_path):
    out = tmp_path / "run"
    assert train(*TINY, "--steps", 1, "--log-every", 1, "--out", out) == 0
    losses = {mode: h["loss"][0] for mode, h in metrics(out)["modes"].items()}
    # identity-initialised sites compute the baseline network: equal first losses
    assert losses["hc"] == pytest.approx(losses["baseline"], rel=1e-5)
    assert losses["mhc"] == pytest.approx(losses["baseline"], rel=1e-5)
