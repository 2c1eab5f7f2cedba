"""The sweep's shared path: one model loaded once, its dense figures and its calibration statistics computed once,
and any number of one-shot points pruned from those statistics, the model's weights restored after each.

Statistics come from ONE layer-by-layer pass over the DENSE model (`prune.calibration.layerwise.collect_stats`):
block k+1 sees the dense block k's outputs. `prune run` calibrates sequentially instead (block k+1 sees the pruned
block k, SparseGPT/Wanda's scheme), which cannot be shared across levels since the pruned blocks differ per level;
so a sweep's Wanda/SparseGPT numbers can differ slightly from `prune run`'s at the same level
(`shared_calibration: false` runs every point through the pipeline instead). Targets reading the same input
(q/k/v, gate/up) share one statistic. Statistics go to disk as they are completed, one safetensors file per
block, and are read back one target at a time, so memory holds the model plus one block's activations (while
gathering) or one target's Hessian (while pruning); the files also let a resumed sweep skip the pass.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from prune.calibration import layerwise as calibration
from prune.core.atomic import save_safetensors, staged_directory, write_json_atomic
from prune.core.config import MethodConfig
from prune.core.errors import UserInputError
from prune.data.text import interleave, prepare_extra, prepare_mix, prepare_source
from prune.masks.base import achieved_sparsity, attach_hard_masks, merge, wrappers
from prune.masks.targets import method_targets
from prune.methods.oneshot.method import prune_from_stats
from prune.methods.oneshot.stats import InputStats
from prune.methods.registry import get_declaration, get_method
from prune.methods.spec import masks_meta
from prune.models.blocks import in_out_features, weight_matrix
from prune.runs import run_dir
from prune.runs.loading import load_model
from prune.runs.placed import place, prepare_runtime
from prune.runs.recipe import Recipe
from prune.runs.report import run_report, timed, with_dense, write_report
from prune.sweep.recipe import Point, fingerprint, slug
from prune.tasks.causal_lm import calibration_use, data_report, measure

CALIBRATION_DIR = "calibration"
INDEX_FILE = "index.json"
NOTE = (
    "One-shot points are pruned from calibration statistics gathered once, in one layer-by-layer pass over the "
    "dense model, and reused for every level (`prune run` re-calibrates sequentially on the pruned blocks, so "
    "Wanda/SparseGPT figures can differ slightly; set shared_calibration: false for that). Modules reading the "
    "same input (q/k/v, gate/up) share one statistic."
)


class StatsStore:
    """Statistics of one model on disk: block files of tensors plus index.json ({name: [file, key]}), written last."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.index = json.loads((directory / INDEX_FILE).read_text())
        self._last: tuple[str, InputStats] | None = None

    def covers(self, source: str, targets: set[str], hessian: bool) -> bool:
        return (
            self.index["source"] == source
            and targets <= set(self.index["targets"])
            and (self.index["hessian"] or not hessian)
        )

    def get(self, name: str) -> InputStats:
        file, key = self.index["targets"][name]
        if self._last is None or self._last[0] != f"{file}/{key}":
            with safe_open(str(self.directory / file), framework="pt") as handle:
                tensors = {
                    part: handle.get_tensor(f"{key}/{part}")
                    for part in ("sq_norm", "tokens", "hessian")
                    if f"{key}/{part}" in handle.keys()
                }
            self._last = (f"{file}/{key}", InputStats.from_tensors(tensors))
        return self._last[1]


def _write_stats(directory: Path, index: dict, stats: dict[str, InputStats]) -> None:
    """The sink of collect_stats: one file per block; shared accumulators stored once under the first name."""
    file = f"part-{len(set(entry[0] for entry in index.values())):04d}.safetensors"
    tensors, leaders = {}, {}
    for name, accumulator in stats.items():
        leader = leaders.setdefault(id(accumulator), name)
        index[name] = [file, leader]
        if leader == name:
            tensors.update({f"{name}/{part}": tensor for part, tensor in accumulator.tensors().items()})
    save_safetensors(tensors, directory / file)


def dense_key(recipe: Recipe) -> str:
    """What the dense figures depend on: model, data, seed and the eval settings."""
    data = recipe.to_dict()
    return fingerprint(fingerprint(recipe.model, data["data"], recipe.seed), data["eval"])


class SharedModel:
    """One model for all of a sweep's shared points (and the sensitivity scan), loaded as the recipe's `runtime:`
    says (threads, dtype, device), like `prune run` loads it."""

    def __init__(self, recipe: Recipe):
        if recipe.runtime.offload != "none":
            raise UserInputError(
                f"runtime.offload: {recipe.runtime.offload} prunes block by block, and a sweep's shared calibration "
                "keeps the whole model loaded to prune every level from it; set shared_calibration: false (each "
                "point then runs like `prune run`, offloaded) or runtime.offload: none."
            )
        self.recipe = recipe
        self.runtime = prepare_runtime(recipe)
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
        model, self.tokenizer = load_model(recipe.model, self.runtime.dtype)
        self.model = place(model, self.runtime)
        data = recipe.data
        self.source_splits = prepare_source(self.tokenizer, data)
        self.extra = prepare_extra(
            self.tokenizer,
            recipe.eval.extra_texts,
            data.seq_len,
            heldout_fraction=data.heldout_fraction,
            validation_fraction=data.validation_fraction,
            stream_tokens=data.stream_tokens,
        )
        self.mix = prepare_mix(self.tokenizer, data, self.extra)
        # calibration and selection read these
        self.splits = interleave(self.source_splits, self.mix, data.seq_len, data.source_share)
        self.timings["load"] = round(time.perf_counter() - start, 2)
        self.store: StatsStore | None = None
        self.calibration_passes = 0

    @property
    def source(self) -> str:
        """What the statistics depend on: model, data and seed (not the method or the level)."""
        return fingerprint(self.recipe.model, self.recipe.to_dict()["data"], self.recipe.seed)

    def targets(self, config: MethodConfig) -> list[str]:
        return method_targets(self.model, config.targets, config.pattern, config.skip_incompatible)

    def dense(self, cache: Path, force: bool = False) -> dict:
        """The dense model's figures (cached in `cache` under a fingerprint of model, data and eval settings)."""
        key = dense_key(self.recipe)
        if cache.is_file() and not force:
            saved = json.loads(cache.read_text())
            if saved.get("fingerprint") == key:
                return saved["figures"]
        recipe = self.recipe
        figures = measure(
            self.model,
            self.tokenizer,
            self.splits,
            recipe.eval,
            recipe.data.seq_len,
            "dense",
            self.runtime.device,
            extra=self.extra,
        )
        self.timings["dense_eval"] = round(figures["seconds"], 2)
        write_json_atomic(cache, {"fingerprint": key, "model": recipe.model, "figures": figures})
        return figures

    def ensure_stats(
        self, root: Path, configs: list[MethodConfig], *, force: bool = False, progress: bool = True
    ) -> None:
        """Make `self.store` cover every target `configs` read statistics for: reuse a stored set that does, else
        run ONE layer-by-layer pass over the dense model for all of them. Configs whose targets cannot be selected
        are left out (their points fail with that reason later)."""
        needed: set[str] = set()
        hessian = False
        for config in configs:
            kind = get_declaration(config.name).statistics
            if kind == "none":
                continue
            try:
                needed.update(self.targets(config))
            except UserInputError:  # reported per point
                continue
            hessian = hessian or kind == "hessian"
        if not needed:
            return
        source = self.source
        if self.store is not None and self.store.covers(source, needed, hessian):
            return
        root.mkdir(parents=True, exist_ok=True)
        for candidate in sorted(root.glob(f"{slug(self.recipe.model)}-*")):
            if force:
                shutil.rmtree(candidate, ignore_errors=True)
            elif (candidate / INDEX_FILE).is_file():
                store = StatsStore(candidate)
                if store.covers(source, needed, hessian):
                    self.store = store
                    return
        start = time.perf_counter()
        final = root / f"{slug(self.recipe.model)}-{fingerprint(source, sorted(needed), hessian)}"
        with staged_directory(final) as staging:
            index: dict[str, list] = {}
            data = self.recipe.data
            blocks = self.splits.calibration_blocks(data.calibration_samples, data.seq_len, self.recipe.seed)
            calibration.collect_stats(
                self.model,
                sorted(needed),
                lambda module: InputStats(in_out_features(module)[0], hessian),
                blocks,
                sink=lambda stats: _write_stats(staging, index, stats),
                progress=progress,
            )
            seconds = round(time.perf_counter() - start, 2)
            meta = {
                "source": source,
                "hessian": hessian,
                "model": self.recipe.model,
                "seconds": seconds,
                "samples": data.calibration_samples,
                "seq_len": data.seq_len,
                "targets": index,
            }
            (staging / INDEX_FILE).write_text(json.dumps(meta, indent=1))
        self.calibration_passes += 1
        self.timings["calibration"] = self.timings.get("calibration", 0.0) + seconds
        self.store = StatsStore(final)

    @contextmanager
    def pruned(self, config: MethodConfig, names: list[str] | None = None):
        """Wrap `names` (default: the method's targets) with the masks `config` computes from the shared
        statistics, writing SparseGPT's re-fit weights in place; yields {name: keep mask}. On exit the original
        modules and weights are back, bit for bit, whether or not the caller merged the masks meanwhile."""
        names = self.targets(config) if names is None else names
        kind = get_declaration(config.name).statistics
        modules = dict(self.model.named_modules())
        originals: dict[str, torch.Tensor] = {}
        wrapped: dict[str, nn.Module] = {}
        try:
            masks = {}
            with torch.no_grad():
                for name in names:
                    module = modules[name]
                    stats = None if kind == "none" else self.store.get(name)
                    mask, new_weight = prune_from_stats(config, module, stats)
                    mask = mask.to(device="cpu", dtype=torch.bool)
                    if new_weight is not None:
                        weight = weight_matrix(module)
                        originals[name] = module.weight.detach().clone()
                        weight.copy_(new_weight.to(device=weight.device, dtype=weight.dtype).masked_fill(~mask, 0))
                    masks[name] = mask
            attach_hard_masks(self.model, {name: keep.to(modules[name].weight.device) for name, keep in masks.items()})
            wrapped = wrappers(self.model)
            yield masks
        finally:
            for name, wrapper in wrapped.items():
                self.model.set_submodule(name, wrapper.base)
            with torch.no_grad():
                for name, original in originals.items():
                    modules[name].weight.copy_(original)

    def run_point(self, point: Point, dense: dict | None, *, save: bool = True) -> dict:
        """Prune, measure and write one point's run directory; returns its report (the model is restored)."""
        recipe, config = point.recipe, point.recipe.method
        timings: dict[str, float] = {}
        with ExitStack() as stack:
            with timed(timings, "prune"):
                masks = stack.enter_context(self.pruned(config))
            achieved = achieved_sparsity(self.model)
            layers = {
                name: {"sparsity": 1.0 - keep.float().mean().item(), "weights": keep.numel()}
                for name, keep in masks.items()
            }
            (point.directory / "skipped.json").unlink(missing_ok=True)  # an earlier attempt's (runner.SKIPPED_FILE)
            directory = run_dir.claim(point.directory, recipe.to_dict(), overwrite=True)  # only a run's own files
            if save:
                with timed(timings, "save_masks"):
                    get_method(config.name).save(self.model, directory, config, masks_meta(recipe.model, config))
            merge(self.model)
            with timed(timings, "pruned_eval"):
                figures = measure(
                    self.model,
                    self.tokenizer,
                    self.splits,
                    recipe.eval,
                    recipe.data.seq_len,
                    point.label,
                    self.runtime.device,
                    extra=self.extra,
                )
        used = calibration_use(recipe.data) if get_method(config.name).needs_calibration else {}
        fields = {"data": data_report(recipe.data, self.source_splits, self.extra, used, mix=self.mix)}
        report = run_report(recipe, fields, achieved, figures, timings)
        finish_report(report, point, dense, layers, {"calibration": NOTE, **self.timings})
        write_report(directory, report)
        run_dir.release(directory)
        return report


def finish_report(report: dict, point: Point, dense: dict | None, layers: dict | None, shared: dict) -> dict:
    """Add what a sweep knows to a point's report: the dense figures, per-layer sparsity, sweep bookkeeping."""
    if dense is not None:
        with_dense(report, dense)
    if layers:
        report["layer_sparsity"] = layers
    report["sweep"] = {
        "path": point.path,
        "fingerprint": point.fingerprint,
        "label": point.label,
        "method_label": point.method_label,
        **shared,
    }
    return report


def layers_from_masks(directory: Path) -> dict | None:
    """Per-target sparsity from a run directory's masks.safetensors (None when it has none)."""
    from prune.masks.storage import read_masks

    try:
        masks, _ = read_masks(directory)
    except Exception:  # noqa: BLE001 - no masks, no per-layer figures
        return None
    return {
        name: {"sparsity": 1.0 - keep.float().mean().item(), "weights": keep.numel()} for name, keep in masks.items()
    }
