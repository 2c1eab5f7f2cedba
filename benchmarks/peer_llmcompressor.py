"""The `oneshot` benchmark's peer row: llm-compressor's one-shot SparseGPT or Wanda on the tokens MaskPrune draws.

llm-compressor pins its own transformers, so it lives in its own virtualenv and this script runs there (called by
`benchmarks/oneshot.py --peer-python ENV/bin/python`). It reads the calibration blocks and the test windows from
the safetensors file the benchmark wrote, prunes with llm-compressor's sequential pipeline (one decoder layer at a
time, as MaskPrune does), checks that every pruned weight matrix is exactly N:M, and scores each text with
MaskPrune's own `eval.perplexity` (the only MaskPrune module it imports: torch only), so both sides' figures come
from the same code. Prints one JSON line: prune seconds, the process's peak RSS after pruning and at the end, the
N:M check, and each text's per-window NLL sums (the benchmark turns them into perplexities with intervals).

    ENV/bin/python benchmarks/peer_llmcompressor.py --model DIR --tokens tokens.safetensors --method sparsegpt
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.perplexity import perplexity  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def modifier(method: str, pattern: str):
    """The llm-compressor modifier of `method` at N:M `pattern`, on every linear of the decoder layers (lm_head
    ignored, as MaskPrune's default targets leave it), with SparseGPT's block size and dampening at MaskPrune's
    defaults (128, 0.01)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common = {"sparsity": 0.5, "mask_structure": pattern, "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if method == "sparsegpt":
        return SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)
    return WandaPruningModifier(**common)


def nm_violations(model: torch.nn.Module, n: int, m: int) -> int:
    """Groups of `m` consecutive inputs, over every linear in the decoder layers, holding more than `n` nonzeros."""
    bad = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            groups = module.weight.detach().reshape(-1, m)
            bad += int(((groups != 0).sum(dim=1) > n).sum())
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a save_pretrained directory (MaskPrune's cached alias)")
    parser.add_argument("--tokens", required=True, help="safetensors: `calibration` and each text's test windows")
    parser.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-eval", action="store_true", help="prune only (the process's peak is then pruning's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = load_file(args.tokens)
    calibration = tokens.pop("calibration")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # one batch per block, as llm-compressor's own tokenized datasets give it (batch_size 1)
    batches = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in calibration]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=modifier(args.method, args.pattern),
        dataset=loader,
        num_calibration_samples=len(batches),
        max_seq_length=calibration.shape[1],
        pipeline="sequential",
    )
    seconds = time.perf_counter() - start
    n, m = (int(part) for part in args.pattern.split(":"))
    result = {
        "method": args.method,
        "pattern": args.pattern,
        "calibration_blocks": list(calibration.shape),
        "prune_seconds": seconds,
        "prune_peak_rss_mb": peak_rss_mb(),
        "nm_violations": nm_violations(model, n, m),
    }
    if not args.no_eval:
        result["window_nll"] = {
            name: list(perplexity(model, blocks, desc=name).window_nll) for name, blocks in tokens.items()
        }
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
