"""`distill`: knowledge distillation from the original model on the calibration inputs.

The pruned model learns the original's outputs (softened class distributions, or the values
themselves where an output has no class dimension), with the labels mixed in when the
calibration set has them. The work is bounded by a time budget or a fixed number of steps
(seeded: two runs with the same steps and seed give the same weights); the state with the
lowest loss on the held-back calibration samples is kept, so distillation never leaves the
model worse on them than it found it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.quality.recovery.data import CalibrationSet, forward, pooled

TEMPERATURE = 2.0
LEARNING_RATE = 5e-3
# hidden states of a (pretrained) encoder: a learning rate for fine-tuning, not training
HIDDEN_LEARNING_RATE = 1e-4
COSINE_WEIGHT = 10.0  # 1 - cos is small next to the variance-scaled squared error
BATCH = 64


def loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
         y: torch.Tensor | None, mask: torch.Tensor | None = None,
         hidden_states: bool = False) -> torch.Tensor:
    """The distillation loss. `hidden_states`: the outputs are an encoder's hidden states
    and embeddings, not class scores: their values are matched (mean squared error scaled by
    the teacher's variance, over the real tokens where `mask` marks them) and the first
    output's pooled embedding by its cosine."""
    total = torch.zeros((), device=student[0].device)
    for k, (s, t) in enumerate(zip(student, teacher)):
        if not s.is_floating_point():
            continue
        if hidden_states:
            if mask is not None and s.ndim >= 3 and tuple(s.shape[:2]) == tuple(mask.shape):
                if k == 0:
                    cos = F.cosine_similarity(pooled(s, mask), pooled(t, mask), dim=-1)
                    total = total + (1 - cos).mean() * COSINE_WEIGHT
                s, t = s[mask], t[mask]
            total = total + F.mse_loss(s, t) / t.var().clamp_min(1e-12)
        elif s.ndim >= 2 and s.shape[-1] > 1:
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            kd = F.kl_div(F.log_softmax(s2 / TEMPERATURE, -1), F.log_softmax(t2 / TEMPERATURE, -1),
                          log_target=True, reduction="batchmean")
            total = total + kd * TEMPERATURE**2
            if k == 0 and y is not None and y.shape == s.shape[:-1]:
                total = total + F.cross_entropy(s2, y.reshape(-1))
        else:
            total = total + F.mse_loss(s, t) / t.var().clamp_min(1e-12)
    return total


def run(student: torch.nn.Module, fit: CalibrationSet, fit_teacher: list[torch.Tensor],
        holdout: CalibrationSet | None, holdout_teacher: list[torch.Tensor] | None, *,
        seconds: float | None, steps: int | None, seed: int,
        progress: Callable[[str, float], None], batch: int = BATCH,
        hidden_states: bool = False, stop: Callable[[], bool] = lambda: False) -> dict:
    """Train `student` in place; returns {"steps", "best_step", "holdout_loss"}. `stop()` ends
    the training early; the best state so far is kept (`"stopped": true`).
    `hidden_states`: the outputs are an encoder's hidden states (see `loss`)."""
    params = [p for p in student.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    rate = HIDDEN_LEARNING_RATE if hidden_states else LEARNING_RATE
    optimizer = torch.optim.AdamW(params, lr=rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    n = len(fit)
    batch = min(batch, n)
    if fit.batch is not None:  # a fixed-batch graph: whole batches, the rest of an epoch waits
        batch = max(fit.batch, batch - batch % fit.batch)
    per_epoch = max(1, n // batch)
    check_every = max(1, min(per_epoch, 50))

    def held_out_loss() -> float:
        if holdout is None or not len(holdout):
            return math.nan
        with torch.no_grad():
            return float(loss(forward(student, holdout.xs, holdout.batch), holdout_teacher,
                              holdout.y, holdout.token_mask, hidden_states))

    best_loss, best_state, best_step = held_out_loss(), copy.deepcopy(student.state_dict()), 0
    start = time.monotonic()
    order = torch.randperm(n, generator=generator)
    position = step = 0
    while True:
        done = step / steps if steps is not None else (time.monotonic() - start) / seconds
        if done >= 1.0 or stop():
            break
        for group in optimizer.param_groups:
            group["lr"] = rate * 0.5 * (1.0 + math.cos(math.pi * done))
        if position + batch > n:
            order, position = torch.randperm(n, generator=generator), 0
        index = order[position:position + batch]
        position += batch
        out = forward(student, [x[index] for x in fit.xs], fit.batch)
        mask = fit.token_mask
        value = loss(out, [t[index] for t in fit_teacher], None if fit.y is None else fit.y[index],
                     None if mask is None else mask[index], hidden_states)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        step += 1
        if step % check_every == 0:
            current = held_out_loss()
            if not current >= best_loss:  # also replaces a NaN start (no hold-out)
                best_loss, best_step = current, step
                best_state = copy.deepcopy(student.state_dict())
            progress(f"distilling: step {step}", min(done, 1.0))
    current = held_out_loss()
    if not current >= best_loss:
        best_loss, best_state, best_step = current, copy.deepcopy(student.state_dict()), step
    student.load_state_dict(best_state)
    for p in params:
        p.requires_grad_(False)
    details = {"steps": step, "best_step": best_step, "holdout_loss": best_loss,
               **({"stopped": True} if stop() else {})}
    return details if fit.batch is None else {**details, "minibatch": batch}
