"""MaskPrune: learnable masks that prune Hugging Face models while their weights stay frozen.

The Python API (docs/api.md): what `prune run` does with a recipe, on any HF model. The common job is one call:

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
seq_len)` turns text into the token blocks `attach` reads.
"""

from __future__ import annotations

from prune.core.config import MethodConfig
from prune.core.errors import UserInputError
from prune.data.blocks import calibration_blocks
from prune.masks.base import Objective
from prune.methods.binary.method import BinaryConfig
from prune.methods.gating.method import GatingConfig
from prune.methods.nm_gumbel.method import NMGumbelConfig
from prune.methods.oneshot.method import MagnitudeConfig, SparseGPTConfig, WandaConfig
from prune.methods.registry import METHODS
from prune.methods.structured.method import StructuredConfig
from prune.methods.vib.method import VIBConfig
from prune.models.semi_structured import to_semi_structured
from prune.runs.api import attach, export, load_masks, load_model, mask_parameters, method_config, save_masks, train
from prune.runs.oneshot import oneshot
from prune.training.config import TrainConfig

__all__ = [
    "oneshot",
    "calibration_blocks",
    "to_semi_structured",
    "load_model",
    "method_config",
    "attach",
    "mask_parameters",
    "train",
    "TrainConfig",
    "save_masks",
    "load_masks",
    "export",
    "METHODS",
    "MethodConfig",
    "Objective",
    "UserInputError",
    "MagnitudeConfig",
    "WandaConfig",
    "SparseGPTConfig",
    "StructuredConfig",
    "NMGumbelConfig",
    "VIBConfig",
    "BinaryConfig",
    "GatingConfig",
]
