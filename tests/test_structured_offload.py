"""The one-shot `structured` method under runtime.offload: cpu (activation statistics read block by block, each
block onloaded) and disk (the smaller model written shard by shard), checked against the in-memory run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prune.calibration.placement import OnDevice
from prune.cli import main
from prune.core.errors import UserInputError
from prune.methods.registry import get_method
from prune.runs.export import export_run
from prune.runs.loading import load_model
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.structural.store import gate_set
from tests.conftest import docs_text, make_tiny_llama, save_tiny_model
from tests.test_runtime import _assert_same_perplexity


def _method(score: str, heads: bool = True) -> dict:
    return {"name": "structured", "score": score, "target": {"params": 0.3}, "units": {"heads": heads}}


def _recipe(model_dir, corpus, output, method: dict, offload: str) -> dict:
    return {
        "model": str(model_dir),
        "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
        "method": method,
        "runtime": {"threads": 1, "offload": offload},
        "eval": {"tasks": [], "latency": False, "flops": False, "dense_baseline": False, "extra_texts": []},
        "output": str(output),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A short text: a few held-out windows are enough to compare two runs' perplexities."""
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text(docs_text(20_000))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """run(family, score, offload, heads=True) -> (run directory, report), each run made once per module."""
    dirs = {family: save_tiny_model(tmp_path_factory.mktemp(family), family) for family in ("llama", "gpt2")}
    root, done = tmp_path_factory.mktemp("runs"), {}

    def get(family: str, score: str, offload: str, heads: bool = True):
        key = (family, score, offload, heads)
        if key not in done:
            output = root / "-".join(map(str, key))
            done[key] = output, run(parse_recipe(_recipe(dirs[family], corpus, output, _method(score, heads), offload)))
        return done[key]

    get.dirs = dirs
    return get


def _state(path) -> dict[str, torch.Tensor]:
    return load_model(str(path))[0].state_dict()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


class Recording(OnDevice):
    """OnDevice (CPU to CPU here) that records which blocks visited the work device."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.onloaded: list[int] = []

    def onload(self, index, block):
        self.onloaded.append(index)
        super().onload(index, block)


def test_activation_statistics_are_read_with_each_block_onloaded():
    spec, calibration = get_method("structured"), torch.randint(0, 128, (4, 16))
    config = spec.config_class.model_validate(_method("activation"))
    placed, memory, placement = make_tiny_llama(), make_tiny_llama(), Recording()
    spec.attach(placed, config, calibration, placement=placement)
    spec.attach(memory, config, calibration)
    assert placement.onloaded == [0, 1]
    pairs = zip(gate_set(placed).all(), gate_set(memory).all())
    assert all(torch.equal(a.hard(), b.hard()) for a, b in pairs)


@pytest.mark.parametrize("family, score", [("llama", "activation"), ("gpt2", "magnitude")])  # with and without data
def test_offload_cpu_keeps_the_in_memory_units_and_perplexity(runs, family, score, one_thread):
    (memory_dir, memory), (cpu_dir, cpu) = runs(family, score, "none"), runs(family, score, "cpu")
    gates, expected = load_file(cpu_dir / "masks.safetensors"), load_file(memory_dir / "masks.safetensors")
    assert gates.keys() == expected.keys() and any(name.startswith("ffn.") for name in gates)
    assert all(torch.equal(gates[name], expected[name]) for name in expected)
    _assert_same_perplexity(cpu["perplexity"], memory["perplexity"])
    assert cpu["sparsity"] == memory["sparsity"] and cpu["structure"] == memory["structure"]
    _assert_same_state(_state(cpu_dir), _state(memory_dir))
    shutil.rmtree(cpu_dir / "model")
    export_run(cpu_dir)  # rebuilt from the base model and the saved gates
    _assert_same_state(_state(cpu_dir), _state(memory_dir))


@pytest.mark.parametrize("family, heads, score", [("llama", True, "activation"), ("gpt2", False, "magnitude")])
def test_offload_disk_writes_the_in_memory_smaller_model(runs, family, heads, score, one_thread):
    (memory_dir, memory), (disk_dir, disk) = runs(family, score, "none", heads), runs(family, score, "disk", heads)
    streamed = AutoModelForCausalLM.from_pretrained(disk_dir / "model")  # plain transformers
    _assert_same_state(streamed.state_dict(), _state(memory_dir))
    kept, dense = (
        (streamed.config.intermediate_size, 128)
        if family == "llama"
        else (streamed.config.n_inner, 4 * streamed.config.n_embd)
    )
    assert kept < dense  # a really smaller model
    _assert_same_perplexity(disk["perplexity"], memory["perplexity"])
    assert disk["params"] == memory["params"]
    assert disk["sparsity"] == memory["sparsity"] and disk["structure"] == memory["structure"]
    assert "masks" in disk["skipped"] and not (disk_dir / "masks.safetensors").exists()


def test_offload_disk_refuses_a_smaller_model_plain_transformers_cannot_describe(runs, corpus, tmp_path, capsys):
    recipe = _recipe(runs.dirs["gpt2"], corpus, tmp_path / "run", _method("magnitude"), "disk")
    with pytest.raises(UserInputError, match=r"not ones the standard config fields can say.*runtime.offload: cpu"):
        run(parse_recipe(recipe))
    assert not (tmp_path / "run").exists()
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    assert main(["run", str(tmp_path / "recipe.yaml")]) == 2
    assert "runtime.offload: cpu" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "run").exists()
