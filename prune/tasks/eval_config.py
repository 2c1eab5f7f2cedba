"""The `eval` section of a recipe: which figures a run measures."""

from __future__ import annotations

from pydantic import Field

from prune.core.config import StrictConfig
from prune.data.config import EXTRA_TEXTS, NEVER_SEEN


class EvalConfig(StrictConfig):
    """Which figures a run measures, for the dense baseline and the pruned model alike."""

    perplexity: bool = Field(True, description="held-out perplexity")
    dense_baseline: bool = Field(True, description="also evaluate the unpruned model in the same run")
    extra_texts: list[str] = Field(
        default_factory=lambda: list(EXTRA_TEXTS),
        description="texts of other genres whose test part's perplexity is "
        "reported beside the in-domain one (extra_texts.<name>.perplexity), each labelled seen or not seen by "
        f"the run: shipped texts (moby-dick, {NEVER_SEEN}, brown, embedded-docs), local files or Hub datasets; "
        f"[] for none. {NEVER_SEEN} is the text no shipped recipe trains on",
    )
    tasks: list[str] = Field(default_factory=lambda: ["docs_lastword"], description="lm-eval task names")
    limit: int | None = Field(200, ge=1, description="examples per accuracy task (None: all)")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="windows per perplexity forward and lm-eval's batch "
        "size; null: one window at a time and lm-eval's batches of 8 (the figures of "
        "runs made before this key)",
    )
    flops: bool = Field(True, description="FLOPs per forward (dense, pruned, and with 2:4 sparse kernels)")
    latency: bool = Field(True, description="prefill tokens/s and decode ms/token on this machine")
    semi_structured_kernel: bool = Field(
        True,
        description="2:4 models: time PyTorch's 2:4 sparse kernels against "
        "dense (CUDA, compute capability 8.0+; elsewhere reported unavailable)",
    )
