"""Recovery keeps a method only if it helps on the held-back calibration samples, and says
so per method in report.json. Here both `bias` and `lsq` make the model worse: the fitted
samples and the held-back ones differ, and what the methods learn from the first is wrong
for the second."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import engine

N, HOLD, SEED = 40, 0.25, 0


class _Net(nn.Module):
    """y = ones . relu(W1 x): hidden channel 0 is relu(x0), channel 2 is relu(-x0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 4, bias=False)
        self.fc2 = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0],
                                                [0.0, -1.0]]))
            self.fc2.weight.fill_(1.0)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _calibration() -> np.ndarray:
    """Fitted samples have x0 = +5 (hidden channel 0 carries 5); the held-back ones x0 = -5
    (channel 0 is zero there, so losing it costs nothing on them). The held-back indices are
    the ones recovery draws (a seeded permutation, the first quarter)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.zeros(N, 2)
    x[:, 0] = 5.0
    x[:, 1] = torch.randn(N, generator=gen)
    held = torch.randperm(N, generator=torch.Generator().manual_seed(SEED))[:round(N * HOLD)]
    x[held, 0] = -5.0
    return x.numpy()


def test_methods_that_hurt_on_the_held_back_split_are_dropped():
    model = _Net().eval()
    x = _calibration()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.as_tensor(x[:4]),), dynamic_shapes=({0: batch},))
    pruned = engine.prune(program, options={"criterion": "index", "step_op": "none"},
                          indices={"fc1": [0]})
    recovered = engine.recover(pruned, x, "bias,lsq", eval_holdout=HOLD, seed=SEED)
    info = recovered.report["recovery"]
    assert info["metric"] == "relative_error"
    assert info["metric_before"] == 0.0  # channel 0 is zero on the held-back samples
    verdicts = info["per_method"]
    assert set(verdicts) == {"bias", "lsq"}
    for name in ("bias", "lsq"):
        assert verdicts[name]["kept"] is False
        assert verdicts[name]["after"] > verdicts[name]["before"] == 0.0
        assert "dropped" in verdicts[name]["why"]
    assert info["methods"] == [] and info["metric_after"] == 0.0
    held = torch.as_tensor(x[x[:, 0] < 0])
    with torch.no_grad():  # the returned model is the pruned one, unchanged
        assert torch.equal(recovered.module(held), pruned.module(held))


def test_a_method_that_helps_is_kept_with_its_numbers():
    """The same network on samples drawn alike for fitting and holding back: the bias shift
    restores the mean of the lost channel, and the held-back error falls."""
    model = _Net().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, 2, generator=gen) + torch.tensor([3.0, 0.0])
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (x[:4],), dynamic_shapes=({0: batch},))
    pruned = engine.prune(program, options={"criterion": "index", "step_op": "none"},
                          indices={"fc1": [0]})
    recovered = engine.recover(pruned, x.numpy(), "bias", eval_holdout=HOLD, seed=SEED)
    info = recovered.report["recovery"]
    verdict = info["per_method"]["bias"]
    assert verdict["kept"] is True and verdict["after"] < 0.5 * verdict["before"]
    assert info["methods"] == ["bias"] and info["metric_after"] == verdict["after"]
