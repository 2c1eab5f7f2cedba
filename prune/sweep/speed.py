"""The speed axis of a sweep (`speed:` in the sweep file): the dense model and every finished point's saved model,
timed in turn in this one process and weighed on disk.

- Models: the dense model (the points' base model, in their runtime.dtype) and each point's model as
  `prune.load_model(point directory)` gives it: the exported model/ (structured and depth: physically smaller;
  SparseGPT 2:4: a dense tensor holding zeros, so dense speed on a CPU) or the model a method rebuilds from the
  base model and its own files (activation sparsity: its sparse decode path).
- Timing: `eval.latency.alternated`, every model once per round, `rounds` rounds after one warm-up round, torch on
  `threads` threads: a neighbour's load on a shared CPU slows all of them alike. Medians over rounds; a speedup is
  the dense model's median over the point's.
- Bytes: the safetensors files of the point's model/; a rebuilt model counts the base model (the dense model
  saved the same way, into a temporary directory) and the run's own safetensors files (activation: thresholds).

Every model of one base model is held in memory at once (SmolLM2-135M in float32: about 0.5 GB each). speed.json
keeps the figures per base model under a fingerprint of the settings and the timed points: a resumed sweep whose
points did not change reuses them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from eval.latency import alternated, measure_latency
from prune.core.atomic import write_json_atomic
from prune.core.errors import UserInputError
from prune.methods.registry import saved_file_pairs
from prune.runs import run_dir
from prune.runs.loading import load_model
from prune.runs.placed import prepare_runtime
from prune.sweep.recipe import Point, SpeedConfig, fingerprint

SPEED_FILE = "speed.json"
DENSE = "dense"


def saved_bytes(directory: Path) -> int:
    """The bytes of the safetensors files directly in `directory` (every shard of a saved model)."""
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def dense_bytes(model: nn.Module) -> int:
    """What the dense model weighs saved as the points' models are (save_pretrained, safetensors)."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return saved_bytes(Path(directory))


def point_bytes(directory: Path, base_bytes: int) -> int:
    """A point's model on disk: its model/ (the base model when it has none), plus the tensors a method with no
    plain-checkpoint form rebuilds it from (thresholds, predictors; a recovered activation point has both). The
    masks files of a plain checkpoint only describe it, and are not counted."""
    model_dir = directory / run_dir.MODEL_DIR
    weights = saved_bytes(model_dir) if model_dir.is_dir() else base_bytes
    rebuilt_from = [directory / tensors for tensors, _ in saved_file_pairs()]
    return weights + sum(path.stat().st_size for path in rebuilt_from if path.is_file())


def measure_speed(
    path: Path, settings: SpeedConfig, points: list[Point], *, force: bool, write: Callable[[str], None]
) -> dict:
    """speed.json's entry for the finished `points` of one base model: `figures` per row key (`dense:<model>` and
    each point's label: decode_ms_per_token, prefill_tokens_per_s, decode_speedup, prefill_speedup,
    model_bytes), the settings, dtype, device and load average. Reused from `path` when the settings and points
    are those it was measured with."""
    recipe = points[0].recipe
    model_name = recipe.model
    runtime = prepare_runtime(recipe)
    key = fingerprint(settings.model_dump(), str(runtime.dtype), sorted((p.label, p.fingerprint) for p in points))
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if not force and saved.get(model_name, {}).get("fingerprint") == key:
        return saved[model_name]
    dense, _ = load_model(model_name, runtime.dtype)
    models = {f"{DENSE}:{model_name}": dense.to(runtime.device)}
    for point in points:
        try:
            model, _ = load_model(str(point.directory), runtime.dtype)
        except UserInputError as error:  # one unreadable point must not lose the others' figures
            write(f"speed: {point.label} not timed: {error}")
            continue
        models[point.label] = model.to(runtime.device)
    base_bytes = dense_bytes(dense)
    sizes = {f"{DENSE}:{model_name}": base_bytes}
    sizes.update({p.label: point_bytes(p.directory, base_bytes) for p in points if p.label in models})
    write(
        f"speed: {len(models)} models of {model_name} timed in turn, {settings.rounds} round(s) on "
        f"{settings.threads} thread(s)"
    )
    load_before = os.getloadavg()
    medians = _timed(models, settings)
    reference = medians[f"{DENSE}:{model_name}"]
    figures = {
        label: {
            **values,
            "decode_speedup": reference["decode_ms_per_token"] / values["decode_ms_per_token"],
            "prefill_speedup": values["prefill_tokens_per_s"] / reference["prefill_tokens_per_s"],
            "model_bytes": sizes[label],
        }
        for label, values in medians.items()
    }
    saved[model_name] = {
        "fingerprint": key,
        "settings": settings.model_dump(),
        "dtype": str(runtime.dtype),
        "device": str(runtime.device),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "figures": figures,
    }
    write_json_atomic(path, saved)
    return saved[model_name]


def describe(model: str, entry: dict) -> str:
    """One line for sweep.md: how `model`'s speed figures were measured."""
    settings, load = entry["settings"], entry["load_average"]
    return (
        f"Speed of {model} and its points: every model timed in turn in one process, {settings['rounds']} rounds "
        f"after a warm-up round, {settings['threads']} thread(s), {entry['dtype'].removeprefix('torch.')} on "
        f"{entry['device']}, batch 1: prefill of {settings['prompt_len']} tokens, then {settings['decode_tokens']} "
        f"tokens decoded with the KV cache; medians over rounds. Load average {load['before'][0]:.1f} before, "
        f"{load['after'][0]:.1f} after."
    )


def _timed(models: dict[str, nn.Module], settings: SpeedConfig) -> dict[str, dict[str, float]]:
    """eval.latency.alternated over `models` on `settings.threads` threads (the process's count restored after)."""

    def timer(model: nn.Module):
        return lambda: measure_latency(
            model, prompt_len=settings.prompt_len, decode_tokens=settings.decode_tokens, repeats=1, warmup=0
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return alternated({label: timer(model) for label, model in models.items()}, settings.rounds)
    finally:
        torch.set_num_threads(threads)
