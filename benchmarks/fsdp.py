"""Sharded nm_gumbel mask training (FSDP2, 2 processes, gloo on CPU) against DDP and one process -> the `fsdp`
section of RESULTS.md: each process's share of the mask parameters and AdamW state, and how far the final
masks are from DDP's and from a one-process run's with the same global batch.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fsdp.py

nm_gumbel draws its Gumbel noise per process (prune.methods.nm_gumbel.kernel._draw_seed), so two processes
sample other noise than one: the like-for-like reference of FSDP is DDP with the same processes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.results import write_section
from prune.methods.nm_gumbel.method import NMGumbelConfig, attach_nm_gumbel
from prune.training.config import TrainConfig
from prune.training.trainer import train

REPO = Path(__file__).parent.parent
COMMAND = "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fsdp.py"
GLOBAL_BATCH, STEPS = 8, 20


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (64, 32), generator=torch.Generator().manual_seed(1))


def run(mode: str, out: Path) -> None:
    """One training run: `single` in this process, `fsdp` / `ddp` inside `accelerate launch` (2 processes)."""
    from tests.fsdp_worker import fsdp_accelerator, shares

    accelerator = {"fsdp": fsdp_accelerator, "ddp": lambda: Accelerator(cpu=True), "single": Accelerator}[mode]()
    net = model()
    objective = attach_nm_gumbel(net, NMGumbelConfig(name="nm_gumbel", prior="magnitude"), None)
    config = TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH // accelerator.num_processes, lr=0.05, log_every=10)
    train(net, objective, tokens(), config, out / mode, accelerator=accelerator)
    (out / f"{mode}-shares-rank{accelerator.process_index}.json").write_text(json.dumps(shares(accelerator)))


def launch(mode: str, out: Path) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29741", "benchmarks/fsdp.py", "--worker", mode, str(out)]
    subprocess.run(command, check=True, cwd=REPO)


def difference(a: Path, b: Path) -> dict:
    one, two = load_file(a), load_file(b)
    return {"bit_equal": all(torch.equal(one[k], two[k]) for k in one),
            "max_abs_diff": max((one[k] - two[k]).abs().max().item() for k in one)}


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for mode in ("fsdp", "ddp"):
            launch(mode, out)
        run("single", out)
        last = {mode: out / mode / "train" / "last.safetensors" for mode in ("fsdp", "ddp", "single")}
        rows = [json.loads((out / f"fsdp-shares-rank{rank}.json").read_text()) for rank in (0, 1)]
        vs_ddp, vs_single = difference(last["fsdp"], last["ddp"]), difference(last["fsdp"], last["single"])
        ddp_vs_single = difference(last["ddp"], last["single"])
    lines = [
        "## Sharded mask training (FSDP2) vs DDP and one process",
        "",
        f"Command: `{COMMAND}` (2 processes, gloo on CPU; accelerate's FSDP2 plugin, one shard group per decoder",
        f"block). nm_gumbel 2:4 on a random 4-block Llama (hidden 128), {STEPS} steps, global batch {GLOBAL_BATCH}",
        "(2 x 4 rows sharded, 1 x 8 rows alone).",
        "",
        "| process | mask elements held | of | AdamW state elements held | of |",
        "|---|---|---|---|---|",
        *[f"| {rank} | {row['mask_elements']} | {row['mask_total']} | {row['optimizer_elements']} | "
          f"{row['optimizer_total']} |" for rank, row in enumerate(rows)],
        "",
        "| final masks (train/last.safetensors) | bit-equal | max abs diff of logits |",
        "|---|---|---|",
        f"| FSDP vs DDP (2 processes) | {vs_ddp['bit_equal']} | {vs_ddp['max_abs_diff']:.3g} |",
        f"| FSDP vs 1 process | {vs_single['bit_equal']} | {vs_single['max_abs_diff']:.3g} |",
        f"| DDP vs 1 process | {ddp_vs_single['bit_equal']} | {ddp_vs_single['max_abs_diff']:.3g} |",
        "",
        "nm_gumbel draws its Gumbel noise per process, so 2 processes sample other noise than 1 and their masks",
        "differ from the 1-process run by design (DDP differs alike); FSDP against DDP is the like-for-like check.",
        "With a deterministic mask (tests/test_fsdp.py) the 2-process FSDP masks equal the 1-process ones to",
        "float rounding (atol 1e-4; the averaged gradient is summed in another order) and a resumed run is",
        "bit-identical.",
    ]
    print(write_section("fsdp", "\n".join(lines)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        torch.set_num_threads(1)
        run(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
