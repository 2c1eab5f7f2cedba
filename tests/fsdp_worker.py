"""Run by `accelerate launch --cpu --num_processes 2 -m tests.fsdp_worker OUT` (see test_train_fsdp): trains the
toy masks of a tiny Llama sharded with accelerate's FSDP2 over gloo, once straight through (OUT/full) and once
interrupted at step 7 and resumed in the same processes (OUT/resumed); writes each process's share of the mask
parameters and AdamW state to OUT/shares-rank<r>.json.

accelerate applies an FSDP plugin only on accelerators (on a CPU it silently falls back to DDP), so this worker
switches accelerate's shared state to FSDP after building the Accelerator: the trainer then runs exactly the
code path it runs on GPUs, over gloo."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from prune.training import trainer
from prune.training.sharded import local_numel
from prune.training.trainer import train
from tests.test_train import CountingObjective, config, interrupting_loss, masked_tiny_llama, patterned_tokens


def fsdp_accelerator() -> Accelerator:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
        shared["device"] = torch.device("cpu")
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return accelerator


def shares(accelerator: Accelerator) -> dict:
    """Elements this process holds of the (last prepared) masks and their AdamW state."""
    model, optimizer = accelerator._models[-1], accelerator._optimizers[-1]
    masks = [param for param in model.parameters() if param.requires_grad]
    state = [value for values in optimizer.optimizer.state.values() for value in values.values()
             if torch.is_tensor(value) and value.dim() > 0]
    return {"mask_elements": sum(local_numel(p) for p in masks), "mask_total": sum(p.numel() for p in masks),
            "optimizer_elements": sum(local_numel(v) for v in state), "optimizer_total": sum(v.numel() for v in state),
            "world": accelerator.num_processes, "sharded": trainer.is_sharded(accelerator)}


def main(out: Path) -> None:
    accelerator = fsdp_accelerator()
    data, settings = patterned_tokens(), config(batch_size=2)  # 2 processes x 2 rows = the 1-process batch of 4
    train(masked_tiny_llama(), CountingObjective(), data, settings, out / "full", accelerator=accelerator)
    rank = accelerator.process_index
    (out / f"shares-rank{rank}.json").write_text(json.dumps(shares(accelerator)))
    try:
        train(masked_tiny_llama(), CountingObjective(), data, settings, out / "resumed", accelerator=accelerator,
              task_loss=interrupting_loss(at_call=8))
    except KeyboardInterrupt:
        pass
    train(masked_tiny_llama(), CountingObjective(), data, settings, out / "resumed", accelerator=accelerator,
          resume=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
