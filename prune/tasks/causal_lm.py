"""The causal-lm task: a causal LM on a text corpus, scored by held-out perplexity.

`measure` turns one model and the held-out text into every figure the recipe's `eval` section asks for; it is
used for the dense baseline and the pruned model alike, so the two are measured the same way (and by
`prune eval` and sweeps, outside any run).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from eval.accuracy import task_accuracy
from eval.flops import count_flops, count_params
from eval.latency import measure_latency
from eval.perplexity import perplexity
from eval.semi_structured import semi_structured_speedup
from prune.data.text import DataConfig, TokenSplits, prepare
from prune.methods.spec import HeldOut
from prune.models import loading
from prune.structural.shrink import has_layer_sizes, load_resized
from prune.tasks.base import RunSettings, Task
from prune.tasks.eval_config import EvalConfig

METHOD_REPORT_WINDOWS = 32  # held-out windows a method's own report hook measures on (e.g. per-token FLOPs)


def measure(model: nn.Module, tokenizer, splits: TokenSplits, config: EvalConfig, seq_len: int, label: str,
            device: torch.device | None = None) -> dict:
    """Figures for one model, keyed like report.json; `seconds` says how long measuring took. Latency is timed on
    `device` (runtime.device; None: where the model is), which under runtime.offload: cpu is not where the model
    waits."""
    start = time.perf_counter()
    model.eval()
    figures: dict = {}
    batched = {} if config.batch_size is None else {"batch_size": config.batch_size}
    if config.perplexity:
        result = perplexity(model, splits.heldout_blocks(seq_len), desc=f"perplexity ({label})", **batched)
        figures["perplexity"] = {"value": result.value, "tokens": result.tokens, "seq_len": seq_len}
    if config.tasks:
        figures["accuracy"] = task_accuracy(
            model, tokenizer, config.tasks, heldout_text=splits.heldout_text(tokenizer), limit=config.limit,
            **batched,
        )
    params = count_params(model)
    figures["params"] = {"total": params.total, "nonzero": params.nonzero}
    if config.flops:
        flops = count_flops(model, seq_len)
        figures["flops"] = {"dense": flops.dense, "pruned": flops.sparse, "semi_structured": flops.semi_structured}
    if config.latency:
        figures["latency"] = asdict(measure_latency(model, device=device))
    if config.semi_structured_kernel:
        kernel = semi_structured_speedup(model, seq_len=seq_len)
        if kernel is not None:
            figures["semi_structured_kernel"] = kernel
    figures["seconds"] = time.perf_counter() - start
    return figures


class CausalLM(Task):
    """`task: causal-lm`: text in, perplexity (and lm-eval accuracy, FLOPs, latency) out."""

    name = "causal-lm"
    data_config = DataConfig
    metric = "perplexity"
    unit = "tokens"

    def __init__(self, model: nn.Module, tokenizer, settings: RunSettings, device: torch.device | None = None):
        super().__init__(model, tokenizer, settings, device)
        data = settings.data
        self.seq_len = data.seq_len
        self.splits = prepare(
            tokenizer, data.source, config=data.config, split=data.split, heldout_split=data.heldout_split,
            text_column=data.text_column, heldout_fraction=data.heldout_fraction,
        )

    @classmethod
    def load_model(cls, spec: str, dtype: torch.dtype):
        """An alias, a model directory, a Hub id, or a structural export whose layers differ in size."""
        path = Path(spec).expanduser()
        if path.is_dir() and has_layer_sizes(str(path)):
            return load_resized(str(path), dtype).eval(), loading.load_tokenizer(str(path))
        return loading.load(spec, dtype)

    @staticmethod
    def note(report: dict) -> str:
        return (
            f"Perplexity over {report.get('perplexity', {}).get('tokens', 0)} held-out tokens in windows of "
            f"{report.get('perplexity', {}).get('seq_len', '-')}; FLOPs per forward of one window "
            "(pruned: what a sparse kernel would run)."
        )

    @property
    def sample_size(self) -> int:
        return self.seq_len

    def calibration(self) -> Tensor:
        """`data.calibration_samples` blocks of the train part, drawn with the recipe's seed."""
        return self.splits.calibration_blocks(self.settings.data.calibration_samples, self.seq_len, self.settings.seed)

    def train_data(self) -> Tensor:
        """The train part's blocks; with `data.fraction` < 1 a seeded share of them (VTrans' Fast variant)."""
        blocks = self.splits.train_blocks(self.seq_len)
        fraction = self.settings.data.fraction
        if fraction < 1.0:
            order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.settings.seed))
            blocks = blocks[order[: max(1, round(fraction * len(blocks)))]]
        return blocks

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        """Next-token cross-entropy on a [batch, seq] block of token ids."""
        return model(input_ids=batch, labels=batch).loss

    def heldout_score(self, model: nn.Module) -> float:
        windows = self.splits.heldout_blocks(self.seq_len)[: self.settings.train.eval_windows]
        return perplexity(model, windows, desc="eval hard masks").value

    def measure(self, label: str) -> dict:
        return measure(self.model, self.processor, self.splits, self.settings.eval, self.seq_len, label, self.device)

    def heldout(self) -> HeldOut:
        windows = self.splits.heldout_blocks(self.seq_len)[:METHOD_REPORT_WINDOWS]
        return HeldOut(windows.to(next(self.model.parameters()).device), name="windows",
                       unit="tokens", per_sample=self.seq_len,
                       flops=lambda model: count_flops(model, self.seq_len).dense)
