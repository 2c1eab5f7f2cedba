"""The recipe's `runtime:` section applied to a run: checked before anything is written, then the model placed.

`prepare_runtime` applies the thread count, resolves device and dtype, refuses what cannot work (a missing
device, float16 on a CPU, offload with a method that does not prune block by block, a .bin-only checkpoint to
stream) and runs the preflight memory check, all before the run directory is claimed. `place` puts a loaded
model where `runtime.offload` says; `attach_kwargs` gives one-shot methods their block placement. `run_streamed`
is the whole run under `runtime.offload: disk`: the model is never whole in memory, so it is pruned and
evaluated block by block, and what needs the whole model (lm-eval tasks, latency, FLOPs) is skipped with the
reason in the report.
"""
from __future__ import annotations

import resource
from pathlib import Path

import torch
from transformers.utils import cached_file

from prune.calibration.placement import OnDevice
from prune.calibration.streaming import skeleton, stream_perplexity, stream_prune
from prune.core.atomic import staged_directory
from prune.core.errors import UserInputError
from prune.data.text import interleave, prepare_mix, prepare_source
from prune.methods.oneshot.method import make_stats_for, prune_from_stats, targets_of
from prune.methods.registry import METHODS, get_method
from prune.methods.spec import MethodSpec
from prune.models import loading
from prune.models.preflight import preflight
from prune.models.runtime import Runtime, apply_threads, resolve_runtime
from prune.models.shards import ShardReader, shard_files
from prune.runs import run_dir
from prune.runs.recipe import Recipe
from prune.runs.report import write_report
from prune.training.sharded import check_fsdp, fsdp_requested

STREAM_SKIPPED = "runtime.offload: disk keeps one block in memory; {what} needs the whole model (use offload: cpu)"


def local_model_dir(spec: str) -> Path | None:
    """The directory holding the model's config.json, when it is on this machine (alias, directory, run, cache)."""
    candidates = [loading.cache_root() / "models" / spec] if spec in loading.ALIASES else []
    path = Path(spec).expanduser()
    candidates += [path, path / run_dir.MODEL_DIR]
    for candidate in candidates:
        if loading.is_model_dir(candidate):
            return candidate
    try:
        return Path(cached_file(spec, "config.json", local_files_only=True)).parent
    except (OSError, ValueError):
        return None


def prepare_runtime(recipe: Recipe) -> Runtime:
    """Apply and check `recipe.runtime` (nothing is loaded or written here)."""
    apply_threads(recipe.runtime)
    model_dir = local_model_dir(recipe.model)
    runtime = resolve_runtime(recipe.runtime, model_dir / "config.json" if model_dir else None)
    spec = get_method(recipe.method.name)
    if runtime.offload != "none" and not spec.block_by_block:
        placed = ", ".join(name for name, method in METHODS.items() if method.block_by_block)
        raise UserInputError(
            f"runtime.offload: {runtime.offload} prunes block by block, which methods {placed} do; "
            f"{recipe.method.name!r} needs the whole model on the device; use runtime.offload: none."
        )
    if runtime.streams:
        if model_dir is None:
            raise UserInputError(
                f"runtime.offload: disk streams a checkpoint on this machine, and {recipe.model!r} is not one; "
                "download it first (or pass its local directory)."
            )
        shard_files(model_dir)
    check_fsdp(spec.name, spec.fsdp, runtime.device)
    if model_dir is not None and recipe.task == "causal-lm":
        preflight(model_dir, runtime)
    return runtime


def place(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """offload none: the whole model on the device; cpu/disk: it stays in CPU memory, blocks visit the device.
    Under an FSDP launch it stays in CPU memory too: accelerate puts only each process's shard on the device."""
    return model.to(runtime.device) if runtime.offload == "none" and not fsdp_requested() else model


def attach_kwargs(spec: MethodSpec, runtime: Runtime) -> dict:
    return {"placement": OnDevice(runtime.device)} if runtime.offload == "cpu" and spec.block_by_block else {}


def run_streamed(recipe: Recipe, runtime: Runtime, directory: Path, timings: dict, timed, claim) -> dict:
    """The run under runtime.offload: disk: model/ written shard by shard, perplexity block by block.
    `claim()` claims the output once the inputs are loaded, before anything is written."""
    model_dir = local_model_dir(recipe.model)
    data, config, seq_len = recipe.data, recipe.method, recipe.data.seq_len
    with timed(timings, "load"):
        tokenizer = loading.load_tokenizer(str(model_dir))
        splits = interleave(prepare_source(tokenizer, data), prepare_mix(tokenizer, data), seq_len)
        calibration = splits.calibration_blocks(data.calibration_samples, seq_len, recipe.seed)
    heldout = splits.test_blocks(seq_len)
    claim()
    figures = {"device": runtime.device, "dtype": runtime.dtype}
    report: dict = {"model": recipe.model, "method": config.name, "recipe_fingerprint": recipe.fingerprint()}
    if recipe.eval.dense_baseline and recipe.eval.perplexity:
        with timed(timings, "dense_eval"):
            report["dense"] = {"perplexity": stream_perplexity(model_dir, heldout, **figures)}
    target = directory / run_dir.MODEL_DIR
    with staged_directory(target) as staging, timed(timings, "prune"):
        stream_prune(model_dir, staging, targets_of(config), lambda name, module, stats:
                     prune_from_stats(config, module, stats), make_stats_for(config), calibration, **figures)
        tokenizer.save_pretrained(staging)
    if recipe.eval.perplexity:
        with timed(timings, "pruned_eval"):
            report["perplexity"] = stream_perplexity(target, heldout, **figures)
    params, achieved = _sparsity_figures(target, config, runtime)
    report.update({
        "sparsity": {"target": config.target_label(), "achieved": achieved},
        "params": params,
        "skipped": _skipped(recipe),
        "timings": timings,
        "memory": {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    })
    if "dense" in report:
        report["dense"]["params"] = params | {"nonzero": params["total"]}
        report["dense"]["seconds"] = timings["dense_eval"]
        report["perplexity"]["dense"] = report["dense"]["perplexity"]["value"]
    write_report(directory, report)
    return report


def _skipped(recipe: Recipe) -> dict[str, str]:
    """What the eval section asked for that a streamed run cannot measure, and why (never silently)."""
    wanted = {"accuracy": bool(recipe.eval.tasks), "latency": recipe.eval.latency, "flops": recipe.eval.flops,
              "semi_structured_kernel": recipe.eval.semi_structured_kernel}
    skipped = {what: STREAM_SKIPPED.format(what=what) for what, asked in wanted.items() if asked}
    skipped["masks"] = "masks.safetensors is not written under offload: disk; model/ holds the pruned weights"
    return skipped


def _sparsity_figures(model_dir: Path, config, runtime: Runtime) -> tuple[dict, float]:
    """Parameter counts of the written checkpoint and the achieved sparsity of the targets, read tensor by tensor."""
    reader = ShardReader(model_dir)
    targets = {name + ".weight" for name in targets_of(config)(skeleton(model_dir, runtime.dtype))}
    total = nonzero = target_total = target_zero = 0
    for name in reader.specs():
        tensor = reader.get_tensor(name)
        count, zeros = tensor.numel(), tensor.numel() - int(tensor.count_nonzero())
        total, nonzero = total + count, nonzero + count - zeros
        if name in targets:
            target_total, target_zero = target_total + count, target_zero + zeros
    return {"total": total, "nonzero": nonzero}, target_zero / max(target_total, 1)
