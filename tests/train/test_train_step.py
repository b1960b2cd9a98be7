"""The training loop's compiled step: the same losses and gradients as the eager step."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mhc_mlx.train.config import TrainConfig
from mhc_mlx.train.factory import Setup
from mhc_mlx.train.loop import ModeRun, cross_entropy, make_optimizer


@pytest.mark.parametrize("mode", ["baseline", "hc", "mhc"])
def test_compiled_step_matches_the_eager_step(mode):
    # ModeRun compiles value_and_grad over the model's state; inside the model the compiled
    # path's own mx.compile does not fuse under mx.grad, the step's does. Same numbers:
    # three steps of losses and the gradients of the last, against an eager copy of the run.
    cfg = TrainConfig(layers=2, hidden_size=16, heads=2, intermediate_size=32, batch_size=4, seq_len=16,
                      modes=(mode,))
    setup = Setup(cfg)
    mx.random.seed(3)
    run = ModeRun(mode, setup.build(mode), make_optimizer(cfg))
    eager_model = setup.build(mode)
    eager_model.update(run.model.parameters())
    eager_opt = make_optimizer(cfg)
    eager = nn.value_and_grad(eager_model, cross_entropy)
    for step in range(1, 4):
        batch = mx.array(setup.task.batch(step, cfg.batch_size, cfg.seq_len))
        x, y = batch[:, :-1], batch[:, 1:]
        loss, grads = run.loss_and_grad(x, y)
        want_loss, want_grads = eager(eager_model, x, y)
        mx.eval(loss, grads, want_loss, want_grads)
        assert abs(loss.item() - want_loss.item()) <= 1e-6 * max(1.0, abs(want_loss.item()))
        for (name, g), (_, w) in zip(tree_flatten(grads), tree_flatten(want_grads)):
            g, w = np.array(g, dtype=np.float64), np.array(w, dtype=np.float64)
            assert np.linalg.norm(g - w) <= 1e-5 * max(np.linalg.norm(w), 1e-8), name
        run.optimizer.update(run.model, grads)
        eager_opt.update(eager_model, want_grads)
        mx.eval(run.model.parameters(), eager_model.parameters(), run.optimizer.state, eager_opt.state)
