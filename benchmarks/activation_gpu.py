"""The GPU half of activation sparsity's decode kernel, prepared for benchmarks/gpu_check.py (run where a CUDA GPU
is lent; this machine has none, so nothing here has run on one yet).

y = W x at batch 1 reading only the weight columns whose input survives its cut, as a Triton kernel in TEAL's
manner: W^T [in, out] stored contiguous, each program owns a slice of the outputs and walks the inputs in
chunks; a chunk's rows are loaded under the mask |x_j| > cut_j, so the rows of zeroed inputs are never read
(the loads are predicated off) and no index list, no host sync is needed. Timed against dense F.linear (cuBLAS)
for SmolLM2-135M's and a 7B model's projection shapes, bfloat16, at several shares of zeros, after checking it
equals the masked dense product. `measure()` returns the figures; `lines(figures)` renders them.

The method's wrappers (prune.methods.activation.layers) run masked dense on a GPU until this kernel is measured
to pay there.
"""

from __future__ import annotations

import statistics

import torch
from torch.nn import functional as F

SHAPES = [
    (576, 1536, "SmolLM2 gate/up"),
    (1536, 576, "SmolLM2 down"),
    (4096, 11008, "7B gate/up"),
    (11008, 4096, "7B down"),
]
SPARSITIES = (0.0, 0.4, 0.5)
REPEATS = 200


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def masked_gemv(
        x_ptr, cut_ptr, columns_ptr, y_ptr, in_features, out_features, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        outputs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = outputs < out_features
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, in_features, BLOCK_K):
            inputs = start + tl.arange(0, BLOCK_K)
            valid = inputs < in_features
            x = tl.load(x_ptr + inputs, mask=valid, other=0.0).to(tl.float32)
            keep = valid & (tl.abs(x) > tl.load(cut_ptr + inputs, mask=valid, other=float("inf")))
            rows = tl.load(
                columns_ptr + inputs[:, None] * out_features + outputs[None, :],
                mask=keep[:, None] & in_range[None, :],
                other=0.0,
            ).to(tl.float32)
            total += tl.sum(rows * x[:, None], axis=0)
        tl.store(y_ptr + outputs, total.to(y_ptr.dtype.element_ty), mask=in_range)

    def threshold_gemv(x: torch.Tensor, columns: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        in_features, out_features = columns.shape
        y = torch.empty(out_features, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(out_features, 64),)
        masked_gemv[grid](x, cut, columns, y, in_features, out_features, BLOCK_N=64, BLOCK_K=64)
        return y

    return threshold_gemv


def _time_ms(function) -> float:
    """Median of REPEATS CUDA-event timings of `function()` after 20 warm-up calls."""
    for _ in range(20):
        function()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure() -> dict:
    """Dense and Triton ms per y = W x (bfloat16, batch 1) per shape and share of zeros; or why not measured."""
    try:
        threshold_gemv = _kernel()
    except ImportError as error:
        return {"available": False, "reason": f"triton is not installed ({error})"}
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for in_features, out_features, label in SHAPES:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
        columns = weight.t().contiguous()
        x = torch.randn(in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
        for sparsity in SPARSITIES:
            level = float(x.float().abs().quantile(sparsity)) if sparsity else -1.0
            cut = torch.full((in_features,), level, device="cuda")
            expected = F.linear((x * (x.float().abs() > cut)).float(), weight.float())
            error = float((threshold_gemv(x, columns, cut).float() - expected).abs().max())
            dense = _time_ms(lambda weight=weight, x=x: F.linear(x, weight))
            sparse = _time_ms(lambda columns=columns, x=x, cut=cut: threshold_gemv(x, columns, cut))
            rows.append(
                {
                    "shape": f"{in_features} -> {out_features}",
                    "label": label,
                    "sparsity": sparsity,
                    "dense_ms": dense,
                    "triton_ms": sparse,
                    "speedup": dense / sparse,
                    "max_abs_error": error,
                }
            )
    return {"available": True, "rows": rows}


def lines(figures: dict) -> list[str]:
    """The activation-sparsity part of the `gpu` section."""
    if not figures.get("available"):
        return ["", f"Activation sparsity decode kernel (Triton): not measured ({figures.get('reason')})."]
    out = [
        "",
        "Activation sparsity decode kernel (benchmarks/activation_gpu.py: Triton, rows of zeroed inputs not read) "
        f"against dense F.linear, bfloat16, batch 1, medians of {REPEATS} CUDA-event timings:",
        "",
        "| shape (in -> out) | projection | zeros | dense ms | triton ms | speedup | max abs error |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in figures["rows"]:
        slower = " (slower)" if row["speedup"] < 1 else ""
        out.append(
            f"| {row['shape']} | {row['label']} | {100 * row['sparsity']:.0f}% | {row['dense_ms']:.4f} | "
            f"{row['triton_ms']:.4f} | {row['speedup']:.2f}x{slower} | {row['max_abs_error']:.3g} |"
        )
    return out
