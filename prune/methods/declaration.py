"""What the recipe needs to know about a method, importable without torch: its name, config class, kind and tasks.

A method package declares itself in its torch-free `config.py` (beside its config class) and implements itself in
`method.py` (its MethodSpec: attach, save/load/export hooks, which import torch). The registry lists the
declarations, so validating a recipe (and refusing a bad one) never waits for torch; `spec` says where the
MethodSpec lives, imported when a run needs it (prune.methods.registry.get_method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prune.core.config import MethodConfig


@dataclass(frozen=True)
class MethodDeclaration:
    """A registered method as the recipe sees it. `kind`: oneshot (masks decided at once) or learnable (masks
    trained with the one trainer). `tasks`: the kinds of run the method supports (prune.tasks: causal-lm,
    zero-shot-classification, image-classification); a recipe pairing it with another task is refused when it is
    validated. `spec`: "module:NAME" of its MethodSpec (e.g. "prune.methods.oneshot.method:WANDA").

    `statistics`: what a one-shot method's per-target rule reads from the calibration inputs besides the weight,
    for methods that can prune from statistics gathered once on the dense model (a sweep gathers them in one pass
    and prunes every level from them): "none" (magnitude), "norms" (each input feature's sum of squares: Wanda),
    "hessian" (SparseGPT's X^T X). None: the method cannot (it runs through the pipeline).

    `plain_model`: the pruned model has a plain checkpoint form (False for per-input gating and activation
    sparsity, whose MethodSpec restores it from the run directory instead), which recovery training needs unless
    `masks_inputs`: the masks zero what enters the modules (activation sparsity's thresholds), so the weights can
    train with them in the forward, and recovery saves the trained weights as model/ beside them.

    `saved_files`: the (tensors, description JSON) pair its `save` writes into a run directory when that is not
    the weight masks' masks.safetensors + masks.json (prune.masks.storage): the run directory's own files
    (`--overwrite` removes them) and the descriptions `prune.load_masks` recognises are read from here."""

    name: str
    config_class: type[MethodConfig]
    kind: Literal["oneshot", "learnable"]
    spec: str
    tasks: frozenset[str] = frozenset({"causal-lm"})
    statistics: Literal["none", "norms", "hessian"] | None = None
    plain_model: bool = True
    saved_files: tuple[str, str] | None = None
    masks_inputs: bool = False
