"""`prune sweep` with listed points and the speed axis, on a tiny Llama: the points form's validation, decode /
prefill / bytes for every point beside the dense model, the Pareto flags and the speed plot."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prune.cli import main
from prune.core.errors import UserInputError
from prune.sweep.compare import mark_pareto, on_front
from prune.sweep.recipe import load_sweep
from prune.sweep.runner import run_sweep

PNG = b"\x89PNG\r\n\x1a\n"
POINTS = """\
points:
  - {name: depth-1, method: {name: depth, remove: 1, candidates: 1}}
  - {name: structured-30, method: {name: structured, target: {params: 0.3}}}
  - {name: teal-50, method: {name: activation, mode: teal, sparsity: 0.5}}
  - {name: cats-50, method: {name: activation, mode: cats, sparsity: 0.5}}
"""
SPEED = "speed: {rounds: 1, prompt_len: 8, decode_tokens: 2}\nsave_models: true\nshared_calibration: false\n"


def write_sweep(directory, model_dir, corpus, body: str, output="out"):
    (directory / "base.yaml").write_text(
        f"model: {model_dir}\n"
        f"data: {{source: {corpus}, calibration_samples: 4, seq_len: 32, heldout_fraction: 0.05}}\n"
        "method: {name: wanda, sparsity: 0.5}\n"
        "train: {eval_windows: 2}\n"
        "eval: {tasks: [], latency: false, flops: false}\n"
    )
    path = directory / "sweep.yaml"
    path.write_text(f"base: base.yaml\n{body}output: {directory / output}\n")
    return path


# ---- the points form: validated before anything runs ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        (POINTS + "grid: {methods: [wanda], sparsities: [0.5]}\n", "exactly one of the two"),
        ("points: []\n", "points is empty"),
        ("points:\n  - {name: a, method: {name: nosuch}}\n", "unknown method 'nosuch'"),
        ("points:\n  - {name: a, method: {remove: 1}}\n", "needs a `name`"),
        ("points:\n  - {name: a, method: {name: depth, remove: 1}, colour: red}\n", "unknown key 'points.0.colour'"),
        ("points:\n  - {name: a/b, method: {name: depth, remove: 1}}\n", "names its directory"),
        (
            "points:\n" + "  - {name: a, method: {name: depth, remove: 1}}\n" * 2,
            "a twice",
        ),
        ("points:\n  - {name: d, method: {name: depth, sparsity: 0.5}}\n", "points[0] (d)"),
        ("points:\n  - {name: t, method: {name: activation, sparsity: 1.5}}\n", "points[0] (t)"),
        (POINTS + "speed: {rounds: 1}\n", "set save_models: true and shared_calibration: false"),
        (POINTS + SPEED + "set: {eval.dense_baseline: false}\n", "leave eval.dense_baseline on"),
        (POINTS + SPEED.replace("rounds: 1", "rounds: 0"), "speed.rounds"),
    ],
)
def test_bad_points_and_speed_settings_are_refused(tmp_path, body, phrase):
    path = write_sweep(tmp_path, "tiny", "docs.txt", body)
    with pytest.raises(UserInputError) as error:
        load_sweep(path)
    assert phrase in str(error.value)
    assert main(["sweep", str(path)]) == 2
    assert not (tmp_path / "out").exists()


def test_listed_points_are_checked_without_heavy_libraries(tmp_path):
    """A bad point is refused (exit 2) and a good points file validated in an interpreter that cannot import
    torch: the points form is checked before torch loads, like a recipe."""
    from tests.test_startup import run_blocked

    bad = write_sweep(tmp_path, "tiny", "docs.txt", "points:\n  - {name: d, method: {name: depth, sparsity: 0.5}}\n")
    done = run_blocked(f"from prune.cli import main\nsys.exit(main(['sweep', {str(bad)!r}]))", tmp_path)
    assert done.returncode == 2 and "points[0] (d)" in done.stderr and "Traceback" not in done.stderr, done.stderr
    good = write_sweep(tmp_path, "tiny", "docs.txt", POINTS + SPEED)
    done = run_blocked(f"from prune.sweep.recipe import load_sweep\nload_sweep({str(good)!r})", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_shipped_speed_sweep_is_valid():
    """recipes/sweeps/smollm2-135m-speed.yaml: dense (the reference), 2:4, width and depth at two sizes each, TEAL
    and CATS at two levels each, every point timed."""
    from pathlib import Path

    sweep, _ = load_sweep(Path(__file__).parents[1] / "recipes" / "sweeps" / "smollm2-135m-speed.yaml")
    methods = [(point.method["name"], point.method.get("mode")) for point in sweep.points]
    assert methods.count(("structured", None)) == methods.count(("depth", None)) == 2
    assert methods.count(("activation", "teal")) == methods.count(("activation", "cats")) == 2
    assert ("sparsegpt", None) in methods and sweep.speed.threads == 1


def test_listed_points_keep_the_files_order_and_their_method_sections(tmp_path):
    from prune.sweep.recipe import expand_points

    path = write_sweep(tmp_path, "tiny", "docs.txt", POINTS + SPEED)
    sweep, base = load_sweep(path)
    points = expand_points(sweep, base)
    assert [p.label for p in points] == ["depth-1", "structured-30", "teal-50", "cats-50"]
    assert [p.method for p in points] == ["depth", "structured", "activation", "activation"]
    assert [p.sparsity for p in points] == ["1 block", "params 0.3", "teal 0.5", "cats 0.5"]
    assert all(p.path == "pipeline" and p.recipe.export.save_model for p in points)
    assert points[3].recipe.method.mode == "cats" and points[2].recipe.method.mode == "teal"


# ---- the Pareto rule --------------------------------------------------------------------------------------

pairs = st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=12)


def _dominates(a, b) -> bool:
    return a[0] < b[0] and a[1] < b[1]


@given(pairs)
def test_pareto_front_is_undominated_and_covers_every_other_point(points):
    flags = on_front(points)
    front = [p for p, flag in zip(points, flags) if flag]
    assert front, "a finite set always has an undominated point"
    for point, flag in zip(points, flags):
        if flag:
            assert not any(_dominates(other, point) for other in points)
        else:  # dominated, hence (the relation is transitive and finite) by a point of the front
            assert any(_dominates(other, point) for other in front)
    assert flags[min(range(len(points)), key=lambda i: (points[i][1], points[i][0]))]  # the best perplexity
    assert flags[min(range(len(points)), key=lambda i: (points[i][0], points[i][1]))]  # the fastest


@given(pairs)
def test_pareto_rows_are_flagged_per_text_and_model(points):
    rows = [
        {
            "model": "m",
            "status": "done",
            "decode_ms_per_token": ms,
            "perplexity": ppl,
            "extra_texts.sotu.perplexity.value": ms,
        }
        for ms, ppl in points
    ] + [
        {"model": "m", "status": "skipped", "perplexity": None},
        {"model": "other", "status": "dense", "perplexity": 1.0},
    ]
    mark_pareto(rows)
    assert [row["pareto"] for row in rows[: len(points)]] == on_front(points)
    # on sotu the perplexity grows with the time: only the fastest points are on the front
    fastest = min(ms for ms, _ in points)
    assert [row["extra_texts.sotu.pareto"] for row in rows[: len(points)]] == [ms == fastest for ms, _ in points]
    assert "pareto" not in rows[-2] and "pareto" not in rows[-1]  # no speed: no flag


# ---- a tiny speed sweep, end to end -----------------------------------------------------------------------


@pytest.mark.slow
def test_speed_sweep_times_every_point_beside_dense(tmp_path, llama_dir, corpus, one_thread):
    points = POINTS + "  - {name: sparsegpt-2of4, method: {name: sparsegpt, sparsity: '2:4'}}\n"
    path = write_sweep(tmp_path, llama_dir, corpus, points + SPEED)
    lines = []
    result = run_sweep(*load_sweep(path), progress=False, write=lines.append)
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"dense", "depth-1", "structured-30", "teal-50", "cats-50", "sparsegpt-2of4"}
    assert all(row["status"] in ("done", "dense") for row in rows.values()), [r.get("reason") for r in rows.values()]
    for row in rows.values():
        assert row["decode_ms_per_token"] > 0 and row["prefill_tokens_per_s"] > 0 and row["model_bytes"] > 0
        assert row["decode_speedup"] == pytest.approx(rows["dense"]["decode_ms_per_token"] / row["decode_ms_per_token"])
    out = tmp_path / "out"
    dense_bytes = rows["dense"]["model_bytes"]
    # physically smaller exports weigh less; activation = the base model + its thresholds; 2:4 is a dense tensor
    assert rows["depth-1"]["model_bytes"] < dense_bytes and rows["structured-30"]["model_bytes"] < dense_bytes
    thresholds = (out / "points" / "teal-50" / "thresholds.safetensors").stat().st_size
    assert rows["teal-50"]["model_bytes"] == dense_bytes + thresholds
    assert rows["sparsegpt-2of4"]["model_bytes"] == pytest.approx(dense_bytes, rel=0.01)
    # the Pareto flags follow the rule on the measured numbers, per text
    for key, value in (
        ("pareto", "perplexity"),
        ("extra_texts.moby-dick.pareto", "extra_texts.moby-dick.perplexity.value"),
    ):
        timed = list(rows.values())
        assert [row[key] for row in timed] == on_front([(row["decode_ms_per_token"], row[value]) for row in timed])
    # outputs: the speed columns, speed.json, the plot
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["speed"]["rounds"] == 1 and [p["name"] for p in summary["points"]][0] == "depth-1"
    assert "pareto" in (out / "sweep.csv").read_text().splitlines()[0]
    markdown = (out / "sweep.md").read_text()
    assert "decode ms/tok" in markdown and "Pareto front" in markdown and "timed in turn in one process" in markdown
    assert (out / "perplexity_vs_speed.png").read_bytes().startswith(PNG)
    saved = json.loads((out / "speed.json").read_text())[str(llama_dir)]
    assert set(saved["figures"]) == {
        f"dense:{llama_dir}",
        "depth-1",
        "structured-30",
        "teal-50",
        "cats-50",
        "sparsegpt-2of4",
    }

    # resumed: nothing recomputed, the speed figures reused as they were
    again = run_sweep(*load_sweep(path), progress=False, write=lambda line: None)
    assert again["counts"]["computed"] == 0
    assert {r["method"]: r["decode_ms_per_token"] for r in again["rows"]} == {
        m: r["decode_ms_per_token"] for m, r in rows.items()
    }


def test_a_points_bytes_are_its_model_and_the_tensors_it_is_rebuilt_from(tmp_path):
    """model/ or the base model, plus thresholds (activation, also after recovery); a plain checkpoint's masks
    file describes it and is not counted."""
    from prune.sweep.speed import point_bytes

    def write(path, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)

    write(tmp_path / "plain" / "model" / "model.safetensors", 700)
    write(tmp_path / "plain" / "masks.safetensors", 30)
    write(tmp_path / "activation" / "thresholds.safetensors", 20)
    write(tmp_path / "recovered" / "model" / "model.safetensors", 900)
    write(tmp_path / "recovered" / "thresholds.safetensors", 20)
    assert point_bytes(tmp_path / "plain", base_bytes=1000) == 700
    assert point_bytes(tmp_path / "activation", base_bytes=1000) == 1020
    assert point_bytes(tmp_path / "recovered", base_bytes=1000) == 920
