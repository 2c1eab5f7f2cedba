"""The command line: exit 0 on success, 2 with a one-paragraph message on bad input, 1 on a non-finite result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prune.cli import main
from tests.conftest import docs_text, save_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "docs.txt"
    corpus.write_text(docs_text())
    model_dir = save_tiny_model(root / "tiny")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"model: {model_dir}\n"
        f"data: {{source: {corpus}, calibration_samples: 4, seq_len: 32}}\n"
        "method: {name: wanda, sparsity: 2:4}\n"
        "eval: {tasks: [], latency: false}\n"
    )
    return root, recipe, model_dir


def test_run_prints_table_and_exits_zero(setup, capsys, tmp_path):
    _, recipe, _ = setup
    assert main(["run", str(recipe), "--output", str(tmp_path / "run"), "--set", "method.sparsity=4:8"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "wanda 4:8" in out and "dense" in out
    assert json.loads((tmp_path / "run" / "report.json").read_text())["sparsity"]["target"] == "4:8"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.sparsity=4:2", "0 < N < M"),
        ("method.sparsity=1.5", "strictly between 0 and 1"),
        ("method.name=nonesuch", "unknown method"),
        ("data.bogus=1", "unknown key 'data.bogus'"),
        ("model=/no/such/model", "no such directory"),
        ("method.targets=['*.nothing']", "'*.nothing' matches no"),
    ],
)
def test_bad_input_exits_two_with_a_message_and_writes_nothing(setup, capsys, tmp_path, override, expected):
    _, recipe, _ = setup
    assert main(["run", str(recipe), "--output", str(tmp_path / "run"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and expected in " ".join(err.split())
    assert not (tmp_path / "run" / "report.json").exists()


def test_nan_perplexity_is_an_error_not_a_number(setup, capsys, tmp_path):
    root, recipe, model_dir = setup
    from transformers import AutoModelForCausalLM

    broken = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "broken")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "broken" / name).write_bytes((model_dir / name).read_bytes())
    code = main(["run", str(recipe), "--output", str(tmp_path / "run"), "--set", f"model={tmp_path / 'broken'}"])
    assert code == 1
    assert "refusing to report a perplexity" in capsys.readouterr().err
    assert not (tmp_path / "run" / "report.json").exists()


def test_eval_of_a_run_directory(setup, capsys, tmp_path):
    _, recipe, _ = setup
    assert main(["run", str(recipe), "--output", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "run"),
                "--data",
                str(setup[0] / "docs.txt"),
                "--seq-len",
                "32",
                "--tasks",
                "--no-latency",
            ]
        )
        == 0
    )
    assert "perplexity" in capsys.readouterr().out


def test_models_lists_the_embedded_alias(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_console_script_exit_code_for_a_missing_recipe():
    result = subprocess.run([sys.executable, "-m", "prune.cli", "run", "nope.yaml"], capture_output=True, text=True)
    assert result.returncode == 2 and "not found" in result.stderr
