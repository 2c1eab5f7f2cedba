"""Sharded mask training (FSDP2 over gloo on CPU, 2 processes) of every learnable method against a one-process
run, and the refusals of an FSDP launch that cannot shard."""

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
from prune.methods.registry import METHODS, get_method
from prune.models.clip import make_tiny_clip
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.structural.gates import GatedEmbedding
from prune.training.trainer import train, trainable_parameters
from tests.conftest import docs_text, make_tiny_gpt2, save_tiny_model
from tests.fsdp_worker import CASES, Setup, settings

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Every case of tests/fsdp_worker.py trained by 2 processes under FSDP2 (one launch for all)."""
    out = tmp_path_factory.mktemp("fsdp")
    make_tiny_clip(out / "clip")
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
        "29731",
        "-m",
        "tests.fsdp_worker",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)  # a hang, on a busy CPU
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_tensors(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], tolerance: float) -> None:
    """Same names, shapes and dtypes; whole-number tensors (hard masks, keep flags) equal, floats within `tolerance`."""
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].dtype == two[name].dtype, name
        if one[name].is_floating_point():
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=tolerance, msg=name)
        else:
            assert torch.equal(one[name], two[name]), name


def initial_masks(setup: Setup) -> dict[str, torch.Tensor]:
    params = trainable_parameters(setup.model, setup.objective)
    return {name: param.detach().clone() for name, param in params.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_process_fsdp_equals_one_process_and_resumes_identically(sharded, case, tmp_path):
    """Same global batch (2 processes x 2 rows vs 1 x 4): each process holds about half of the masks and of their
    AdamW state (and together all of it, once), the gathered masks and the method's own files (masks.safetensors,
    predictors.safetensors) match a one-process run to float rounding (hard decisions exactly), the checkpoint
    files have the one-process layout, and a run interrupted in step 3 resumes bit-identically."""
    out = sharded / case
    for rank in (0, 1):
        shares = json.loads((out / f"shares-rank{rank}.json").read_text())
        assert shares["sharded"] and shares["world"] == 2
        for kind in ("mask", "optimizer"):
            held = [json.loads((out / f"shares-rank{r}.json").read_text())[f"{kind}_elements"] for r in (0, 1)]
            assert sum(held) == shares[f"{kind}_total"] and 0.4 <= held[rank] / sum(held) <= 0.6

    setup = CASES[case](sharded)
    initial = initial_masks(setup)
    train(setup.model, setup.objective, setup.data, settings(1), tmp_path, task_loss=setup.task_loss)
    setup.save(tmp_path / "saved")
    single = load_file(tmp_path / "train" / "last.safetensors")
    assert max((single[name] - initial[name]).abs().max() for name in single) > 10 * setup.tolerance  # the masks moved
    two = load_file(out / "full" / "train" / "last.safetensors")
    assert_same_tensors(single, two, setup.tolerance)
    for file in ("masks.safetensors", "predictors.safetensors"):
        if (tmp_path / "saved" / file).exists():
            assert_same_tensors(load_file(tmp_path / "saved" / file), load_file(out / "saved" / file), setup.tolerance)
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == sorted(
        path.name for path in (out / "saved").iterdir()
    )
    checkpoint = Path("train") / "checkpoints" / "step-4"
    for file in ("masks.safetensors", "optimizer.safetensors"):
        one, two = load_file(tmp_path / checkpoint / file), load_file(out / "full" / checkpoint / file)
        assert one.keys() == two.keys() and all(one[key].shape == two[key].shape for key in one)
    full = load_file(out / "full" / "train" / "last.safetensors")
    resumed = load_file(out / "resumed" / "train" / "last.safetensors")
    assert all(torch.equal(resumed[name], full[name]) for name in full)


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
        "train": {"steps": 2 if method != "wanda" else 0},
        "runtime": {"device": "cpu"},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def test_a_gated_embedding_still_shows_accelerate_its_tie_to_the_lm_head():
    """accelerate's FSDP2 prepare puts a model's input embeddings and LM head in one shard group when their weights
    are one tensor (torch refuses a tensor in two groups): VIB's hidden gate on GPT-2's embeddings keeps the tie
    in sight (a 2-process VIB run of this GPT-2 equals one process like the Llama case)."""
    model = make_tiny_gpt2()
    spec = get_method("vib")
    spec.attach(model, spec.config_class.model_validate({"name": "vib", "target": {"params": 0.3}}), None)
    assert isinstance(model.get_input_embeddings(), GatedEmbedding)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


def test_every_learnable_method_trains_sharded_and_no_one_shot_method_claims_to():
    """check_fsdp's refusal says a method trains no masks: true only while fsdp marks exactly the learnable ones."""
    assert (
        {name for name in METHODS if get_method(name).fsdp}
        == {name for name, declared in METHODS.items() if declared.kind == "learnable"}
        == {"nm_gumbel", "vib", "binary", "gating"}
    )


@pytest.mark.parametrize(
    "method, message",
    [
        ("wanda", "trains no masks, so an FSDP launch has nothing to shard"),
        ("gating", "needs an accelerator"),  # shardable, but accelerate does not shard on a CPU
        ("nm_gumbel", "needs an accelerator"),
    ],
)
def test_an_fsdp_launch_that_cannot_shard_exits_2_before_writing(tmp_path, fsdp_launch, method, message, capsys):
    recipe = _recipe(tmp_path, method)
    assert main(["run", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert message in error and "recipes/accelerate/ddp.yaml" in error
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserInputError, match=message):
        run(parse_recipe(json.loads(recipe.read_text())))
    assert not (tmp_path / "run").exists()
