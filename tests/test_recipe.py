"""Recipe validation: unknown keys, bad sparsity, the YAML base-60 trap, overrides."""

from __future__ import annotations

import hashlib
import json

import pytest

from prune.core.errors import UserInputError
from prune.core.sparsity import parse_sparsity
from prune.runs.recipe import load_recipe, parse_recipe


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unquoted_nm_in_yaml_stays_nm(tmp_path):
    recipe = load_recipe(write(tmp_path, "method:\n  name: magnitude\n  sparsity: 2:4\n"))
    assert recipe.method.pattern.n == 2 and recipe.method.pattern.m == 4


def test_unquoted_nm_in_override_stays_nm(tmp_path):
    recipe = load_recipe(write(tmp_path, "method: {name: wanda, sparsity: 0.5}\n"), ["method.sparsity=4:8"])
    assert (recipe.method.pattern.n, recipe.method.pattern.m) == (4, 8)


def test_base60_integer_is_rejected_with_a_hint():
    with pytest.raises(UserInputError, match="base-60"):
        parse_recipe({"method": {"name": "wanda", "sparsity": 124}})


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    with pytest.raises(UserInputError) as error:
        load_recipe(write(tmp_path, "method: {name: wanda}\ndata: {sorce: x}\n"))
    message = str(error.value)
    assert "data.sorce" in message and "calibration_samples" in message and "seq_len" in message


def test_unknown_method_key_lists_the_method_keys():
    with pytest.raises(UserInputError) as error:
        parse_recipe({"method": {"name": "sparsegpt", "blocksiz": 64}})
    assert "method.blocksiz" in str(error.value) and "blocksize" in str(error.value)


def test_unknown_method_lists_available():
    with pytest.raises(UserInputError, match="magnitude.*sparsegpt.*wanda"):
        parse_recipe({"method": {"name": "nonesuch"}})


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "1.5", "0", "-0.1", "half"])
def test_impossible_sparsity_is_rejected(bad):
    with pytest.raises(UserInputError, match="sparsity"):
        parse_recipe({"method": {"name": "magnitude", "sparsity": bad}})


def test_fraction_and_percent():
    assert parse_sparsity(0.5).fraction == 0.5
    assert parse_sparsity("30%").fraction == pytest.approx(0.3)
    assert parse_sparsity("2:4").removed_fraction == 0.5


def test_override_parses_yaml_lists_and_sets_output(tmp_path):
    recipe = load_recipe(write(tmp_path, "method: {name: magnitude}\n"), ["eval.tasks=[]", "data.seq_len=128"])
    assert recipe.eval.tasks == [] and recipe.data.seq_len == 128
    assert recipe.output == "runs/recipe"


def test_bad_override_syntax(tmp_path):
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        load_recipe(write(tmp_path, "method: {name: magnitude}\n"), ["method.sparsity"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_fingerprint_ignores_output_only():
    base = {"method": {"name": "wanda", "sparsity": "2:4"}}
    a = parse_recipe({**base, "output": "a"})
    b = parse_recipe({**base, "output": "b"})
    c = parse_recipe({"method": {"name": "wanda", "sparsity": "0.5"}, "output": "a"})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_later_settings_unset_leave_the_fingerprint_of_runs_made_before_them():
    """Finished runs from before data.source_share (or data.stream_tokens) existed are still reused (benchmarks,
    sweeps, resume)."""
    base = {"method": {"name": "wanda", "sparsity": "2:4"}, "data": {"mix": ["moby-dick"]}, "output": "a"}
    plain = parse_recipe(base)
    content = {key: value for key, value in plain.to_dict().items() if key != "output"}
    del content["data"]["source_share"], content["data"]["stream_tokens"], content["train"]["distill"]  # before them
    del content["recover"]  # a section added later, without steps
    assert plain.fingerprint() == hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    shared = parse_recipe({**base, "data": {"mix": ["moby-dick"], "source_share": 0.5}})
    assert shared.fingerprint() != plain.fingerprint()
    streamed = parse_recipe({**base, "data": {"mix": ["moby-dick"], "stream_tokens": 100_000}})
    assert streamed.fingerprint() != plain.fingerprint()


def test_shipped_recipes_validate():
    from pathlib import Path

    root = Path(__file__).parent.parent.joinpath("recipes")
    paths = sorted(
        path for path in root.rglob("*.yaml") if not {"sweeps", "accelerate"} & set(path.parts)
    )  # sweeps: test_sweep.py
    assert paths, "no recipes shipped"
    for path in paths:
        load_recipe(path)
