"""Every `accelerate launch` line the docs and the accelerate configs document (docs/training.md, the comments of
recipes/accelerate/*.yaml), run as written on a tiny model: the DDP line starts 2 CPU processes on gloo on a
machine without GPUs, and the lines documented as refused (`--cpu`, which accelerate runs as one process whatever
num_processes says; FSDP on a CPU) exit non-zero with one paragraph, no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import docs_text, save_tiny_model

REPO = Path(__file__).parent.parent
DDP = "accelerate launch -q --config_file recipes/accelerate/ddp.yaml -m prune.cli run RECIPE"
DDP_CPU = "accelerate launch -q --config_file recipes/accelerate/ddp.yaml --cpu -m prune.cli run RECIPE"
FSDP = "accelerate launch -q --config_file recipes/accelerate/fsdp.yaml -m prune.cli run RECIPE"
FSDP_CPU = "accelerate launch -q --config_file recipes/accelerate/fsdp.yaml --cpu -m prune.cli run RECIPE"
ONE_PROCESS = "`accelerate launch --cpu` started ONE process"
# what each documented line does on this (CPU-only) machine: None runs, else the refusal's phrase
EXPECTED = {DDP: None, DDP_CPU: ONE_PROCESS, FSDP: "an FSDP launch needs an accelerator", FSDP_CPU: ONE_PROCESS}


def documented_lines() -> dict[str, bool]:
    """Each `accelerate launch ...` line of the configs' comments and of docs/training.md, and whether it is marked
    `# refused`."""
    lines = {}
    for config in [*sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), REPO / "docs" / "training.md"]:
        for line in config.read_text().splitlines():
            text = line.removeprefix("#").strip()
            if line.startswith(("#   accelerate launch", "    accelerate launch")):
                command, _, note = text.partition("#")
                refused = "refused" in note
                assert lines.get(command.strip(), refused) == refused, f"{command} is refused in one place only"
                lines[command.strip()] = refused
    return lines


def test_the_tested_lines_are_the_documented_ones():
    """Every documented line is tested; those marked `# refused` are refused on any machine (the FSDP line runs on
    GPUs and is refused only on a CPU, as its config says)."""
    assert documented_lines() == {line: refusal == ONE_PROCESS for line, refusal in EXPECTED.items()}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch")
    (root / "docs.txt").write_text(docs_text())
    save_tiny_model(root / "llama")
    recipe = {
        "model": str(root / "llama"),
        "data": {"source": str(root / "docs.txt"), "calibration_samples": 4, "seq_len": 32},
        "method": {"name": "nm_gumbel", "sparsity": "2:4", "prior": "magnitude"},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1},
        "eval": {"dense_baseline": False, "tasks": [], "extra_texts": [], "latency": False, "flops": False},
        "export": {"save_model": False},
        "runtime": {"device": "cpu", "threads": 1},
    }
    path = root / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(line: str, recipe: Path, output: Path) -> subprocess.CompletedProcess:
    """`line` as a user types it (accelerate's own module for the `accelerate` script), on a free port."""
    argv = shlex.split(line.replace("RECIPE", str(recipe)))
    assert argv[:2] == ["accelerate", "launch"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    return subprocess.run(
        [*command, *argv[2:], "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine these lines run on the GPUs")
@pytest.mark.parametrize("line", list(EXPECTED), ids=["ddp", "ddp --cpu", "fsdp", "fsdp --cpu"])
def test_a_documented_launch_line_does_what_its_config_says(line, recipe, tmp_path):
    result = launch(line, recipe, tmp_path / "run")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    refusal = EXPECTED[line]
    if refusal is None:
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        assert report["train"]["processes"] == 2  # two CPU processes (gloo), each a share of every batch
        return
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert refusal in message, message[-3000:]
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1, "one paragraph, once"
    assert not (tmp_path / "run").exists()
