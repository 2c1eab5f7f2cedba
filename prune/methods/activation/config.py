"""Activation sparsity's config and declaration (torch-free: a recipe is validated before torch is imported)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from prune.core.config import MethodConfig
from prune.methods.declaration import MethodDeclaration

# Calls of at most this many tokens run the sparse decode kernel. Measured on this project's 2-core CPU at
# TEAL 40-50% (benchmarks/RESULTS.md, `activation`): the union of the kept columns of 4 tokens still skips work,
# by 8 it is most of the layer and the kernel loses to dense.
DEFAULT_MAX_TOKENS = 4


class ActivationConfig(MethodConfig):
    """Training-free activation sparsity: per-input magnitude thresholds on the inputs of a model's projections,
    calibrated so that a target fraction of the entries is zero; decode then reads only the weight columns of
    the entries kept. teal (TEAL, Liu et al. 2024): the input of every linear in the decoder blocks (q/k/v, o,
    gate/up, down; GPT-2's c_attn, c_proj, c_fc, mlp.c_proj) is thresholded. cats (CATS, Lee et al. 2024): the
    SwiGLU gate activation act(gate(x)) of each gated FFN is thresholded, and up and down run only for the
    neurons kept."""

    sparsity: str | float = Field(
        0.5,
        description="the fraction of entries zeroed: teal, of every targeted projection's input; cats, of each "
        "FFN's neurons (a fraction in (0, 1))",
    )
    mode: Literal["teal", "cats"] = Field("teal", description="teal: every projection's input; cats: FFN gates")
    score: Literal["magnitude", "weighted"] = Field(
        "magnitude",
        description="which entries go first: magnitude, |entry| alone (TEAL's and CATS's rule); weighted, |entry| "
        "times what it moves (teal: its weight column's norm; cats: its up value's rms times its down column's norm)",
    )
    allocation: Literal["uniform", "greedy"] = Field(
        "uniform",
        description="how the target is spread over a block's inputs: uniform, every module the target share; "
        "greedy (teal only), TEAL's greedy by block output error on the calibration windows",
    )
    targets: list[str] | None = Field(
        None,
        description="glob patterns over module names (null: teal, every linear inside the decoder blocks; cats, "
        "every gated FFN, e.g. ['*.mlp']); every pattern must match",
    )
    max_tokens: int = Field(
        DEFAULT_MAX_TOKENS,
        ge=1,
        description="calls of at most this many tokens (decode, small batches) run the sparse kernel; longer "
        "ones (prefill) run masked dense, which computes the same",
    )

    @model_validator(mode="after")
    def _fraction_only(self):
        if self.pattern.is_nm:
            raise ValueError(
                f"activation sparsity zeroes a fraction of each input, not an N:M pattern: set method.sparsity to "
                f"a fraction such as 0.5, not {self.sparsity!r}."
            )
        if self.allocation == "greedy" and self.mode == "cats":
            raise ValueError(
                "allocation greedy spreads the target over the several inputs of a block (teal); cats has one "
                "threshold per block: use allocation uniform."
            )
        return self

    def target_label(self) -> str:
        return f"{self.mode} {self.pattern}"


THRESHOLDS_FILE = "thresholds.safetensors"
INFO_FILE = "thresholds.json"

ACTIVATION = MethodDeclaration(
    "activation",
    ActivationConfig,
    "oneshot",
    "prune.methods.activation.method:ACTIVATION",
    plain_model=False,
    saved_files=(THRESHOLDS_FILE, INFO_FILE),
    masks_inputs=True,
)
