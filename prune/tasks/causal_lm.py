"""The causal-lm task: a causal LM on a text corpus, scored by held-out perplexity.

`measure` turns one model and the held-out text into every figure the recipe's `eval` section asks for; it is
used for the dense baseline and the pruned model alike, so the two are measured the same way (and by
`prune eval` and sweeps, outside any run).
Only test parts are measured (the in-domain source's and each `eval.extra_texts` entry's); the best masks are
chosen on the validation part. Every perplexity carries a 95% bootstrap interval over its windows
(`eval.bootstrap`, fixed seed) and the per-window NLL sums, so that `prune compare` can pair two runs.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from eval.accuracy import accuracy_scores, check_tasks
from eval.bootstrap import perplexity_ci
from eval.flops import count_flops, count_params
from eval.latency import measure_latency
from eval.metric_errors import TaskUnavailableError
from eval.perplexity import PerplexityResult, perplexity
from eval.semi_structured import semi_structured_speedup
from prune.core.errors import UserInputError
from prune.core.memory import release_freed_memory
from prune.data.config import DataConfig
from prune.data.seen import all_seen_warning, label, seen_texts
from prune.data.text import (
    TokenSplits,
    interleave,
    prepare_extra,
    prepare_mix,
    prepare_source,
    shared_train_windows,
)
from prune.methods.spec import HeldOut
from prune.models import loading
from prune.structural.shrink import has_layer_sizes, load_resized
from prune.tasks.base import RunSettings, StageSettings, Task
from prune.tasks.eval_config import EvalConfig

T = TypeVar("T")

METHOD_REPORT_WINDOWS = 32  # held-out windows a method's own report hook measures on (e.g. per-token FLOPs)


def measure(
    model: nn.Module,
    tokenizer,
    splits: TokenSplits,
    config: EvalConfig,
    seq_len: int,
    label: str,
    device: torch.device | None = None,
    *,
    extra: Mapping[str, TokenSplits],
) -> dict:
    """Figures for one model, keyed like report.json; `extra` holds the prepared `config.extra_texts`; `seconds`
    says how long measuring took. Latency is timed on `device` (runtime.device; None: where the model is), which
    under runtime.offload: cpu is not where the model waits."""
    assert not config.perplexity or list(extra) == list(dict.fromkeys(config.extra_texts)), (
        "extra must hold the prepared eval.extra_texts"
    )
    start = time.perf_counter()
    model.eval()
    figures: dict = {}
    batched = {} if config.batch_size is None else {"batch_size": config.batch_size}
    if config.perplexity:
        figures.update(
            text_perplexities(
                lambda blocks, desc: released(perplexity(model, blocks, desc=desc, **batched)),
                splits,
                extra,
                seq_len,
                label,
            )
        )
    if config.tasks:
        scores = released(
            accuracy_scores(
                model,
                tokenizer,
                config.tasks,
                heldout_text=splits.test_text(tokenizer),
                limit=config.limit,
                **batched,
            )
        )
        figures["accuracy"] = {benchmark: score.value for benchmark, score in scores.items()}  # lm-eval task names
        figures["accuracy_stderr"] = {benchmark: score.stderr for benchmark, score in scores.items()}
    params = count_params(model)
    figures["params"] = {"total": params.total, "nonzero": params.nonzero}
    if config.flops:
        flops = released(count_flops(model, seq_len))
        figures["flops"] = {"dense": flops.dense, "pruned": flops.sparse, "semi_structured": flops.semi_structured}
    if config.latency:
        figures["latency"] = asdict(released(measure_latency(model, device=device)))
    if config.semi_structured_kernel:
        kernel = semi_structured_speedup(model, seq_len=seq_len)
        if kernel is not None:
            figures["semi_structured_kernel"] = kernel
    figures["seconds"] = time.perf_counter() - start
    return figures


def released(figure: T) -> T:
    """`figure`, once the buffers freed while computing it are handed back to the OS (`release_freed_memory`): glibc
    keeps a forward's freed activations in its arenas, and the next figure's forward (or the pruning after the dense
    baseline) would stack its own peak on top of them."""
    release_freed_memory()
    return figure


def text_perplexities(
    score: Callable[[Tensor, str], PerplexityResult],
    splits: TokenSplits,
    extra: Mapping[str, TokenSplits],
    seq_len: int,
    label: str,
) -> dict:
    """report.json's `perplexity` and `extra_texts`: the test part of the source and of each out-of-domain text,
    each window scored by `score(blocks, desc)`. One builder however the model is held (in memory, or streamed
    from disk), so every run's figures have the same shape and pair in `prune compare`."""
    figures = {"perplexity": _figures(score(splits.test_blocks(seq_len), f"perplexity ({label})"), seq_len)}
    if extra:
        figures["extra_texts"] = {
            name: {"perplexity": _figures(score(text.test_blocks(seq_len), f"{name} ({label})"), seq_len)}
            for name, text in extra.items()
        }
    return figures


def _figures(result: PerplexityResult, seq_len: int) -> dict:
    return {
        "value": result.value,
        "tokens": result.tokens,
        "seq_len": seq_len,
        "windows": result.windows,
        "ci95": list(perplexity_ci(result.window_nll, result.window_tokens)),
        "window_nll": list(result.window_nll),
    }


def calibration_use(data: DataConfig) -> dict[str, dict]:
    """`used`'s entry for a method that reads calibration data: the part it is drawn from and how many windows."""
    return {"calibration": {"part": "train", "windows": data.calibration_samples}}


def data_report(
    data: DataConfig,
    splits: TokenSplits,
    extra: Mapping[str, TokenSplits],
    used: dict[str, dict],
    *,
    mix: Mapping[str, TokenSplits] | None = None,
) -> dict:
    """report.json's `data`: where each part of each text lies, how many windows it holds, and which part (and
    how many windows) each use read: `used` maps a use (calibration, training, selection) to its part; under
    `data.mix` their window counts span the source and the mix texts (`data.mix` lists each one's parts and how
    many train windows calibration and training drew from, after `data.source_share`). `seen`: for the source,
    each mix text and each extra text, whether the run read any part of it (prune.data.seen); `warning` when
    every extra text was read. One builder for `prune run` and a sweep's shared points."""
    source, seq_len, source_share, mix = data.source, data.seq_len, data.source_share, mix or {}
    train_windows = shared_train_windows(splits, mix, seq_len, source_share)[1:]
    seen = seen_texts(source, mix, [source, *mix, *extra], reads=bool(used))
    warning = all_seen_warning(seen, extra)
    measured = {
        "perplexity": {"part": "test", "windows": splits.windows(seq_len)["test"]},
        "accuracy": {
            "part": "test",
            "note": "docs_lastword is built from the test text; other tasks bring their own data",
        },
    }
    return {
        "source": source,
        "seq_len": seq_len,
        **splits.describe(seq_len),
        "used": {**used, **measured},
        "extra_texts": {
            name: {
                **text.describe(seq_len),
                "used": {"perplexity": {"part": "test", "windows": text.windows(seq_len)["test"]}},
            }
            for name, text in extra.items()
        },
        **(
            {
                "source_share": source_share,
                "mix": {
                    name: {
                        **text.describe(seq_len),
                        "used": {
                            "calibration, training": {"part": "train", "windows": windows},
                            "selection": {"part": "validation"},
                        },
                    }
                    for (name, text), windows in zip(mix.items(), train_windows)
                },
            }
            if mix
            else {}
        ),
        "seen": seen,
        **({"warning": warning} if warning else {}),
    }


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student) between next-token distributions, in float32: the dense
    model's whole distribution is a richer target per token than the one observed next token."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def distillation_loss(model: nn.Module, teacher: nn.Module, batch: Tensor, weight: float) -> Tensor:
    """(1 - weight) * next-token cross-entropy + weight * KL(teacher || model), over the positions the
    cross-entropy scores (every one but the last); the teacher runs without gradients on its own device."""
    output = model(input_ids=batch, labels=batch)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch.to(next(teacher.parameters()).device)).logits
    kl = distillation_kl(output.logits[:, :-1], teacher_logits[:, :-1].to(output.logits.device))
    return (1.0 - weight) * output.loss + weight * kl


def frozen_copy(model: nn.Module) -> nn.Module:
    """The dense model as a distillation teacher: copied before any method touches the weights (a prior may
    update them), never trained, in evaluation mode."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


class CausalLM(Task):
    """`task: causal-lm`: text in, perplexity (and lm-eval accuracy, FLOPs, latency) out."""

    name = "causal-lm"
    metric = "perplexity"
    unit = "tokens"

    def __init__(self, model: nn.Module, tokenizer, settings: RunSettings, device: torch.device | None = None):
        super().__init__(model, tokenizer, settings, device)
        data = settings.data
        self.seq_len = data.seq_len
        self.source_splits = prepare_source(tokenizer, data)
        measured = settings.eval.extra_texts if settings.eval.perplexity else []  # only perplexity reads them
        self.extra = prepare_extra(
            tokenizer,
            measured,
            self.seq_len,
            heldout_fraction=data.heldout_fraction,
            validation_fraction=data.validation_fraction,
            stream_tokens=data.stream_tokens,
        )
        self.mix = prepare_mix(tokenizer, data, self.extra)
        # what calibration, training and selection read
        self.splits = interleave(self.source_splits, self.mix, self.seq_len, data.source_share)
        self.used: dict[str, dict] = {}
        distills = settings.train.distill or (settings.recover.steps and settings.recover.distill)
        self.teacher = frozen_copy(model) if distills else None  # before any method attaches

    @classmethod
    def load_model(cls, name_or_path: str, dtype: torch.dtype):
        """An alias, a model directory, a Hub id, or a structural export whose layers differ in size."""
        path = Path(name_or_path).expanduser()
        if path.is_dir() and has_layer_sizes(str(path)):
            return load_resized(str(path), dtype).eval(), loading.load_tokenizer(str(path))
        return loading.load(name_or_path, dtype)

    @classmethod
    def check_model(cls, model: nn.Module, settings: RunSettings) -> None:
        """Before any text is read: a window longer than the model's positions, accuracy tasks that cannot run."""
        loading.check_seq_len(model, settings.data.seq_len, settings.model)
        if settings.eval.tasks:
            check_eval_tasks(settings.eval)

    @staticmethod
    def note(report: dict) -> str:
        """Which text each perplexity read: the test part of the source (and of each out-of-domain text); what
        chose the kept masks (the validation part); the interval's method; what FLOPs count."""
        data, perplexity_figures = report.get("data", {}), report.get("perplexity")
        if perplexity_figures is None:
            return "FLOPs per forward of one window (pruned: what a sparse kernel would run)."
        seen = data.get("seen", {})
        source = data.get("source", "the text")
        note = (
            f"Perplexity over the {perplexity_figures['tokens']:,} predicted tokens of the test part of "
            f"{source} ({perplexity_figures['windows']} windows of {perplexity_figures['seq_len']})"
            + (f", {_seen_words(seen[source])}" if source in seen else "")
        )
        for name, text in report.get("extra_texts", {}).items():
            note += f"; {name}: the test part of that text ({text['perplexity']['windows']} windows)"
            note += f", {_seen_words(seen[name])}" if name in seen else ""
        selection = data.get("used", {}).get("selection")
        if selection is not None:
            note += f". The kept masks were chosen on {selection['windows']} validation windows, never on test"
        recovery = data.get("used", {}).get("recovery selection")
        if recovery is not None:
            note += f". Recovery's kept step was chosen on {recovery['windows']} validation windows, never on test"
        note += ". [95% CI]: bootstrap over windows (2000 resamples, fixed seed)"
        note += "; ± stderr: lm-eval's standard error." if "accuracy" in report else "."
        return note + " FLOPs per forward of one window (pruned: what a sparse kernel would run)."

    def check_data(self, spec) -> None:
        """Which part (and how many windows) calibration, training and the choice of the best masks read; checks
        that every part holds what the run needs (one error saying what the text has and needs)."""
        data, train_config = self.settings.data, self.settings.train
        needs = {"train": (1, "a run"), "validation": (1, "a run"), "test": (1, "the test perplexity")}
        if spec.needs_calibration:
            self.used.update(calibration_use(data))
            needs["train"] = (data.calibration_samples, f"calibration_samples={data.calibration_samples}")
        if spec.needs_selection:
            self.used["selection"] = {"part": "validation", "windows": train_config.eval_windows}
            needs["validation"] = (train_config.eval_windows, f"train.eval_windows={train_config.eval_windows}")
        stages = [("training", "selection", "train", train_config)] if spec.kind == "learnable" else []
        stages.append(("recovery", "recovery selection", "recover", self.settings.recover))
        for use, choice, section, stage in stages:
            if not stage.steps:
                continue
            windows = len(self.train_data())
            self.used[use] = {"part": "train", "windows": windows}
            check_batch(stage.batch_size, windows, section)
            if stage.eval_every:
                self.used[choice] = {"part": "validation", "windows": stage.eval_windows}
                if stage.eval_windows > needs["validation"][0]:
                    needs["validation"] = (stage.eval_windows, f"{section}.eval_windows={stage.eval_windows}")
        self.splits.require(data.source, self.seq_len, needs)

    def fields(self) -> dict:
        return {"data": data_report(self.settings.data, self.source_splits, self.extra, self.used, mix=self.mix)}

    @property
    def sample_size(self) -> int:
        return self.seq_len

    def calibration(self) -> Tensor:
        """`data.calibration_samples` blocks of the train part, drawn with the recipe's seed."""
        return self.splits.calibration_blocks(self.settings.data.calibration_samples, self.seq_len, self.settings.seed)

    def selection(self) -> Tensor:
        """`train.eval_windows` windows of the VALIDATION part: what a method's own choice reads (never test)."""
        return self.splits.validation_blocks(self.seq_len)[: self.settings.train.eval_windows]

    def train_data(self) -> Tensor:
        """The train part's blocks; with `data.fraction` < 1 a seeded share of them (VTrans' Fast variant)."""
        blocks = self.splits.train_blocks(self.seq_len)
        fraction = self.settings.data.fraction
        if fraction < 1.0:
            order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.settings.seed))
            blocks = blocks[order[: max(1, round(fraction * len(blocks)))]]
        return blocks

    def loss(self, model: nn.Module, batch: Tensor, stage: StageSettings) -> Tensor:
        """Next-token cross-entropy on a [batch, seq] block of token ids; with the stage's `distill` (train.distill,
        recover.distill), mixed with the KL divergence from the dense teacher (distillation_loss)."""
        if not stage.distill:
            return model(input_ids=batch, labels=batch).loss
        return distillation_loss(model, self.teacher, batch, stage.distill)

    def heldout_score(self, model: nn.Module, stage: StageSettings) -> float:
        """Perplexity on the stage's `eval_windows` windows of the VALIDATION part (never the test part, which
        only the reported figures read): what picks the best masks, and the best step of recovery."""
        windows = self.splits.validation_blocks(self.seq_len)[: stage.eval_windows]
        return perplexity(model, windows, desc="eval (validation)").value

    def measure(self, label: str) -> dict:
        return measure(
            self.model,
            self.processor,
            self.splits,
            self.settings.eval,
            self.seq_len,
            label,
            self.device,
            extra=self.extra,
        )

    def heldout(self) -> HeldOut:
        windows = self.splits.test_blocks(self.seq_len)[:METHOD_REPORT_WINDOWS]
        return HeldOut(
            windows.to(next(self.model.parameters()).device),
            name="windows",
            unit="tokens",
            per_sample=self.seq_len,
            flops=lambda model: count_flops(model, self.seq_len).dense,
        )


def check_batch(batch_size: int, windows: int, section: str = "train") -> None:
    """A micro-batch (on every process of a launch) holds distinct training windows: more than the data holds would
    repeat windows inside one batch, and a batch far beyond it is how a typo takes the machine's memory. `section`:
    the training stage's recipe section (train, recover)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size * processes > windows:
        launch = f" x {processes} processes" if processes > 1 else ""
        raise UserInputError(
            f"{section}.batch_size {batch_size}{launch} asks for more windows per micro-batch than the training data "
            f"holds ({windows} windows of the train part); use {section}.batch_size <= "
            f"{max(windows // processes, 1)} (raise {section}.grad_accum for a larger step), or more text "
            "(data.source, data.mix)."
        )


def _seen_words(seen: bool) -> str:
    """The note's words for a text's label: seen texts were read by calibration or training (never their test
    part); a text that was not seen is what an out-of-domain figure must be measured on."""
    return f"**{label(seen)}**" + (" (its other parts)" if seen else "")


def check_eval_tasks(config: EvalConfig, setting: str = "eval.tasks") -> None:
    """Every accuracy task can run (a known name; offline, a cached dataset): checked before the first forward,
    so a typo does not surface after minutes of dense evaluation."""
    try:
        check_tasks(config.tasks)
    except TaskUnavailableError as error:
        raise UserInputError(f"{error}. Fix {setting}, or leave accuracy out ({setting} empty).") from None
