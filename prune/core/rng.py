"""Every random generator a run draws from, in one place: seeded from the recipe, captured and restored whole.

A run draws from torch's CPU generator (initial logits with `prior: none`, low-rank predictor weights, the seeds
of the Gumbel noise, VIB's gate samples, gradient dropout), from its CUDA device's generator when it has one
(samples drawn on the GPU), and from Python's `random`. numpy's generator is never drawn from during a run, so
it is neither seeded nor saved. Data order does not depend on any of these: each epoch's permutation comes from
its own generator seeded with `seed + epoch` (prune.training.trainer.batch_indices).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

TORCH_KEY, CUDA_KEY = "rng.torch", "rng.cuda"


def seed_all(seed: int) -> None:
    """Seed every generator a run draws from (torch's CPU and CUDA generators, Python's random)."""
    random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


@dataclass(frozen=True)
class RngState:
    """The state of every generator a run draws from (CUDA: the current device's, or None without CUDA)."""

    torch_cpu: Tensor
    cuda: Tensor | None
    python: tuple


def capture() -> RngState:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return RngState(torch.get_rng_state(), cuda, random.getstate())


def restore(state: RngState) -> None:
    """Put every generator back; a CUDA state is skipped on a machine without CUDA (a GPU run resumed on CPU)."""
    torch.set_rng_state(state.torch_cpu)
    if state.cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.cuda)
    random.setstate(state.python)


def to_checkpoint(state: RngState) -> tuple[dict[str, Tensor], list]:
    """(tensors for safetensors, Python's state as JSON): no pickle."""
    tensors = {TORCH_KEY: state.torch_cpu}
    if state.cuda is not None:
        tensors[CUDA_KEY] = state.cuda
    version, internal, gauss = state.python
    return tensors, [version, list(internal), gauss]


def checkpoint_layout(saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """The generator states a checkpoint must hold, shaped as on this machine: the CPU state, and the CUDA state
    when one was saved (on a machine without CUDA it is kept as saved, and `restore` skips it)."""
    layout = {TORCH_KEY: torch.get_rng_state()}
    if CUDA_KEY in saved:
        layout[CUDA_KEY] = torch.cuda.get_rng_state() if torch.cuda.is_available() else saved[CUDA_KEY]
    return layout


def from_checkpoint(tensors: dict[str, Tensor], python: list) -> RngState:
    """The inverse of `to_checkpoint`; raises ValueError or TypeError on a malformed Python state."""
    version, internal, gauss = python
    return RngState(tensors[TORCH_KEY], tensors.get(CUDA_KEY), (version, tuple(internal), gauss))
