"""The figures behind design choices the code explains (they are measured here, not quoted in docstrings):

1. MaskLLM's noisy init: N(0, 0.01^2) logits plus MaskLLM's prior shift at strength 3, with sigma the std of
   the noise. How many 2:4 groups does the noise hand to another candidate at step 0, and what does that do to
   the prior's perplexity? Why prune.methods.nm_gumbel starts from noise-free logits. The prior here is
   magnitude 2:4 (no calibration needed); perplexity over the first held-out windows of the embedded docs.
2. Storing Gumbel noise for the backward: float32 -> bfloat16 vs float32 -> float16 conversion time on this CPU
   (prune.methods.nm_gumbel.method.NOISE_DTYPE).
3. lm-eval's full task index: import and TaskManager construction time (why eval.accuracy builds it once, and
   only when a non-local task is asked for).

    python benchmarks/code_figures.py [--windows 16] [--seq-len 256] [--threads 1]

Writes the `code_figures` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

STRENGTH, INIT_STD = 3.0, 0.01  # MaskLLM's prior strength and init std (prune.methods.nm_gumbel defaults)


def noisy_init(model, windows: torch.Tensor) -> dict:
    """Share of 2:4 groups the noisy init flips away from the prior, and perplexity with either mask."""
    from eval.perplexity import perplexity
    from prune.core.sparsity import parse_sparsity
    from prune.masks.base import attach_hard_masks, unwrap
    from prune.masks.storage import decode_nm, encode_nm
    from prune.masks.targets import select_targets
    from prune.methods.nm_gumbel.method import prior_logits
    from prune.methods.oneshot.magnitude import magnitude_scores
    from prune.methods.oneshot.masking import mask_from_scores
    from prune.models.blocks import weight_matrix

    generator = torch.Generator().manual_seed(0)
    modules = dict(model.named_modules())
    priors, noisy, flipped, groups = {}, {}, 0, 0
    for name in select_targets(model, None):
        weight = weight_matrix(modules[name]).detach()
        prior = mask_from_scores(magnitude_scores(weight), parse_sparsity("2:4"))
        noise = torch.randn(6, weight.shape[0], weight.shape[1] // 4, generator=generator) * INIT_STD
        choice = (noise + prior_logits(prior, 2, 4, STRENGTH, float(noise.std()))).argmax(0).to(torch.uint8)
        flipped += int((choice != encode_nm(prior, 2, 4)).sum())
        groups += choice.numel()
        priors[name], noisy[name] = prior, decode_nm(choice, 2, 4)
    result = {"groups": groups, "flipped": flipped, "dense": perplexity(model, windows).value}
    for label, masks in (("prior", priors), ("noisy", noisy)):
        attach_hard_masks(model, masks)
        result[label] = perplexity(model, windows).value
        unwrap(model)
    return result


def conversion_ms(elements: int, repeats: int = 20) -> dict[str, float]:
    """Median ms to convert a float32 tensor of `elements` values to bfloat16 and to float16."""
    x = torch.randn(elements)
    times = {}
    for dtype in (torch.bfloat16, torch.float16):
        x.to(dtype)  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            x.to(dtype)
            samples.append(time.perf_counter() - start)
        times[str(dtype).removeprefix("torch.")] = 1000 * statistics.median(samples)
    return times


def lm_eval_index_seconds() -> dict:
    start = time.perf_counter()
    import lm_eval.tasks

    imported = time.perf_counter()
    from eval.accuracy import _full_task_manager

    _full_task_manager()
    yamls = sum(1 for _ in Path(lm_eval.tasks.__file__).parent.rglob("*.yaml"))
    return {"import_s": imported - start, "index_s": time.perf_counter() - imported, "yamls": yamls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows for the perplexities")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--elements", type=int, default=8_000_000, help="values converted per timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from prune.data.text import prepare
    from prune.runs.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    windows = prepare(tokenizer, "embedded-docs").test_blocks(args.seq_len)[: args.windows]
    init = noisy_init(model, windows)
    print(f"noisy init: {init}", flush=True)
    convert = conversion_ms(args.elements)
    print(f"conversion ms: {convert}", flush=True)
    index = lm_eval_index_seconds()
    print(f"lm-eval: {index}", flush=True)

    sys.path.insert(0, str(Path(__file__).parent))
    from results import write_section

    command = (
        f"python benchmarks/code_figures.py --windows {args.windows} --seq-len {args.seq_len} "
        f"--threads {args.threads} --elements {args.elements}"
    )
    body = "\n".join(
        [
            "## Figures behind design choices in the code",
            "",
            f"Command: `{command}` (SmolLM2-135M, float32, {args.threads} torch thread(s), torch {torch.__version__}; "
            "shared 2-core CPU).",
            "",
            "| what | figure |",
            "|---|---:|",
            f"| MaskLLM noisy init (N(0, {INIT_STD}^2) + prior shift at strength {STRENGTH:g}, magnitude 2:4 prior): "
            f"groups whose step-0 choice is not the prior | {init['flipped'] / init['groups']:.2%} of "
            f"{init['groups']:,} |",
            f"| perplexity, {args.windows} held-out windows of {args.seq_len} tokens: dense / prior / noisy init | "
            f"{init['dense']:.2f} / {init['prior']:.2f} / {init['noisy']:.2f} |",
            f"| float32 -> bfloat16, {args.elements:,} values (median ms) | {convert['bfloat16']:.2f} |",
            f"| float32 -> float16, {args.elements:,} values (median ms) | {convert['float16']:.2f} |",
            f"| `import lm_eval.tasks` (s) | {index['import_s']:.1f} |",
            f"| lm-eval TaskManager over its {index['yamls']:,} task YAMLs plus ours (s) | {index['index_s']:.1f} |",
            "",
            "prune.methods.nm_gumbel starts from noise-free logits (the prior wins every group at step 0) because of "
            "the first two rows; it keeps the forward's Gumbel noise as bfloat16 on CPU because of the next two; "
            "eval.accuracy builds lm-eval's full index once, and only for a non-local task, because of the last two.",
        ]
    )
    print(f"written to {write_section('code_figures', body)}")


if __name__ == "__main__":
    main()
