"""The memory preflight's training estimate (prune.runs.preflight) against measured peak RSS.

    PYTHONPATH=. python benchmarks/memory_estimate.py

Random Llamas of 4 and 8 blocks (hidden 256, FFN 768, 8 heads over 4 key/value heads, vocabulary 8192), float32 on
CPU, nm_gumbel 2:4 (prior magnitude) trained 2 steps by `prune run` in a fresh process per case, one torch thread.
The growth of peak RSS from batch 1 to batch 16 over the tokens added is what one token of a micro-batch costs;
the growth from 4 to 8 blocks at batch 1, less the added weights and activations, over the weights added is the
mask training state per targeted weight. Each is set beside the estimate the preflight uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.results import write_section
from prune.models.preflight import model_skeleton, shape_of
from prune.runs.preflight import ADAM_COPIES
from tests.conftest import docs_text, save_tiny_model

SEQ_LEN = 256
BATCHES = (1, 16)


def make_model(directory: Path, blocks: int, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=blocks,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def peak_rss_mb(root: Path, model: Path, batch: int) -> float:
    recipe = {
        "model": str(model),
        "data": {"source": str(root / "docs.txt"), "calibration_samples": 4, "seq_len": SEQ_LEN},
        "method": {"name": "nm_gumbel", "sparsity": "2:4", "prior": "magnitude"},
        "train": {"steps": 2, "batch_size": batch, "checkpoint_every": 100, "log_every": 1},
        "eval": {"tasks": [], "extra_texts": [], "dense_baseline": False, "perplexity": False, "latency": False},
        "export": {"save_model": False},
        "runtime": {"threads": 1},
    }
    path = root / f"{model.name}-{batch}.json"
    path.write_text(json.dumps(recipe))
    output = root / f"run-{model.name}-{batch}"
    subprocess.run(
        [sys.executable, "-m", "prune.cli", "run", str(path), "--output", str(output)],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    return json.loads((output / "report.json").read_text())["memory"]["peak_rss_mb"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "docs.txt").write_text(docs_text())
        save_tiny_model(root / "tokenizer")
        rows, measured = [], {}
        for blocks in (4, 8):
            model = make_model(root / f"llama{blocks}", blocks, root / "tokenizer")
            shape = shape_of(model_skeleton(model))
            rss = {batch: peak_rss_mb(root, model, batch) for batch in BATCHES}
            tokens = (BATCHES[1] - BATCHES[0]) * SEQ_LEN
            per_token = (rss[BATCHES[1]] - rss[BATCHES[0]]) * 1024**2 / tokens
            estimate = shape.training_bytes_per_token(torch.float32)
            measured[blocks] = (rss[BATCHES[0]], shape, estimate)
            rows.append(
                f"| {blocks} | {rss[1]:.0f} | {rss[16]:.0f} | {per_token / 1024:.0f} | {estimate / 1024:.0f} | "
                f"{estimate / per_token:.2f} |"
            )
        (rss4, _, estimate4), (rss8, _, estimate8) = measured[4], measured[8]
        block_weights = sum(
            module.weight.numel()
            for module in model_skeleton(root / "llama8").model.layers[0].modules()
            if isinstance(module, torch.nn.Linear)
        )
        weights_added = 4 * block_weights
        activations_added = SEQ_LEN * (estimate8 - estimate4)
        state = ((rss8 - rss4) * 1024**2 - activations_added - weights_added * 4) / weights_added
    body = f"""## Memory preflight: estimated vs measured training memory

`PYTHONPATH=. python benchmarks/memory_estimate.py` (one torch thread, a 2-core CPU shared with other jobs). Random
float32 Llamas (hidden 256, FFN 768, vocabulary 8192), nm_gumbel 2:4 trained 2 steps by `prune run` at seq_len
{SEQ_LEN}, peak RSS from report.json; per token = (RSS at batch 16 - at batch 1) / the {15 * SEQ_LEN} tokens added.
The estimate is `ModelShape.training_bytes_per_token` (prune/models/preflight.py), which the preflight multiplies
by train.batch_size x data.seq_len.

| blocks | peak RSS, batch 1 (MB) | batch 16 (MB) | per token (KB) | estimated (KB) | estimate / measured |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Mask training state (4 more blocks at batch 1, less their weights and estimated activations, per added targeted
weight): {state:.1f} bytes measured; the preflight counts C(4,2)/4 = 1.5 trained values x {ADAM_COPIES} float32
copies = 24 bytes for 2:4."""
    write_section("memory_estimate", body)
    print(body)


if __name__ == "__main__":
    main()
