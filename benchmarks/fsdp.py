"""Sharded mask training (FSDP2, 2 processes, gloo on CPU) of every learnable method against DDP and one process ->
the `fsdp` section of RESULTS.md: each process's share of the mask parameters and AdamW state, and how far the
final masks are from DDP's and from a one-process run's with the same global batch.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fsdp.py

nm_gumbel draws its Gumbel noise per process (prune.methods.nm_gumbel.kernel._draw_seed), so two processes
sample other noise than one: its like-for-like reference is DDP with the same processes. binary (R-AMT) drops
out gradients from a and b: DDP from each process's own, FSDP from the averaged ones, as one process does, so
its like-for-like reference is one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.results import write_section
from prune.methods.registry import get_method
from prune.models.clip import load_clip, make_tiny_clip
from prune.tasks.classification import classification_loss
from prune.tasks.zero_shot import ZeroShotClassifier
from prune.training.config import TrainConfig
from prune.training.trainer import lm_loss, train, trainable_parameters

REPO = Path(__file__).parent.parent
COMMAND = "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fsdp.py"
GLOBAL_BATCH, STEPS = 8, 20
CLASSES = ["cat", "dog", "bird"]


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (64, 32), generator=torch.Generator().manual_seed(1))


def images() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    pixels, labels = torch.randn(64, 3, 32, 32, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    return [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(64)]


def _attach(net, name: str, **fields):
    spec = get_method(name)
    return spec.attach(net, spec.config_class.model_validate({"name": name, **fields}), None)


def language(name: str, **fields) -> Callable[[Path], tuple[Any, Any, Any, Callable]]:
    def build(out: Path):
        net = model()
        return net, _attach(net, name, **fields), tokens(), lm_loss

    return build


def binary(out: Path):
    """R-AMT on the zero-shot classifier of a tiny random CLIP (vision width 128, 2 blocks)."""
    clip, processor = load_clip(str(out / "clip"))
    return (
        ZeroShotClassifier(clip, processor.tokenizer, CLASSES, ["a photo of a {}."]),
        _attach(clip, "binary"),
        images(),
        classification_loss,
    )


METHODS = {
    "nm_gumbel": (language("nm_gumbel", sparsity="2:4", prior="magnitude"), "2:4, magnitude prior"),
    "vib": (language("vib", target={"params": 0.3}), "params target 0.3; heads, FFN, hidden"),
    "gating": (language("gating"), "FFN neurons, decoupled"),
    "binary": (binary, "tiny CLIP zero-shot, image attention + patch embedding"),
}


def run(mode: str, out: Path) -> None:
    """Every method's training: `single` in this process, `fsdp` / `ddp` inside `accelerate launch` (2 processes)."""
    from tests.fsdp_worker import fsdp_accelerator, new_fsdp_plugin, shares

    accelerator = {"fsdp": fsdp_accelerator, "ddp": lambda: Accelerator(cpu=True), "single": Accelerator}[mode]()
    for name, (build, _) in METHODS.items():
        accelerator.free_memory()
        if mode == "fsdp":
            new_fsdp_plugin()  # the first prepare keeps its model's block classes in the plugin
        net, objective, data, task_loss = build(out)
        config = TrainConfig(steps=STEPS, batch_size=GLOBAL_BATCH // accelerator.num_processes, lr=0.05, log_every=10)
        train(net, objective, data, config, out / mode / name, task_loss=task_loss, accelerator=accelerator)
        (out / f"{mode}-{name}-rank{accelerator.process_index}.json").write_text(json.dumps(shares(accelerator)))


def launch(mode: str, out: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29741",
        "benchmarks/fsdp.py",
        "--worker",
        mode,
        str(out),
    ]
    subprocess.run(command, check=True, cwd=REPO)


def difference(a: Path, b: Path) -> str:
    """'equal' (bit for bit) or the largest absolute difference of any mask parameter."""
    one, two = load_file(a), load_file(b)
    if all(torch.equal(one[k], two[k]) for k in one):
        return "bit-equal"
    return f"{max((one[k] - two[k]).abs().max().item() for k in one):.2g}"


def moved(out: Path, name: str) -> str:
    """The largest change of a mask parameter in the one-process run: the scale of the differences."""
    net, objective, _, _ = METHODS[name][0](out)
    initial = trainable_parameters(net, objective)
    final = load_file(out / "single" / name / "train" / "last.safetensors")
    return f"{max((final[k] - initial[k].detach()).abs().max().item() for k in final):.2g}"


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        make_tiny_clip(out / "clip")
        for mode in ("fsdp", "ddp"):
            launch(mode, out)
        run("single", out)
        rows, diffs = [], []
        for name, (_, setting) in METHODS.items():
            ranks = [json.loads((out / f"fsdp-{name}-rank{rank}.json").read_text()) for rank in (0, 1)]
            rows += [
                f"| {name} | {rank} | {row['mask_elements']} | {row['mask_total']} | "
                f"{row['optimizer_elements']} | {row['optimizer_total']} |"
                for rank, row in enumerate(ranks)
            ]
            last = {mode: out / mode / name / "train" / "last.safetensors" for mode in ("fsdp", "ddp", "single")}
            diffs.append(
                f"| {name} ({setting}) | {difference(last['fsdp'], last['ddp'])} | "
                f"{difference(last['fsdp'], last['single'])} | {difference(last['ddp'], last['single'])} | "
                f"{moved(out, name)} |"
            )
    lines = [
        "## Sharded mask training (FSDP2) vs DDP and one process, every learnable method",
        "",
        f"Command: `{COMMAND}` (2 processes, gloo on CPU; accelerate's FSDP2 plugin, one shard group per decoder",
        "block). A random 4-block Llama (hidden 128) for nm_gumbel, vib and gating, a tiny random CLIP for binary;",
        f"{STEPS} steps, global batch {GLOBAL_BATCH} (2 x {GLOBAL_BATCH // 2} rows sharded, 1 x {GLOBAL_BATCH} alone),"
        " lr 0.05.",
        "",
        "| method | process | mask elements held | of | AdamW state elements held | of |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Final masks (train/last.safetensors, every trained parameter): bit-equal, or the largest absolute difference;",
        "the last column is the largest change of a parameter in the one-process run, the scale to read them against.",
        "",
        "| method | FSDP vs DDP | FSDP vs 1 process | DDP vs 1 process | largest change in training |",
        "|---|---|---|---|---|",
        *diffs,
        "",
        "nm_gumbel draws its Gumbel noise per process, so 2 processes sample other noise than 1 and their masks",
        "differ from the 1-process run by design (DDP differs alike); FSDP against DDP is its like-for-like check.",
        "binary's gradient dropout acts on each process's own gradients under DDP and on the averaged ones under",
        "FSDP (as one process does), so FSDP matches one process and DDP does not. vib draws the same gate noise on",
        "every process (one seed) and gating is deterministic: all three agree to float rounding. tests/test_fsdp.py",
        "checks every method on tiny models: 2-process FSDP equals 1 process (atol 1e-4; 1e-3 for binary, whose",
        "dropout flips a few elements where rounding moves P across its uniform draw), hard masks and saved files",
        "equal, a resumed run bit-identical.",
    ]
    print(write_section("fsdp", "\n".join(lines)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        torch.set_num_threads(1)
        run(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
