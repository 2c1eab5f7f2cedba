"""A non-finite loss, gradient or parameter stops training before anything of that step is saved.

One NaN spreads to every mask parameter within a step or two; training on would checkpoint NaN masks, keep
them as the run's result (every N:M group collapses to candidate 0) and print a meaningless perplexity. So
every step checks its loss and gradients before the update and the parameters after it, and the log records
before they are written; the first non-finite value raises `TrainingDiverged`, which the CLI turns into exit
code 1 (it is an eval.metric_errors.NonFiniteError). The checkpoints, best masks and log lines written before
stay as they were: they all hold finite values. With several processes they agree on every verdict (a NaN loss on one
rank, a NaN in one rank's FSDP shard), so that all of them stop at the same point instead of some waiting in a
collective for the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from eval.metric_errors import NonFiniteError


class TrainingDiverged(NonFiniteError):
    """Training produced a NaN or infinite value; the message names the step and the checkpoint kept."""


class FiniteGuard:
    """Checks one run's values. `saved_step` (kept current by the trainer) is the checkpoint that stays in force;
    `any_process(flag)` says whether a flag holds on any process (the flag itself with one process); `shaping`
    names the run's other settings that shape the loss (the method's keys changed from their defaults), which the
    advice names beside the learning rate of `section` (the recipe section of the training stage: train, recover)."""

    def __init__(
        self,
        checkpoints: Path,
        lr: float,
        saved_step: int | None,
        any_process: Callable[[bool], bool],
        shaping: Sequence[str] = (),
        section: str = "train",
    ):
        self.checkpoints, self.lr, self.saved_step, self.any_process = checkpoints, lr, saved_step, any_process
        self.shaping, self.section = list(shaping), section
        self.updated = False  # whether this process applied an update yet: before one, the lr is not the cause

    def error(self, step: int, what: str) -> TrainingDiverged:
        kept = (
            f"the checkpoint of step {self.saved_step} in {self.checkpoints} is kept"
            if self.saved_step is not None
            else "no checkpoint had been written"
        )
        settings = ", ".join(self.shaping) or "the method's settings (method.*)"
        if not self.updated:
            advice = (
                f"No update had been applied yet, so {self.section}.lr played no part: the starting masks' forward or "
                f"gradient produced it. Check the settings that shape them ({settings}) and runtime.dtype (float32 "
                "does not overflow where bfloat16 can)"
            )
        else:
            advice = (
                f"The updates diverged: lower {self.section}.lr (now {self.lr:g}), keep gradient clipping on "
                f"({self.section}.max_grad_norm), or check the settings that shape the loss ({settings})"
            )
        return TrainingDiverged(
            f"training stopped at step {step}: {what}. Nothing of step {step} was saved; {kept}. {advice}; then "
            "start the run over with --overwrite."
        )

    def before_update(self, step: int, loss: float, params: dict[str, Tensor], clipped_norm: Tensor | None) -> None:
        """`loss`: the step's loss summed over its micro-batches (non-finite when any was); `clipped_norm`: what
        gradient clipping returned (None: clipping is off, each gradient is checked)."""
        gradient = _gradient_problem(params, clipped_norm)  # always computed: the norm may be a collective
        self._stop_if(step, f"the loss is {loss}" if not math.isfinite(loss) else gradient)

    def after_update(self, step: int, params: dict[str, Tensor]) -> None:
        self.updated = True
        name = _first_nonfinite(params)
        self._stop_if(step, f"the update made {name} non-finite" if name is not None else None)

    def record(self, step: int, record: dict) -> None:
        """A log line holds only finite numbers (json would write NaN and Infinity, which are not JSON). Main
        process only, after the checks above: a last guard of the file."""
        bad = [key for key, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
        if bad:
            raise self.error(step, ", ".join(f"{key} is {record[key]}" for key in bad))

    def _stop_if(self, step: int, problem: str | None) -> None:
        if self.any_process(problem is not None):
            raise self.error(step, problem or "another process met a non-finite value")


def _gradient_problem(params: dict[str, Tensor], clipped_norm: Tensor | None) -> str | None:
    if clipped_norm is not None:  # a norm is NaN or infinite when an element is
        norm = clipped_norm.full_tensor() if isinstance(clipped_norm, DTensor) else clipped_norm
        return None if torch.isfinite(norm) else f"the gradient norm of the trained parameters is {norm.item()}"
    name = _first_nonfinite({name: param.grad for name, param in params.items() if param.grad is not None})
    return None if name is None else f"the gradient of {name} is not finite"


@torch.no_grad()
def _first_nonfinite(tensors: dict[str, Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity in this process's part (a DTensor's shard), None
    if all are finite. Fast path: a sum is NaN or infinite whenever an element is, and a sum is far cheaper on CPU
    than a max-abs or isfinite pass; only a non-finite sum (also reached by overflow of huge finite values) looks
    at each tensor."""
    local = {name: tensor.to_local() if isinstance(tensor, DTensor) else tensor for name, tensor in tensors.items()}
    if not local or torch.isfinite(sum(tensor.sum(dtype=torch.float32) for tensor in local.values())):
        return None
    return next((name for name, tensor in local.items() if not torch.isfinite(tensor).all()), None)
