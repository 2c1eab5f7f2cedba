"""MaskPrune: learnable masks that prune Hugging Face models while their weights stay frozen.

The Python API (docs/python-api.md): what `prune run` does with a recipe, on any HF model. The common job is one
call:

    import prune

    model = prune.oneshot("smollm2-135m", prune.method_config("sparsegpt", sparsity="2:4"),
                          dataset=["some text", ...], num_calibration_samples=64, seq_len=512,
                          output_dir="smollm2-2of4")   # merged; config.json records the pruning

Learnable methods, peft-style, one step at a time:

    model, tokenizer = prune.load_model("smollm2-135m")              # or any causal LM you loaded yourself
    config = prune.method_config("nm_gumbel", sparsity="2:4", prior="magnitude")
    objective = prune.attach(model, config)                          # None for one-shot methods
    optimizer = torch.optim.AdamW(prune.mask_parameters(model) + objective.extra_parameters(), lr=1e-2)
    model.train()                                                    # soft masks; the weights stay frozen
    for step, batch in enumerate(batches):
        objective.begin_step(step, len(batches))
        loss = model(input_ids=batch, labels=batch).loss + objective.regularizer(model)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    model.eval()                                                     # hard masks
    prune.save_masks(model, "masks/")                                # the masks only, a few KB
    prune.load_masks(fresh_model, "masks/")                          # identical logits
    plain = prune.export(model)                                      # in place: a plain transformers model

`prune.train(model, objective, blocks, prune.TrainConfig(steps=...), "run_dir")` is the one trainer instead of
your own loop (checkpoints, resume, logging, accelerate). `prune.calibration_blocks(tokenizer, texts, samples,
seq_len)` turns text into the token blocks `attach` reads. `prune.recover(model, {"steps": 200}, blocks, "run_dir")`
then trains the pruned model's kept weights with its masks fixed (the recipe's `recover` section).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# The public names, each with the module it is imported from on first use (PEP 562, as transformers does):
# `import prune` and the CLI's start stay free of torch and transformers, so a bad recipe is refused at once.
# A new public name is one line here.
_EXPORTS: dict[str, str] = {
    "oneshot": "prune.runs.oneshot",
    "calibration_blocks": "prune.data.blocks",
    "to_semi_structured": "prune.models.semi_structured",
    "load_model": "prune.runs.api",
    "method_config": "prune.methods.registry",
    "attach": "prune.runs.api",
    "mask_parameters": "prune.runs.api",
    "train": "prune.runs.api",
    "TrainConfig": "prune.training.config",
    "save_masks": "prune.runs.api",
    "load_masks": "prune.runs.api",
    "export": "prune.runs.api",
    "recover": "prune.runs.api",
    "METHODS": "prune.methods.registry",
    "MethodConfig": "prune.core.config",
    "Objective": "prune.masks.base",
    "UserInputError": "prune.core.errors",
    "MagnitudeConfig": "prune.methods.oneshot.config",
    "WandaConfig": "prune.methods.oneshot.config",
    "SparseGPTConfig": "prune.methods.oneshot.config",
    "StructuredConfig": "prune.methods.structured.config",
    "NMGumbelConfig": "prune.methods.nm_gumbel.config",
    "VIBConfig": "prune.methods.vib.config",
    "BinaryConfig": "prune.methods.binary.config",
    "GatingConfig": "prune.methods.gating.config",
    "ActivationConfig": "prune.methods.activation.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A public name of `_EXPORTS`, imported from its module the first time it is read (then kept here)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prune' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
