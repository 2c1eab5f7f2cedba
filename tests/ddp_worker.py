"""Run by `accelerate launch --cpu --num_processes 2 -m tests.ddp_worker OUT`: trains toy masks on a tiny
Llama and writes each rank's final masks and its hard-masked loss before/after (see test_train_distributed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import save_file

from prune.masks.base import hard_masks
from prune.training.trainer import train
from tests.test_train import CountingObjective, config, hard_loss, masked_tiny_llama, patterned_tokens


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, data = masked_tiny_llama(), patterned_tokens()
    before = hard_loss(model, data)
    train(model, CountingObjective(), data, config(steps=30, log_every=10), out, accelerator=accelerator)
    model = accelerator.unwrap_model(model)
    rank = accelerator.process_index
    save_file(
        {name: mask.to("cpu").to(dtype=__import__("torch").uint8) for name, mask in hard_masks(model).items()},
        out / f"masks-rank{rank}.safetensors",
    )
    (out / f"loss-rank{rank}.json").write_text(
        json.dumps({"before": before, "after": hard_loss(model, data), "world": accelerator.num_processes})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
