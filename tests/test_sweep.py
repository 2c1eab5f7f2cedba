"""`prune sweep` / `prune compare` on tiny models: rows, skips, resume, shared statistics, plots, sensitivity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pydantic import field_validator

from prune.calibration import layerwise as calibration
from prune.cli import main
from prune.core.config import MethodConfig
from prune.core.errors import UserInputError
from prune.masks.base import attach_hard_masks
from prune.masks.targets import method_targets
from prune.methods import registry
from prune.methods.declaration import MethodDeclaration
from prune.methods.oneshot.magnitude import magnitude_scores
from prune.methods.oneshot.masking import mask_from_scores
from prune.methods.spec import MethodSpec
from prune.models.blocks import weight_matrix
from prune.sweep.recipe import load_sweep
from prune.sweep.runner import run_sweep
from tests.conftest import make_tiny_llama, save_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


class FixedNMConfig(MethodConfig):
    """A stand-in learnable method that, like nm_gumbel, accepts N:M patterns only."""

    @field_validator("sparsity")
    @classmethod
    def _nm_only(cls, value):
        if ":" not in str(value):
            raise ValueError("fixed_nm supports N:M patterns only, e.g. 2:4")
        return value


def attach_fixed_nm(model, config, calibration_blocks):
    modules = dict(model.named_modules())
    names = method_targets(model, config.targets, config.pattern, config.skip_incompatible)
    attach_hard_masks(
        model,
        {name: mask_from_scores(magnitude_scores(weight_matrix(modules[name])), config.pattern) for name in names},
    )


# registered like a real method: its declaration names where its MethodSpec lives (this module, as pytest named it)
FIXED_NM = MethodSpec(
    MethodDeclaration("fixed_nm", FixedNMConfig, "learnable", f"{__name__}:FIXED_NM"),
    attach_fixed_nm,
    needs_calibration=False,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many small ops: on a loaded 2-core machine, one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def write_sweep(directory, model_dir, corpus, methods, sparsities, output, extra="", eval_extra="tasks: [], limit: 4"):
    (directory / "base.yaml").write_text(
        f"model: {model_dir}\n"
        f"data: {{source: {corpus}, calibration_samples: 4, seq_len: 32, heldout_fraction: 0.05}}\n"
        "method: {name: wanda, sparsity: 0.5}\n"
        f"eval: {{{eval_extra}, latency: false}}\n"
    )
    path = directory / "sweep.yaml"
    path.write_text(
        f"base: base.yaml\ngrid:\n  methods: {methods}\n  sparsities: {sparsities}\noutput: {output}\n{extra}"
    )
    return path


class Counters:
    """Counts calibration passes, sequential calibrations, pipeline runs, per-target prunes and model loads."""

    def __init__(self, patch):
        import prune.runs.pipeline
        import prune.sweep.shared

        self.calls = {"collect_stats": 0, "prune_layerwise": 0, "pipeline": 0, "prune_from_stats": [], "load": 0}
        for owner, name, key in [
            (calibration, "collect_stats", "collect_stats"),
            (calibration, "prune_layerwise", "prune_layerwise"),
            (prune.runs.pipeline, "run", "pipeline"),
            (prune.sweep.shared, "load_model", "load"),
        ]:
            patch.setattr(owner, name, self._count(getattr(owner, name), key))
        original = prune.sweep.shared.prune_from_stats

        def counted(config, module, stats):
            self.calls["prune_from_stats"].append(config.name)
            return original(config, module, stats)

        patch.setattr(prune.sweep.shared, "prune_from_stats", counted)

    def _count(self, function, key):
        def counted(*args, **kwargs):
            self.calls[key] += 1
            return function(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def fixed_nm():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry.METHODS, "fixed_nm", FIXED_NM.declared)
        yield


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_dir, corpus, fixed_nm):
    """One sweep over 4 methods x 3 levels: shared one-shot points, a pipeline point, and three kinds of skip."""
    directory = tmp_path_factory.mktemp("sweep")
    path = write_sweep(
        directory,
        tiny_dir,
        corpus,
        "[magnitude, wanda, sparsegpt, fixed_nm]",
        "[0.5, 2:4, 3:7]",
        directory / "out",
        eval_extra="tasks: [docs_lastword], limit: 4",
    )
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        counters = Counters(patch)
        result = run_sweep(*load_sweep(path), progress=False, write=lines.append)
    return {"path": path, "out": directory / "out", "result": result, "calls": counters.calls, "lines": lines}


def _row(rows, method, sparsity):
    return next(row for row in rows if row["method"] == method and row["sparsity"] == sparsity)


@pytest.mark.slow
def test_sweep_rows_skips_and_shared_calibration(swept):
    rows, calls = swept["result"]["rows"], swept["calls"]
    assert len(rows) == 1 + 4 * 3
    assert rows[0]["method"] == "dense" and rows[0]["status"] == "dense"
    for method in ("magnitude", "wanda", "sparsegpt"):
        for level in ("0.5", "2:4"):
            row = _row(rows, method, level)
            assert row["status"] == "done" and row["path"] == "shared"
            assert row["achieved"] == pytest.approx(0.5, abs=0.01)
            assert row["perplexity.dense"] == rows[0]["perplexity"]
            assert 0.0 <= row["accuracy.docs_lastword"] <= 1.0 and row["flops.pruned"] < rows[0]["flops.dense"]
        assert _row(rows, method, "3:7")["status"] == "skipped"
        assert "divisible by M=7" in _row(rows, method, "3:7")["reason"]
    assert _row(rows, "fixed_nm", "2:4")["status"] == "done" and _row(rows, "fixed_nm", "2:4")["path"] == "pipeline"
    assert "N:M patterns only" in _row(rows, "fixed_nm", "0.5")["reason"]
    assert "divisible by M=7" in _row(rows, "fixed_nm", "3:7")["reason"]
    # Shared work once: one calibration pass for the whole sweep, no sequential re-calibration, and the
    # pipeline only for the learnable method's two valid-looking points.
    assert calls["collect_stats"] == 1 and swept["result"]["calibration_passes"] == 1
    assert calls["prune_layerwise"] == 0
    assert calls["pipeline"] == 2
    assert calls["load"] == 1
    for level in ("0.5", "2:4"):
        assert sum(row["best"] for row in rows if row["sparsity"] == level) == 1
        done = [row for row in rows if row["sparsity"] == level and row["status"] == "done"]
        for key in ("verdict", "extra_texts.moby-dick.verdict"):  # paired against the level's best, per text
            assert sorted(row[key] == "best" for row in done) == [False] * (len(done) - 1) + [True]
            assert {row[key] for row in done} <= {"best", "not distinguishable from best", "worse"}
        assert all(row["verdict"] == "best" for row in done if row["best"])
    # the live table printed a line per row as it finished
    assert sum(1 for line in swept["lines"] if line.startswith(("magnitude", "wanda", "sparsegpt", "fixed_nm"))) == 12


@pytest.mark.slow
def test_sweep_outputs_and_point_reports(swept):
    out = swept["out"]
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 14 and csv_lines[0].startswith("model,method,sparsity")
    assert "accuracy.docs_lastword" in csv_lines[0] and "timings.prune" in csv_lines[0]
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["rows"]) == 13 and summary["calibration_passes"] == 1
    markdown = (out / "sweep.md").read_text()
    assert "| best |" in markdown and "one layer-by-layer pass over the dense model" in markdown
    assert "moby-dick [95% CI]" in markdown and "paired bootstrap" in markdown
    for name in ("perplexity_vs_sparsity.png", "accuracy_vs_flops.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert not (out / "layers.png").exists()  # the best point's layers are all at 50%: a flat chart shows nothing
    report = json.loads((out / "points" / "sparsegpt-2of4" / "report.json").read_text())
    assert report["sweep"]["path"] == "shared" and report["sweep"]["fingerprint"]
    assert report["dense"]["perplexity"]["value"] == report["perplexity"]["dense"]
    assert report["data"]["used"]["calibration"]["part"] == "train" and len(report["perplexity"]["ci95"]) == 2
    assert set(report["layer_sparsity"]) and (out / "points" / "sparsegpt-2of4" / "masks.safetensors").is_file()
    assert json.loads((out / "points" / "wanda-3of7" / "skipped.json").read_text())["status"] == "skipped"


@pytest.mark.slow
def test_resume_skips_finished_points_and_recomputes_changed_ones(swept, tmp_path, fixed_nm):
    out = tmp_path / "out"
    shutil.copytree(swept["out"], out)
    sweep, base = load_sweep(swept["path"], [f"output={out}"])
    with pytest.MonkeyPatch.context() as patch:
        counters = Counters(patch)
        result = run_sweep(sweep, base, progress=False, write=lambda line: None)
    calls = counters.calls
    assert calls["load"] == 0 and calls["collect_stats"] == 0 and calls["pipeline"] == 0
    assert calls["prune_from_stats"] == []
    assert result["counts"] == {"computed": 0, "resumed": 7, "skipped": 5, "failed": 0}
    before = {(r["method"], r["sparsity"]): r.get("perplexity") for r in swept["result"]["rows"]}
    assert {(r["method"], r["sparsity"]): r.get("perplexity") for r in result["rows"]} == before

    # change one method's settings: only its points run again, from the stored statistics
    sweep, base = load_sweep(
        swept["path"],
        [
            f"output={out}",
            "grid.methods=[magnitude, {name: wanda, label: wanda, granularity: layer}, sparsegpt, fixed_nm]",
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        counters = Counters(patch)
        result = run_sweep(sweep, base, progress=False, write=lambda line: None)
    calls = counters.calls
    assert calls["collect_stats"] == 0 and calls["pipeline"] == 0
    assert set(calls["prune_from_stats"]) == {"wanda"}
    assert result["counts"]["computed"] == 2 and result["counts"]["resumed"] == 5
    report = json.loads((out / "points" / "wanda-0.5" / "report.json").read_text())
    assert report["method"] == "wanda"
    assert yaml_method(out / "points" / "wanda-0.5")["granularity"] == "layer"

    # training settings concern the learnable method only: the one-shot points resume
    sweep, base = load_sweep(
        swept["path"],
        [
            f"output={out}",
            "train.lr=0.5",
            "grid.methods=[magnitude, {name: wanda, label: wanda, granularity: layer}, sparsegpt, fixed_nm]",
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        counters = Counters(patch)
        result = run_sweep(sweep, base, progress=False, write=lambda line: None)
    assert counters.calls["pipeline"] == 2 and counters.calls["prune_from_stats"] == []  # fixed_nm 2:4 and 3:7
    assert result["counts"] == {"computed": 1, "resumed": 6, "skipped": 5, "failed": 0}


def yaml_method(directory):
    from prune.core.yaml_io import load_yaml

    return load_yaml((directory / "recipe.yaml").read_text())["method"]


def test_shared_path_restores_weights_bit_for_bit(tiny_dir, corpus, tmp_path):
    from prune.runs.recipe import parse_recipe
    from prune.sweep.shared import SharedModel

    recipe = parse_recipe(
        {
            "model": str(tiny_dir),
            "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
            "method": {"name": "sparsegpt", "sparsity": "2:4"},
            "output": str(tmp_path / "x"),
        }
    )
    shared = SharedModel(recipe)
    shared.ensure_stats(tmp_path / "calibration", [recipe.method], progress=False)
    before = {key: value.clone() for key, value in shared.model.state_dict().items()}
    with shared.pruned(recipe.method) as masks:
        changed = shared.model.get_submodule("model.layers.0.mlp.up_proj").base.weight
        assert not torch.equal(changed, before["model.layers.0.mlp.up_proj.weight"])  # SparseGPT's re-fit weights
        assert len(masks) == 14
    after = shared.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)


def test_collect_stats_shares_one_statistic_per_input_and_matches_sequential_first_block():
    from prune.masks.targets import select_targets
    from prune.methods.oneshot.method import WandaConfig, prune_from_stats, wanda
    from prune.methods.oneshot.stats import InputStats

    model = make_tiny_llama()
    blocks = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    names = select_targets(model, None)
    stats = calibration.collect_stats(
        model, names, lambda m: InputStats(weight_matrix(m).shape[1], True), blocks, progress=False
    )
    layer = "model.layers.0."
    assert stats[layer + "self_attn.q_proj"] is stats[layer + "self_attn.k_proj"] is stats[layer + "self_attn.v_proj"]
    assert stats[layer + "mlp.gate_proj"] is stats[layer + "mlp.up_proj"]
    assert stats[layer + "self_attn.o_proj"] is not stats[layer + "self_attn.q_proj"]
    assert stats[layer + "mlp.down_proj"] is not stats[layer + "mlp.up_proj"]
    assert len({id(s) for s in stats.values()}) == 2 * 4 and stats[layer + "mlp.down_proj"].tokens == 3 * 16
    # block 0 sees the same inputs in both schemes: the shared path's Wanda masks equal `prune run`'s there
    config = WandaConfig(name="wanda", sparsity="0.5")
    first = [name for name in names if name.startswith(layer)]
    sequential = wanda(model, first, config.pattern, "row", blocks, progress=False).masks
    modules = dict(model.named_modules())
    for name in first:
        assert torch.equal(prune_from_stats(config, modules[name], stats[name])[0], sequential[name])


@pytest.fixture(scope="module")
def fragile_dir(tmp_path_factory, corpus):
    """A briefly trained tiny Llama whose block 1 is rescaled without changing its function (up rows x c, down
    columns / c; v rows x c, o columns / c, c alternating 8 and 1/8): magnitude pruning then removes, for every
    MLP neuron and value channel of block 1, either its input or its output weights, so that block is fragile."""
    from prune.data.text import prepare
    from prune.runs.loading import load_model

    directory = save_tiny_model(tmp_path_factory.mktemp("fragile"), "llama")
    model, tokenizer = load_model(str(directory))
    train = prepare(tokenizer, str(corpus)).train_blocks(32)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        batch = train[torch.randint(0, len(train), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        block = model.model.layers[1]
        scale = torch.where(torch.arange(128) % 2 == 0, 8.0, 1 / 8)
        block.mlp.up_proj.weight.mul_(scale[:, None])
        block.mlp.down_proj.weight.div_(scale[None, :])
        kv, head_dim, groups = 32, 16, 2  # 2 key/value heads of 16 shared by 4 query heads
        scale = torch.where(torch.arange(kv) % 2 == 0, 8.0, 1 / 8)
        block.self_attn.v_proj.weight.mul_(scale[:, None])
        block.self_attn.o_proj.weight.div_(scale.view(2, 1, head_dim).expand(2, groups, head_dim).reshape(1, -1))
    model.eval().save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_sensitivity_ranks_the_fragile_block_first(fragile_dir, corpus, tmp_path, capsys):
    path = write_sweep(
        tmp_path,
        fragile_dir,
        corpus,
        "[magnitude, wanda]",
        "[0.5]",
        tmp_path / "out",
        extra="sensitivity: {method: magnitude, sparsity: 0.5, heldout_blocks: 24}\n",
    )
    assert main(["sweep", str(path), "--sensitivity"]) == 0
    result = json.loads((tmp_path / "out" / "sensitivity" / "sensitivity.json").read_text())
    by_block = [entry for entry in result["entries"] if entry["kind"] == "block"]
    assert [entry["group"] for entry in by_block] == ["block 1", "block 0"]
    assert by_block[0]["increase"] > by_block[1]["increase"] and by_block[0]["increase"] > 0
    assert {entry["group"] for entry in result["entries"] if entry["kind"] == "type"} >= {
        "mlp.up_proj",
        "self_attn.q_proj",
    }
    assert (tmp_path / "out" / "sensitivity" / "sensitivity.png").read_bytes().startswith(PNG)
    assert "block 1" in (tmp_path / "out" / "sensitivity" / "sensitivity.md").read_text()
    assert "block 1" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_from_run_dirs_and_missing_report(swept, tmp_path, capsys):
    points = swept["out"] / "points"
    output = tmp_path / "cmp"
    assert main(["compare", str(points / "magnitude-0.5"), str(points / "sparsegpt-0.5"), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "magnitude" in printed and "sparsegpt" in printed and "dense" in printed
    summary = json.loads((output / "compare.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["dense", "magnitude", "sparsegpt"]
    assert sum(row["best"] for row in summary["rows"]) == 1
    assert (output / "perplexity_vs_sparsity.png").read_bytes().startswith(PNG)
    assert (output / "compare.csv").is_file() and (output / "compare.md").is_file()
    # a sweep directory stands for its finished points
    assert main(["compare", str(swept["out"]), "--output", str(tmp_path / "all")]) == 0
    assert len(json.loads((tmp_path / "all" / "compare.json").read_text())["rows"]) == 1 + 7
    (tmp_path / "unfinished").mkdir()
    assert main(["compare", str(points / "magnitude-0.5"), str(tmp_path / "unfinished")]) == 2
    assert "unfinished" in capsys.readouterr().err


@pytest.mark.parametrize(
    "grid, message",
    [
        ("grid: {methods: [], sparsities: [0.5]}", "grid.methods is empty"),
        ("grid: {methods: [wanda], sparsities: []}", "grid.sparsities is empty"),
        ("grid: {methods: [wanda], sparsities: [0.5], levels: [1]}", "unknown key 'grid.levels'"),
        ("grid: {methods: [wanda], sparsities: [0.5]}\nrepeat: 2", "unknown key 'repeat'"),
        ("grid: {methods: [nope], sparsities: [0.5]}", "unknown method 'nope'"),
        ("grid: {methods: [wanda], sparsities: [1.5]}", "strictly between 0 and 1"),
    ],
)
def test_bad_sweep_recipes_are_user_errors(tmp_path, grid, message, capsys):
    (tmp_path / "base.yaml").write_text("method: {name: wanda}\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: base.yaml\n{grid}\n")
    with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
        load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_missing_base_recipe_is_named(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("base: nowhere.yaml\ngrid: {methods: [wanda], sparsities: [0.5]}\n")
    with pytest.raises(UserInputError, match="nowhere.yaml"):
        load_sweep(path)
