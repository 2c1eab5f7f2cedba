"""runtime: section: dtype/device resolution, preflight arithmetic, sharded writing, block placement and streaming
from disk (bit-identical to pruning the loaded model), and the bad-input refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.perplexity import perplexity
from prune.calibration.placement import OnDevice
from prune.calibration.streaming import stream_perplexity, stream_prune
from prune.core.errors import UserInputError
from prune.methods.oneshot import method as oneshot
from prune.methods.oneshot.sparsegpt import HessianStats
from prune.methods.registry import get_method
from prune.models.blocks import weight_matrix
from prune.models.preflight import GB, ModelSize, check_fit, model_size
from prune.models.runtime import Runtime, RuntimeConfig, resolve_runtime
from prune.models.shards import INDEX_FILE, ShardedWriter, shard_files
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.sweep.compare import compare, render
from prune.tasks.registry import get_task
from prune.tasks.streamed import StreamedCausalLM
from tests.conftest import docs_text, make_tiny_gpt2, make_tiny_llama, save_tiny_model

CPU = torch.device("cpu")
CONFIGS = {
    "magnitude": oneshot.MagnitudeConfig(name="magnitude", sparsity=0.5),
    "wanda": oneshot.WandaConfig(name="wanda", sparsity="2:4"),
    "sparsegpt": oneshot.SparseGPTConfig(name="sparsegpt", sparsity="2:4"),
}


def _calibration() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _in_memory(model, config, calibration, placement=None):
    """The loaded-model path: the method's own function, its masks (and new weights) applied to the model."""
    targets = oneshot.targets_of(config)(model)
    if config.name == "magnitude":
        result = oneshot.magnitude(model, targets, config.pattern, config.granularity, placement=placement)
    elif config.name == "wanda":
        result = oneshot.wanda(
            model, targets, config.pattern, config.granularity, calibration, batch_size=2, placement=placement
        )
    else:
        result = oneshot.sparsegpt(model, targets, config.pattern, calibration, batch_size=2, placement=placement)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in result.weights.items():
            weight_matrix(modules[name]).copy_(weight)
        for name, mask in result.masks.items():
            weight_matrix(modules[name]).masked_fill_(~mask, 0)
    return result


def _stream(source, out, config, calibration, dtype=torch.float32, max_shard_bytes=2 * GB):
    """Streamed pruning through the method's registered `block_pruning` hook, as the streamed task prunes."""
    spec = get_method(config.name)
    pruning = spec.block_pruning(config)
    stream_prune(
        source,
        out,
        lambda model: spec.targets(model, config),
        pruning.prune,
        pruning.make_stats,
        calibration,
        device=CPU,
        dtype=dtype,
        batch_size=2,
        max_shard_bytes=max_shard_bytes,
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_pruning_is_bit_identical_to_in_memory(tmp_path, family, name, one_thread):
    model = make_tiny_llama() if family == "llama" else make_tiny_gpt2()
    model.save_pretrained(tmp_path / "dense")
    _stream(tmp_path / "dense", tmp_path / "pruned", CONFIGS[name], _calibration(), max_shard_bytes=40_000)
    _in_memory(model, CONFIGS[name], _calibration())
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").state_dict()
    expected = model.state_dict()
    assert streamed.keys() == expected.keys()
    assert [key for key in expected if not torch.equal(expected[key], streamed[key])] == []
    assert len(json.loads((tmp_path / "pruned" / INDEX_FILE).read_text())["metadata"]) == 1  # several shards, one index
    assert len(list((tmp_path / "pruned").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_perplexity_equals_the_loaded_models(tmp_path, family, one_thread):
    model = make_tiny_llama() if family == "llama" else make_tiny_gpt2()
    model.save_pretrained(tmp_path)
    heldout = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(5))
    streamed = stream_perplexity(tmp_path, heldout, device=CPU, dtype=torch.float32, batch_size=2)
    loaded = perplexity(model, heldout)
    assert streamed.value == pytest.approx(loaded.value, rel=1e-5)
    assert streamed.tokens == 3 * 31 and streamed.window_tokens == loaded.window_tokens
    assert streamed.window_nll == pytest.approx(loaded.window_nll, rel=1e-6)


def test_onloading_blocks_gives_the_same_masks_as_a_resident_model(one_thread):
    for name in ("magnitude", "wanda"):
        resident = _in_memory(make_tiny_llama(), CONFIGS[name], _calibration())
        placed = _in_memory(make_tiny_llama(), CONFIGS[name], _calibration(), placement=OnDevice(CPU))
        assert resident.masks.keys() == placed.masks.keys()
        assert all(torch.equal(resident.masks[key], placed.masks[key]) for key in resident.masks)


def test_bfloat16_pruning_agrees_with_float32_and_the_hessian_stays_float32(tmp_path, one_thread):
    heldout = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(5))
    figures = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_tiny_llama().to(dtype)
        result = _in_memory(model, CONFIGS["sparsegpt"], _calibration())
        figures[dtype] = (result.masks, perplexity(model, heldout).value)
    agree = [
        torch.eq(figures[torch.float32][0][k], figures[torch.bfloat16][0][k]).float().mean()
        for k in figures[torch.float32][0]
    ]
    assert min(agree) > 0.9
    assert figures[torch.bfloat16][1] == pytest.approx(figures[torch.float32][1], rel=0.03)
    stats = HessianStats(8)
    stats.add(torch.randn(4, 8, dtype=torch.bfloat16))
    assert stats.matrix().dtype == torch.float32


def test_preflight_arithmetic_from_a_config_without_weights(tmp_path):
    model = make_tiny_llama()
    model.config.save_pretrained(tmp_path)  # config.json only: no weights at all
    size = model_size(tmp_path)
    assert size.parameters == sum(p.numel() for p in model.parameters())
    assert size.largest_block_parameters == sum(p.numel() for p in model.model.layers[0].parameters())
    assert size.bytes(torch.bfloat16) * 2 == size.bytes(torch.float32)

    seven_b = ModelSize(6_738_415_616, 202_383_360)
    in_ram = Runtime(CPU, torch.bfloat16, "none")
    with pytest.raises(
        UserInputError, match=r"12\.55 GB in bfloat16.*needs 12\.55 GB of RAM, and 8\.00 GB is free.*offload: disk"
    ):
        check_fit(seven_b, in_ram, free_ram=8 * GB, free_device=None)
    check_fit(seven_b, in_ram, free_ram=13 * GB, free_device=None)
    check_fit(seven_b, Runtime(CPU, torch.bfloat16, "disk"), free_ram=1 * GB, free_device=None)
    with pytest.raises(UserInputError, match="needs 25.10 GB of cuda:0, and 16.00 GB is free"):
        check_fit(seven_b, Runtime(torch.device("cuda", 0), torch.float32, "none"), 64 * GB, 16 * GB)
    check_fit(seven_b, Runtime(torch.device("cuda", 0), torch.float32, "cpu"), 64 * GB, 16 * GB)  # one block on it


def test_sharded_writer_index_loads_and_an_interrupted_write_leaves_no_index(tmp_path):
    model = make_tiny_llama()
    state = model.state_dict()
    specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]
    model.config.save_pretrained(tmp_path / "ok")
    with ShardedWriter(tmp_path / "ok", specs, max_shard_bytes=30_000) as writer:
        for name, _, _ in reversed(specs):  # any order
            writer.write(name, state[name])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ok").state_dict()
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    with pytest.raises(RuntimeError, match="never written"):
        with ShardedWriter(tmp_path / "cut", specs, max_shard_bytes=30_000) as writer:
            writer.write(specs[0][0], state[specs[0][0]])
            writer.close()
    assert not (tmp_path / "cut" / INDEX_FILE).exists()


def test_unavailable_device_and_cpu_float16_are_refused():
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="'cuda' is not available.*runtime.device: cpu"):
            resolve_runtime(RuntimeConfig(device="cuda"))
    with pytest.raises(UserInputError, match="float16.*bfloat16"):
        resolve_runtime(RuntimeConfig(device="cpu", dtype="float16"))
    with pytest.raises(UserInputError, match="runtime.device: 'gpu' is not one of"):
        parse_recipe({"method": {"name": "wanda"}, "runtime": {"device": "gpu"}})


def test_bin_only_checkpoint_cannot_stream(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserInputError, match="no safetensors.*convert it once"):
        shard_files(tmp_path)


def test_only_a_task_whose_model_streams_takes_offload_disk():
    assert get_task("causal-lm", streamed=True) is StreamedCausalLM
    with pytest.raises(UserInputError, match="task 'zero-shot-classification' needs its model in memory.*offload: cpu"):
        get_task("zero-shot-classification", streamed=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text(docs_text())
    return path


def _recipe(model_dir, corpus, output, method="wanda", **runtime):
    return parse_recipe(
        {
            "model": str(model_dir),
            "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
            "method": {"name": method, "sparsity": "2:4"},
            "runtime": {"threads": 1, **runtime},
            "eval": {"tasks": ["docs_lastword"], "limit": 8, "latency": False},
            "output": str(output),
        }
    )


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def paired_runs(request, tmp_path_factory, corpus):
    """One recipe run twice on a tiny model: streamed from disk, and in memory (offload: cpu)."""
    model_dir = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    root = tmp_path_factory.mktemp("runs")
    streamed = run(_recipe(model_dir, corpus, root / "disk", offload="disk"))
    memory = run(_recipe(model_dir, corpus, root / "memory", offload="cpu"))
    return root, streamed, memory


@pytest.mark.slow
def test_streamed_run_writes_a_loadable_model_and_says_what_it_skipped(paired_runs):
    root, report, memory = paired_runs
    assert report["sparsity"]["achieved"] == pytest.approx(0.5)
    assert report["sparsity"]["target"] == memory["sparsity"]["target"]
    assert report["sparsity"]["achieved"] == pytest.approx(memory["sparsity"]["achieved"])
    assert "accuracy" in report["skipped"] and "accuracy" in memory and "accuracy" not in report
    assert "masks" in report["skipped"] and not (root / "disk" / "masks.safetensors").exists()
    assert "skipped" not in memory
    streamed = AutoModelForCausalLM.from_pretrained(root / "disk" / "model").state_dict()
    in_memory = AutoModelForCausalLM.from_pretrained(root / "memory" / "model").state_dict()
    assert all(torch.equal(streamed[name], in_memory[name]) for name in in_memory)
    for name in ("disk", "memory"):  # either way config.json says how the model was pruned
        record = json.loads((root / name / "model" / "config.json").read_text())["pruning"]
        assert (record["tool"], record["method"], record["sparsity"]) == ("maskprune", "wanda", "2:4")


def _assert_same_perplexity(streamed: dict, memory: dict) -> None:
    assert streamed.keys() == memory.keys() >= {"value", "tokens", "seq_len", "windows", "ci95", "window_nll"}
    assert [streamed[key] for key in ("tokens", "seq_len", "windows")] == [
        memory[key] for key in ("tokens", "seq_len", "windows")
    ]
    for key in ("value", "ci95", "window_nll"):
        assert streamed[key] == pytest.approx(memory[key], rel=1e-6, abs=1e-6), key


@pytest.mark.slow
def test_streamed_run_reports_the_in_memory_runs_figures(paired_runs):
    _, streamed, memory = paired_runs
    for figures, expected in ((streamed, memory), (streamed["dense"], memory["dense"])):
        _assert_same_perplexity(figures["perplexity"], expected["perplexity"])
        assert figures["extra_texts"].keys() == expected["extra_texts"].keys() == {"moby-dick", "sotu"}
        for name in ("moby-dick", "sotu"):
            _assert_same_perplexity(
                figures["extra_texts"][name]["perplexity"], expected["extra_texts"][name]["perplexity"]
            )
        assert figures["params"] == expected["params"]
    assert streamed["data"] == memory["data"] and streamed["data"]["used"]["calibration"]["windows"] == 4


@pytest.mark.slow
def test_compare_pairs_a_streamed_run_with_an_in_memory_one(paired_runs, tmp_path):
    root, _, _ = paired_runs
    rows, _ = compare([root / "disk", root / "memory"], tmp_path / "cmp")
    done = [row for row in rows if row["status"] == "done"]
    assert sorted(row["verdict"] for row in done) == ["best", "not distinguishable from best"]
    assert sorted(row["extra_texts.moby-dick.verdict"] for row in done) == ["best", "not distinguishable from best"]
    assert "not distinguishable from best" in render(rows)


@pytest.mark.parametrize(
    "runtime, message",
    [
        ({"offload": "disk", "dtype": "float16"}, "float16"),
        ({"offload": "cpu"}, "nm_gumbel"),
    ]
    + ([({"device": "cuda"}, "not available")] if not torch.cuda.is_available() else []),
)
def test_bad_runtime_is_refused_before_anything_is_written(tmp_path, tiny_dir, corpus, runtime, message):
    method = "nm_gumbel" if runtime.get("offload") == "cpu" else "wanda"
    with pytest.raises(UserInputError, match=message):
        run(_recipe(tiny_dir, corpus, tmp_path / "run", method=method, **runtime))
    assert not (tmp_path / "run").exists()
