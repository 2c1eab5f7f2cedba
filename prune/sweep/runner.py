"""`prune sweep`: one base recipe, a grid of methods x sparsity levels (x models), one comparison directory.

    prune sweep recipes/sweeps/smollm2-135m.yaml            # the grid; prints each row as its point finishes
    prune sweep recipes/sweeps/smollm2-135m.yaml --sensitivity   # which blocks / layer types hurt most

Shared work is done once per model: the model is loaded once, the dense baseline evaluated once, and for the
one-shot methods that can prune from statistics (magnitude, Wanda, SparseGPT) the calibration statistics are
gathered in ONE layer-by-layer pass over the dense model and reused for every level (see
`prune.sweep.shared`). This differs from `prune run`, whose Wanda/SparseGPT calibrate sequentially (block k+1
sees the pruned block k): sequential statistics depend on the level and cannot be shared, so sweep figures for
those methods can differ slightly from single runs; `shared_calibration: false` runs every point through
`prune.runs.pipeline.run` instead. Every other method (the learnable ones) always runs through the pipeline, one
point at a time. Each point restores the model's weights before the next: masks never touch base weights, and
SparseGPT's re-fit weights are written for the point and put back afterwards.

The sweep directory:

    points/<method>-<level>/   a run directory per point: recipe.yaml, report.json (+ the sweep fingerprint),
                               report.md, masks.safetensors; or skipped.json (why the point cannot run)
    dense/<model>.json         the dense figures;  calibration/<model>-<hash>/  the shared statistics
    sweep.csv, sweep.json, sweep.md, perplexity_vs_sparsity.png, accuracy_vs_flops.png, layers.png
    sensitivity/               sensitivity.{json,csv,md,png} (with --sensitivity)

Resumable: a point whose report.json carries the same fingerprint (its recipe's fingerprint and the path it
took) is not recomputed; a changed point is. Points are written atomically (report.json last). `force=True`
recomputes everything. A point whose method does not support its level (the method's config validation, or
N:M groups that do not tile a layer) is a skipped row with the reason, not a crash; NaN/inf results are a
failed row.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from eval.metric_errors import NonFiniteError
from eval.tables import render_markdown_table, render_table
from prune.core.atomic import write_json_atomic, write_text_atomic
from prune.core.errors import UserInputError
from prune.core.extras import require
from prune.core.sparsity import parse_sparsity
from prune.methods.registry import METHODS, get_method
from prune.runs.preflight import check_needs
from prune.runs.recipe import Recipe, parse_recipe
from prune.runs.report import write_report
from prune.sweep import compare, output_dir, speed
from prune.sweep.output_dir import OutputKind
from prune.sweep.recipe import (
    POINTS_DIR,
    Point,
    SweepRecipe,
    _method_entry,
    expand_points,
    fingerprint,
    models_of,
    point_raw,
    slug,
    wants_dense,
)
from prune.sweep.shared import CALIBRATION_DIR, NOTE, SharedModel, dense_key, finish_report, layers_from_masks

SKIPPED_FILE = "skipped.json"
SENSITIVITY_DIR = "sensitivity"
SWEEP = OutputKind(
    ".maskprune-sweep",
    "sweep",
    "prune sweep",
    frozenset(
        {
            "sweep.csv",
            "sweep.json",
            "sweep.md",
            *compare.PLOTS,
            POINTS_DIR,
            "dense",
            CALIBRATION_DIR,
            SENSITIVITY_DIR,
            speed.SPEED_FILE,
        }
    ),
)


def _finished(point: Point) -> dict | None:
    path = point.directory / compare.REPORT
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return report if report.get("sweep", {}).get("fingerprint") == point.fingerprint else None


def _marker(point: Point) -> dict | None:
    path = point.directory / SKIPPED_FILE
    if not path.is_file() or (point.directory / compare.REPORT).is_file():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("fingerprint") == point.fingerprint else None


def _cached_dense(path: Path, recipe: Recipe) -> dict | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["figures"] if saved.get("fingerprint") == dense_key(recipe) else None


class _Sweep:
    def __init__(self, sweep: SweepRecipe, base: dict, force: bool, progress: bool, write: Callable[[str], None]):
        self.sweep, self.base, self.force, self.progress = sweep, base, force, progress
        self.output = Path(sweep.output)
        self.points = expand_points(sweep, base)
        self.models = models_of(sweep, base)
        tasks = next((list(p.recipe.eval.tasks) for p in self.points if p.recipe), [])
        texts = next((list(p.recipe.eval.extra_texts) for p in self.points if p.recipe), [])
        self.table = compare.LiveTable(
            compare.display_columns(tasks, len(self.models) > 1, best=False, texts=texts, speed=bool(sweep.speed)),
            write,
        )
        self.write = write
        self.rows: dict[str, dict] = {}
        self.timings: dict[str, dict] = {}
        self.counts = {"computed": 0, "resumed": 0, "skipped": 0, "failed": 0}
        self.calibration_passes = 0
        self.speed_notes: list[str] = []

    def emit(self, key: str, row: dict) -> None:
        self.rows[key] = row
        dense = self.rows.get(f"dense:{row['model']}", {}).get("perplexity")
        self.table.row(compare.display_row(row, dense))

    def skip(self, point: Point, reason: str, status: str = "skipped", persist: bool = True) -> None:
        self.counts["failed" if status == "failed" else "skipped"] += 1
        if persist:
            write_json_atomic(
                point.directory / SKIPPED_FILE, {"fingerprint": point.fingerprint, "status": status, "reason": reason}
            )
        self.emit(
            point.label,
            compare.skipped_row(point.model, point.method_label, point.sparsity, reason, status, point.directory),
        )

    def run(self) -> dict:
        require("matplotlib", "the sweep's plots (perplexity_vs_sparsity.png, accuracy_vs_flops.png, layers.png)")
        for point in self.points:
            if point.recipe is not None:
                check_needs(point.recipe, get_method(point.recipe.method.name))
        start = time.perf_counter()
        runnable = [point for point in self.points if point.error is None]
        if not runnable:
            reasons = "; ".join(dict.fromkeys(f"{p.label}: {p.error}" for p in self.points))
            raise UserInputError(f"no point of the sweep can run ({reasons[:600]}). Fix the grid or the base recipe.")
        created = output_dir.claim(self.output, SWEEP, existing_ok=True)
        try:
            return self._run(start)
        except UserInputError:  # refused before any point was written: nothing left behind
            output_dir.release_if_unused(self.output, SWEEP, created)
            raise

    def _run(self, start: float) -> dict:
        pending = []
        for point in self.points:
            if point.error:
                self.skip(point, point.error, persist=False)
            elif not self.force and (report := _finished(point)) is not None:
                self.counts["resumed"] += 1
                self.emit(point.label, compare.report_row(report, point.directory))
            elif not self.force and (marker := _marker(point)) is not None:
                self.skip(point, marker["reason"], marker["status"], persist=False)
            else:
                pending.append(point)
        for model in self.models:
            self._run_model(model, [p for p in pending if p.model == model])
        if self.sweep.speed is not None:
            self._speed()
        rows = compare.mark_verdicts(
            compare.mark_best(compare.sort_rows(list(self.rows.values()), [p.method_label for p in self.points]))
        )
        rows = compare.mark_pareto(rows)
        total = round(time.perf_counter() - start, 2)
        meta = self._meta(total)
        notes = self._notes(total)
        written = compare.write_outputs(
            self.output, rows, title=f"Sweep {Path(self.sweep.output).name}", notes=notes, meta={**meta, "notes": notes}
        )
        return {"rows": rows, "written": written, **meta}

    def _run_model(self, model: str, pending: list[Point]) -> None:
        points = [p for p in self.points if p.model == model and p.recipe is not None]
        if not points:
            return
        recipe = points[0].recipe
        dense_file = self.output / "dense" / f"{slug(model)}.json"
        want_dense = wants_dense(self.sweep, self.base)
        dense = _cached_dense(dense_file, recipe) if want_dense and not self.force else None
        shared_points = [p for p in pending if p.path == "shared"]
        if shared_points or (want_dense and dense is None):
            shared = SharedModel(recipe)
            if want_dense and dense is None:
                dense = shared.dense(dense_file, force=True)
            if want_dense:
                self.emit(f"dense:{model}", compare.dense_row(model, dense))
            if shared_points:
                configs = [p.recipe.method for p in points if p.path == "shared"]
                shared.ensure_stats(self.output / CALIBRATION_DIR, configs, force=self.force, progress=self.progress)
            for point in tqdm(shared_points, desc=f"sweep {model}", disable=not self.progress):
                self._guarded(point, partial(shared.run_point, point, dense, save=self.sweep.save_masks))
            self.calibration_passes += shared.calibration_passes
            self.timings[model] = dict(shared.timings)
            del shared
            gc.collect()
        elif want_dense:
            self.emit(f"dense:{model}", compare.dense_row(model, dense))
        for point in [p for p in pending if p.path == "pipeline"]:
            self._guarded(point, partial(self._pipeline_point, point, dense))

    def _speed(self) -> None:
        """Time every finished point beside its dense model (prune.sweep.speed); the figures join their rows."""
        for model in self.models:
            done = [p for p in self.points if p.model == model and self.rows.get(p.label, {}).get("status") == "done"]
            if not done:
                continue
            entry = speed.measure_speed(
                self.output / speed.SPEED_FILE, self.sweep.speed, done, force=self.force, write=self.write
            )
            for key, values in entry["figures"].items():
                self.rows[key].update(values)
            self.speed_notes.append(speed.describe(model, entry))

    def _pipeline_point(self, point: Point, dense: dict | None) -> dict:
        from prune.runs import pipeline  # imported here: the shared path never needs the trainer's dependencies

        forget_skip(point)
        report = pipeline.run(point.recipe, overwrite=True)  # replaces only a previous run's own files
        finish_report(
            report,
            point,
            dense,
            layers_from_masks(point.directory),
            {"calibration": "the method's own (prune.runs.pipeline.run, one point at a time)"},
        )
        write_report(point.directory, report)
        return report

    def _guarded(self, point: Point, compute: Callable[[], dict]) -> None:
        try:
            report = compute()
        except UserInputError as error:
            self.skip(point, str(error))
        except NonFiniteError as error:
            self.skip(point, f"non-finite result: {error}", status="failed")
        except Exception as error:  # noqa: BLE001 - one broken point must not lose a long sweep
            self.write("".join(traceback.format_exception(error)))
            self.skip(point, f"{type(error).__name__}: {error}", status="failed", persist=False)
        else:
            self.counts["computed"] += 1
            self.emit(point.label, compare.report_row(report, point.directory))

    def _meta(self, total: float) -> dict:
        return {
            "output": str(self.output),
            "base": self.sweep.base,
            "grid": self.sweep.grid.model_dump(mode="json") if self.sweep.grid else None,
            "points": [point.model_dump(mode="json") for point in self.sweep.points or []],
            "speed": self.sweep.speed.model_dump(mode="json") if self.sweep.speed else None,
            "set": self.sweep.set,
            "shared_calibration": self.sweep.shared_calibration,
            "calibration_note": NOTE,
            "calibration_passes": self.calibration_passes,
            "counts": self.counts,
            "timings": {"total": total, "shared": self.timings},
        }

    def _notes(self, total: float) -> list[str]:
        notes = []
        if any(p.path == "shared" for p in self.points):
            notes.append(NOTE)
        notes.append(
            f"This invocation took {total:.0f} s: {self.counts['computed']} points computed, "
            f"{self.counts['resumed']} resumed, {self.counts['skipped']} skipped, {self.counts['failed']} failed."
        )
        for model, timings in self.timings.items():
            shared = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
            notes.append(f"Shared work for {model} (once, not in the rows' time): {shared}.")
        return notes + self.speed_notes


def forget_skip(point: Point) -> None:
    """A point about to be computed drops the skipped.json of an earlier attempt (its own file, nothing else)."""
    (point.directory / SKIPPED_FILE).unlink(missing_ok=True)


def run_sweep(
    sweep: SweepRecipe,
    base: dict,
    *,
    force: bool = False,
    progress: bool = True,
    write: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) the sweep; returns {'rows', 'written', 'counts', 'timings', 'calibration_passes', ...}."""
    return _Sweep(sweep, base, force, progress, write or tqdm.write).run()


# ---- sensitivity ---------------------------------------------------------------------------------------------


def run_sensitivity(
    sweep: SweepRecipe,
    base: dict,
    *,
    force: bool = False,
    progress: bool = True,
    write: Callable[[str], None] | None = None,
) -> dict:
    """Prune one block (and one layer type) at a time with the sweep's sensitivity method and level; rank the
    groups by perplexity increase; write sensitivity/ and refresh the sweep's layers.png when a sweep ran."""
    require("matplotlib", "the sensitivity plot (sensitivity.png)")
    write = write or tqdm.write
    settings = sweep.sensitivity
    # a sweep of listed points scans with their methods' default settings
    entries = sweep.grid.methods if sweep.grid is not None else [point.method["name"] for point in sweep.points]
    names = [_method_entry(entry)[0] for entry in entries]
    scanners = [name for name, declared in METHODS.items() if declared.statistics is not None]
    method = settings.method or ("wanda" if "wanda" in names else next((n for n in names if n in scanners), "wanda"))
    if method not in scanners:
        raise UserInputError(
            f"the sensitivity scan needs a one-shot method ({', '.join(scanners)}), got {method!r}; "
            "set sensitivity.method."
        )
    entry = next((e for e in entries if _method_entry(e)[0] == method), method)
    output = Path(sweep.output)
    directory = output / SENSITIVITY_DIR
    level = str(parse_sparsity(settings.sparsity))
    recipe = parse_recipe(point_raw(sweep, base, models_of(sweep, base)[0], entry, level, directory))
    created = output_dir.claim(output, SWEEP, existing_ok=True)
    try:
        return _sensitivity(sweep, recipe, method, level, output, force, progress, write)
    except UserInputError:  # refused before anything was written: nothing left behind
        output_dir.release_if_unused(output, SWEEP, created)
        raise


def _sensitivity(
    sweep: SweepRecipe,
    recipe: Recipe,
    method: str,
    level: str,
    output: Path,
    force: bool,
    progress: bool,
    write: Callable[[str], None],
) -> dict:
    from prune.sweep import plots, sensitivity

    settings = sweep.sensitivity
    directory = output / SENSITIVITY_DIR
    key = fingerprint(recipe.fingerprint(), settings.model_dump(mode="json"))
    result_file = directory / "sensitivity.json"
    if result_file.is_file() and not force:
        saved = json.loads(result_file.read_text())
        if saved.get("fingerprint") == key:
            write(render_table(sensitivity.render_rows(saved), sensitivity.COLUMNS))
            return saved
    shared = SharedModel(recipe)
    shared.ensure_stats(output / CALIBRATION_DIR, [recipe.method], force=force, progress=progress)
    result = {
        "fingerprint": key,
        **sensitivity.scan(shared, recipe.method, settings.by, settings.heldout_blocks, progress=progress),
    }
    result["calibration_passes"] = shared.calibration_passes
    del shared
    rows = sensitivity.render_rows(result)
    title = f"Sensitivity of {result['model']}: {method} {level} on one group at a time"
    write_json_atomic(result_file, result)
    write_text_atomic(
        directory / "sensitivity.csv", compare.csv_text(result["entries"], front=["rank", "kind", "group"], tail=[])
    )
    plot = plots.sensitivity_bars(result["entries"], directory / "sensitivity.png", title)
    text = [
        f"# {title}",
        "",
        f"Dense perplexity {result['dense_perplexity']:.3f} over {result['validation_tokens']} "
        f"tokens of the validation part; increase = pruned group's perplexity - dense. Took {result['seconds']:.0f} s.",
        "",
        render_markdown_table(rows, sensitivity.COLUMNS),
        "",
        f"![sensitivity]({plot.name})" if plot else "",
        "",
    ]
    write_text_atomic(directory / "sensitivity.md", "\n".join(text))
    write(render_table(rows, sensitivity.COLUMNS))
    summary = output / "sweep.json"
    if summary.is_file():  # redraw layers.png with the sensitivity panel
        saved = json.loads(summary.read_text())
        meta = {key: value for key, value in saved.items() if key != "rows"}
        compare.write_outputs(
            output, saved["rows"], title=f"Sweep {output.name}", notes=saved.get("notes", []), meta=meta
        )
    return result
