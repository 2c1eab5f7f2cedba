"""`task: causal-lm` under `runtime.offload: disk`: the model is a checkpoint on disk, never whole in memory.

The task holds the model's skeleton (meta device: its structure, no weights), which the checks and the method's
targets read, and the directory of the checkpoint it measures: the dense one, then the pruned one it wrote.
Everything else is the in-memory task's (CausalLM): the text, its parts, the calibration draw, the `data` report
section and the figures' shape, so a streamed run and an in-memory run of one recipe report the same fields and
pair window by window in `prune compare`. What differs is how the model is pruned (block by block from the
shards through the method's `block_pruning` hook, the pruned weights written shard by shard into model/) and
measured (perplexity block by block, parameters counted tensor by tensor). What needs the whole model (lm-eval
tasks, latency, FLOPs, the 2:4 kernel) and the masks file are listed under `skipped` with the reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor, nn

from eval.perplexity import PerplexityResult
from prune.calibration.layerwise import BlockPlacement
from prune.calibration.streaming import skeleton, stream_perplexity, stream_prune
from prune.core.atomic import staged_directory
from prune.core.config import MethodConfig
from prune.methods.spec import MethodSpec
from prune.models import loading
from prune.models.shards import ShardReader
from prune.tasks.base import RunSettings
from prune.tasks.causal_lm import CausalLM, text_perplexities

STREAM_SKIPPED = "runtime.offload: disk keeps one block in memory; {what} needs the whole model (use offload: cpu)"
MASKS_SKIPPED = "masks.safetensors is not written under offload: disk; model/ holds the pruned weights"


class StreamedCausalLM(CausalLM):
    """A causal LM pruned and measured from its safetensors shards, one decoder block in memory at a time."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        settings: RunSettings,
        device: torch.device | None = None,
        *,
        checkpoint: Path,
        output: Path,
    ):
        super().__init__(model, tokenizer, settings, device)
        self.checkpoint = checkpoint  # what `measure` reads: the dense checkpoint, then the pruned one
        self.output = output  # where `apply_method` writes the pruned checkpoint (the run's model/)
        self.targets: list[str] = []

    @classmethod
    def load_model(cls, name_or_path: str, dtype: torch.dtype):
        """The skeleton of the checkpoint in directory `name_or_path` (no weight is read) and its tokenizer."""
        return skeleton(Path(name_or_path), dtype), loading.load_tokenizer(name_or_path)

    @classmethod
    def check_model(cls, model: nn.Module, settings: RunSettings) -> None:
        """A window longer than the model's positions; not the accuracy tasks, which a streamed run skips."""
        loading.check_seq_len(model, settings.data.seq_len, settings.model)

    def apply_method(
        self,
        spec: MethodSpec,
        config: MethodConfig,
        calibration: Tensor | None,
        placement: BlockPlacement | None = None,
    ) -> None:
        """Prune the checkpoint block by block through the method's `block_pruning` hook (or a structural method's
        `streamed_export`, which writes the smaller model) into `output`, written shard by shard (whole or absent),
        which `measure` reads from now on. `placement` is None here: the shards are where the blocks wait."""
        with staged_directory(self.output) as staging:
            if spec.streamed_export is not None:
                self.model.maskprune_summary = spec.streamed_export.write(  # what the method's `report` reads
                    self.checkpoint, staging, config, calibration, self.device, self.model.dtype
                )
            else:
                pruning = spec.block_pruning(config)
                self.targets = spec.targets(self.model, config)
                stream_prune(
                    self.checkpoint,
                    staging,
                    lambda model: spec.targets(model, config),
                    pruning.prune,
                    pruning.make_stats,
                    calibration,
                    device=self.device,
                    dtype=self.model.dtype,
                )
            self.processor.save_pretrained(staging)
        self.checkpoint = self.output

    def sparsity(self) -> float:
        """The share of the targets' weights that are zero in the pruned checkpoint."""
        total, nonzero = _counts(self.checkpoint, {name + ".weight" for name in self.targets})
        return (total - nonzero) / max(total, 1)

    def save_masks(self, spec: MethodSpec, directory: Path, config: MethodConfig, meta: dict) -> None:
        """Nothing: the masks of a model that is never whole would not fit in memory; model/ carries them."""

    def export(self, spec: MethodSpec, config: MethodConfig) -> None:
        """Nothing: the pruned checkpoint already is the plain model."""

    def save_model(self, directory: Path) -> None:
        """Nothing: `apply_method` wrote model/ shard by shard."""

    def measure(self, label: str) -> dict:
        """The in-memory task's perplexity figures (both texts, intervals, per-window NLLs), streamed block by
        block, and the checkpoint's parameter counts; the rest of `eval` is listed under `skipped`."""
        start = time.perf_counter()
        figures: dict = {}
        if self.settings.eval.perplexity:
            figures.update(text_perplexities(self._stream_perplexity, self.splits, self.extra, self.seq_len, label))
        total, nonzero = _counts(self.checkpoint, {name for name, _ in self.model.named_parameters()})
        figures["params"] = {"total": total, "nonzero": nonzero}
        figures["seconds"] = time.perf_counter() - start
        return figures

    def fields(self) -> dict:
        return {**super().fields(), "skipped": self._skipped()}

    def _stream_perplexity(self, blocks: Tensor, desc: str) -> PerplexityResult:
        return stream_perplexity(
            self.checkpoint,
            blocks,
            device=self.device,
            dtype=self.model.dtype,
            batch_size=self.settings.eval.batch_size or 1,
            desc=desc,
        )

    def _skipped(self) -> dict[str, str]:
        """What the eval section asked for that a streamed run cannot measure, and why (never silently)."""
        config = self.settings.eval
        wanted = {
            "accuracy": bool(config.tasks),
            "latency": config.latency,
            "flops": config.flops,
            "semi_structured_kernel": config.semi_structured_kernel,
        }
        return {
            **{what: STREAM_SKIPPED.format(what=what) for what, asked in wanted.items() if asked},
            "masks": MASKS_SKIPPED,
        }


def _counts(checkpoint: Path, names: set[str]) -> tuple[int, int]:
    """(elements, nonzero elements) of the checkpoint's tensors named in `names`, read one at a time."""
    reader = ShardReader(checkpoint)
    total = nonzero = 0
    for name in reader.specs():
        if name in names:
            tensor = reader.get_tensor(name)
            total, nonzero = total + tensor.numel(), nonzero + int(tensor.count_nonzero())
    return total, nonzero
