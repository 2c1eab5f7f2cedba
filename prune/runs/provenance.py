"""What a pruned checkpoint says about itself: a `pruning` entry in its config.json.

A merged 2:4 model is a dense checkpoint like any other; only its zeros tell it apart, and no tool counts them
before it loads the weights. So every model MaskPrune exports (`prune run`'s model/, `prune export`, the Python
API's `export` and `oneshot`) records how it was pruned in config.json:

    "pruning": {"tool": "maskprune", "version": "0.1.0", "method": "sparsegpt", "sparsity": "2:4",
                "targets": null, "config": {... the whole method section ...}, "recovered": null}

`sparsity` is what the method aimed at: "N:M" (N of every M weights kept), a fraction removed (e.g. "0.5"), or a
structural method's budget (e.g. "params 0.5": the model is physically smaller). `targets` are the method's glob
patterns over module names; null means its default (every linear inside the decoder blocks). `recovered`: the
mode of recovery training after pruning ("lora" or "full", prune.recovery: the kept weights trained, the zeros
the same), null when the weights are the method's own. Plain transformers
loads such a config.json unchanged: an unknown key becomes an attribute of the config (`config.pruning`) and is
written again by its next save_pretrained.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from torch import nn

from prune.core.atomic import write_json_atomic
from prune.core.config import MethodConfig
from prune.core.errors import UserInputError

RECORD_KEY = "pruning"
CONFIG_FILE = "config.json"


def maskprune_version() -> str:
    """The installed MaskPrune's version ("unknown" for a source tree that was never installed)."""
    try:
        return version("maskprune")
    except PackageNotFoundError:
        return "unknown"


def pruning_record(config: MethodConfig, recovered: str | None = None) -> dict:
    """The `pruning` entry of an exported config.json, for a model pruned with `config` (and recovered in mode
    `recovered`)."""
    return {
        "tool": "maskprune",
        "version": maskprune_version(),
        "method": config.name,
        "sparsity": config.target_label(),
        "targets": config.targets,
        "config": config.model_dump(mode="json"),
        "recovered": recovered,
    }


def mark_pruned(model: nn.Module, config: MethodConfig, recovered: str | None = None) -> None:
    """Record the pruning on the model's Hugging Face config, so that its save_pretrained writes it."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None:
        setattr(hf_config, RECORD_KEY, pruning_record(config, recovered))


def write_record(model_dir: Path, config: MethodConfig, recovered: str | None = None) -> None:
    """Add the record to a checkpoint already on disk (a model/ streamed shard by shard has no config object in
    memory to carry it), replacing config.json atomically."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(f"{path} cannot be read ({error}); rerun to write the model again.") from None
    content[RECORD_KEY] = pruning_record(config, recovered)
    write_json_atomic(path, content)
