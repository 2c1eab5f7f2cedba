"""Sharded mask training (FSDP2 over gloo on CPU, 2 processes) against a one-process run, and the refusals of an
FSDP launch that cannot shard."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prune.cli import main
from prune.core.errors import UserInputError
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.training.trainer import train
from tests.conftest import docs_text, save_tiny_model
from tests.test_train import CountingObjective, config, masked_tiny_llama, patterned_tokens

REPO = Path(__file__).parent.parent


def test_two_process_fsdp_equals_one_process_and_resumes_identically(tmp_path):
    """Same global batch (2 processes x 2 rows vs 1 x 4): the gathered masks match a one-process run to float
    rounding (the gradient average is summed in another order), each process holds half of the masks and of the
    AdamW state, the checkpoint files have the one-process layout, and an interrupted run resumes bit-identically."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29731", "-m", "tests.fsdp_worker", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        shares = json.loads((tmp_path / f"shares-rank{rank}.json").read_text())
        assert shares["sharded"] and shares["world"] == 2
        assert shares["mask_elements"] * 2 == shares["mask_total"]
        assert shares["optimizer_elements"] * 2 == shares["optimizer_total"]

    initial = {name: param.detach() for name, param in masked_tiny_llama().named_parameters()}
    train(masked_tiny_llama(), CountingObjective(), patterned_tokens(), config(), tmp_path / "single")
    single = load_file(tmp_path / "single" / "train" / "last.safetensors")
    sharded = load_file(tmp_path / "full" / "train" / "last.safetensors")
    assert sharded.keys() == single.keys()
    for name in single:
        assert (single[name] - initial[name]).abs().max() > 0.1  # the masks moved, so the comparison means something
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=1e-4)
    checkpoint = Path("train") / "checkpoints" / "step-12"
    for file in ("masks.safetensors", "optimizer.safetensors"):
        one, two = load_file(tmp_path / "single" / checkpoint / file), load_file(tmp_path / "full" / checkpoint / file)
        assert one.keys() == two.keys() and all(one[key].shape == two[key].shape for key in one)
    resumed = load_file(tmp_path / "resumed" / "train" / "last.safetensors")
    assert all(torch.equal(resumed[name], sharded[name]) for name in sharded)


@pytest.fixture
def fsdp_launch(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets


def _recipe(tmp_path: Path, method: str) -> Path:
    corpus = tmp_path / "docs.txt"
    corpus.write_text(docs_text())
    recipe = {
        "model": str(save_tiny_model(tmp_path / "llama", "llama")),
        "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
        "method": {"name": method, **({"sparsity": "2:4"} if method != "gating" else {})},
        "train": {"steps": 2 if method != "wanda" else 0}, "runtime": {"device": "cpu"},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


@pytest.mark.parametrize("method, message", [
    ("wanda", "not verified to train sharded"),
    ("gating", "not verified to train sharded"),  # learnable, not sharded
    ("nm_gumbel", "needs an accelerator"),  # shardable, but accelerate does not shard on a CPU
])
def test_an_fsdp_launch_that_cannot_shard_exits_2_before_writing(tmp_path, fsdp_launch, method, message, capsys):
    recipe = _recipe(tmp_path, method)
    assert main(["run", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert message in error and "recipes/accelerate/ddp.yaml" in error
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserInputError, match=message):
        run(parse_recipe(json.loads(recipe.read_text())))
    assert not (tmp_path / "run").exists()
