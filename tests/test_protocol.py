"""The evaluation protocol end to end on tiny models: train / validation / test parts in report.json, the choice
of the kept masks reads validation only, intervals on every perplexity (the same on a rerun), an out-of-domain
text beside the in-domain one, paired verdicts in `prune compare`, and the bad inputs that exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from prune.cli import main
from prune.data.text import PARTS, prepare
from prune.runs.loading import load_model
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.sweep.compare import compare, render
from prune.tasks import causal_lm


def recipe(model_dir, corpus, output, method: dict, **sections):
    return parse_recipe(
        {
            "model": str(model_dir),
            "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
            "method": method,
            "eval": {"tasks": ["docs_lastword"], "limit": 8, "latency": False, "flops": False},
            "output": str(output),
            **sections,
        }
    )


@pytest.fixture(scope="module")
def wanda_run(tmp_path_factory, llama_dir, corpus):
    output = tmp_path_factory.mktemp("runs") / "wanda"
    return output, run(recipe(llama_dir, corpus, output, {"name": "wanda", "sparsity": "2:4"}))


def test_selection_of_the_kept_masks_reads_validation_windows_and_never_a_test_window(
    tmp_path, llama_dir, corpus, monkeypatch, one_thread
):
    seen = []
    original = causal_lm.perplexity

    def spy(model, blocks, **kwargs):  # the task's perplexity: the trainer's evaluate callback and the figures
        if model.training is False and kwargs.get("desc", "").startswith("eval (validation)"):
            seen.append(blocks.clone())
        return original(model, blocks, **kwargs)

    monkeypatch.setattr(causal_lm, "perplexity", spy)
    report = run(
        recipe(
            llama_dir,
            corpus,
            tmp_path / "run",
            {"name": "nm_gumbel", "sparsity": "2:4", "prior": "magnitude"},
            train={"steps": 4, "batch_size": 2, "lr": 0.05, "eval_every": 2, "eval_windows": 3},
        )
    )
    _, tokenizer = load_model(str(llama_dir))
    splits = prepare(tokenizer, str(corpus))
    validation, test = splits.validation_blocks(32).tolist(), splits.test_blocks(32).tolist()
    assert len(seen) == 3  # step 0 (the prior), 2 and 4
    for blocks in seen:
        assert blocks.tolist() == validation[:3]
        assert not any(row in test for row in blocks.tolist())
    assert report["data"]["used"]["selection"] == {"part": "validation", "windows": 3}
    assert report["data"]["used"]["training"]["part"] == "train"
    assert report["perplexity"]["windows"] == len(test)  # the reported figure: every test window


def test_report_says_which_part_each_figure_read(wanda_run, llama_dir, corpus):
    directory, report = wanda_run
    assert json.loads((directory / "report.json").read_text()) == json.loads(json.dumps(report))
    data = report["data"]
    _, tokenizer = load_model(str(llama_dir))
    total = prepare(tokenizer, str(corpus)).ranges["test"][1]
    assert data["splits"]["train"][0] == 0 and data["splits"]["test"][1] == total
    assert data["splits"]["train"][1] == data["splits"]["validation"][0]  # contiguous, disjoint, covering
    assert data["splits"]["validation"][1] == data["splits"]["test"][0]
    assert set(data["windows"]) == set(PARTS)
    assert data["windows"]["test"] == report["perplexity"]["windows"] == report["dense"]["perplexity"]["windows"]
    assert data["used"]["calibration"] == {"part": "train", "windows": 4}
    assert data["used"]["perplexity"]["part"] == "test" and "selection" not in data["used"]
    assert data["extra_texts"]["moby-dick"]["used"]["perplexity"] == {
        "part": "test",
        "windows": data["extra_texts"]["moby-dick"]["windows"]["test"],
    }
    assert data["seen"] == {str(corpus): True, "moby-dick": False, "sotu": False}  # calibration read the source
    assert "warning" not in data


def test_every_perplexity_has_an_interval_and_per_window_nlls(wanda_run):
    _, report = wanda_run
    for figures in (report, report["dense"]):
        for perplexity in (figures["perplexity"], figures["extra_texts"]["moby-dick"]["perplexity"]):
            low, high = perplexity["ci95"]
            assert low < perplexity["value"] < high
            assert len(perplexity["window_nll"]) == perplexity["windows"] == perplexity["tokens"] // 31
        assert figures["accuracy_stderr"]["docs_lastword"] >= 0.0
    ood = report["extra_texts"]["moby-dick"]["perplexity"]
    assert ood["dense"] == report["dense"]["extra_texts"]["moby-dick"]["perplexity"]["value"]
    assert ood["value"] != report["perplexity"]["value"]  # another text, measured apart


def test_rerun_prints_the_same_intervals_and_report_md_shows_both_texts(wanda_run, tmp_path, llama_dir, corpus, capsys):
    directory, report = wanda_run
    again = run(recipe(llama_dir, corpus, tmp_path / "again", {"name": "wanda", "sparsity": "2:4"}))
    for key in ("perplexity", "extra_texts", "accuracy", "accuracy_stderr"):
        assert again[key] == report[key]
    markdown = (directory / "report.md").read_text()
    low, high = report["extra_texts"]["moby-dick"]["perplexity"]["ci95"]
    assert "moby-dick [95% CI]" in markdown and f"{low:.3g}"[:3] in markdown
    assert "test part" in markdown and "± stderr" in markdown
    assert "sotu: the test part of that text" in markdown and "**not seen**" in markdown
    assert "**seen in training/calibration** (its other parts)" in markdown  # the source
    assert "Warning" not in markdown


def _clone(source, target, method: str, scale: float):
    """A copy of a run directory whose in-domain per-window NLLs are scaled: a clearly worse run when scale > 1."""
    shutil.copytree(source, target)
    report = json.loads((target / "report.json").read_text())
    perplexity = report["perplexity"]
    perplexity["window_nll"] = [value * scale for value in perplexity["window_nll"]]
    perplexity["value"] = float(torch.tensor(perplexity["window_nll"]).sum().div(perplexity["tokens"]).exp())
    report["method"] = method
    (target / "report.json").write_text(json.dumps(report))
    return target


def test_compare_pairs_runs_window_by_window(wanda_run, tmp_path):
    directory, _ = wanda_run
    same = _clone(directory, tmp_path / "same", "magnitude", 1.0)
    worse = _clone(directory, tmp_path / "worse", "sparsegpt", 1.3)
    rows, written = compare([directory, same, worse], tmp_path / "cmp")
    verdicts = {row["method"]: row["verdict"] for row in rows if row["status"] == "done"}
    best = next(method for method, verdict in verdicts.items() if verdict == "best")
    assert best in ("wanda", "magnitude")  # the two identical runs tie
    assert verdicts == {"wanda": verdicts["wanda"], "magnitude": verdicts["magnitude"], "sparsegpt": "worse"}
    assert sorted([verdicts["wanda"], verdicts["magnitude"]]) == ["best", "not distinguishable from best"]
    assert all(
        row["extra_texts.moby-dick.verdict"] in ("best", "not distinguishable from best")
        for row in rows
        if row["status"] == "done"
    )  # out of domain the three are the same run
    table = render(rows)
    assert "not distinguishable from best" in table and "worse" in table and "moby-dick [95% CI]" in table
    assert "(not seen)" in table and "(seen)" in table  # each text per run: moby-dick unread, the source read
    again, _ = compare([directory, same, worse], tmp_path / "cmp2")
    assert render(again) == table  # fixed seed: the same verdicts and intervals every time
    assert "window_nll" not in written["csv"].read_text()
    assert written["perplexity"].read_bytes().startswith(b"\x89PNG")


# --- bad input --------------------------------------------------------------------------------------------------


def write_recipe(tmp_path, model_dir, corpus, data: str = "", evaluate: str = "") -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model: {model_dir}\n"
        f"data: {{source: {corpus}, calibration_samples: 4, seq_len: 32{data}}}\n"
        "method: {name: wanda, sparsity: 2:4}\n"
        f"eval: {{tasks: [], latency: false{evaluate}}}\n"
        f"output: {tmp_path / 'run'}\n"
    )
    return str(path)


def test_a_text_too_small_for_three_parts_exits_2_saying_what_it_has_and_needs(tmp_path, llama_dir, corpus, capsys):
    assert main(["run", write_recipe(tmp_path, llama_dir, corpus, data=", calibration_samples: 100000")]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "too small for this run at seq_len=32" in error and "tokens" in error
    assert "calibration_samples=100000 needs 100000 windows = 3,200,000 tokens" in error
    assert not (tmp_path / "run" / "report.json").exists()


def test_fractions_leaving_no_train_part_exit_2(tmp_path, llama_dir, corpus, capsys):
    assert (
        main(
            ["run", write_recipe(tmp_path, llama_dir, corpus, data=", heldout_fraction: 0.6, validation_fraction: 0.4")]
        )
        == 2
    )
    assert "must be below 1" in " ".join(capsys.readouterr().err.split())


def test_an_extra_text_that_cannot_be_found_exits_2_naming_it(tmp_path, llama_dir, corpus, capsys):
    missing = tmp_path / "missing_novel.txt"
    assert main(["run", write_recipe(tmp_path, llama_dir, corpus, evaluate=f", extra_texts: [{missing}]")]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "eval.extra_texts entry" in error and "missing_novel.txt" in error and "no such file" in error


def test_mix_texts_join_training_and_selection_but_their_test_parts_stay_unread(
    tmp_path, llama_dir, corpus, monkeypatch, one_thread
):
    """data.mix: the moby-dick train part joins the training blocks and its validation part the selection
    windows; neither its test part nor the source's is read by any choice; report.json lists the mix's parts."""
    seen = []
    original = causal_lm.perplexity

    def spy(model, blocks, **kwargs):
        if kwargs.get("desc", "").startswith("eval (validation)"):
            seen.append(blocks.clone())
        return original(model, blocks, **kwargs)

    monkeypatch.setattr(causal_lm, "perplexity", spy)
    mixed = recipe(
        llama_dir,
        corpus,
        tmp_path / "run",
        {"name": "nm_gumbel", "sparsity": "2:4", "prior": "magnitude"},
        train={"steps": 2, "batch_size": 2, "lr": 0.05, "eval_every": 2, "eval_windows": 4},
    )
    mixed.data.mix = ["moby-dick"]
    report = run(mixed)
    _, tokenizer = load_model(str(llama_dir))
    source, prose = prepare(tokenizer, str(corpus)), prepare(tokenizer, "moby-dick")
    prose_validation = prose.validation_blocks(32).tolist()
    unread = source.test_blocks(32).tolist() + prose.test_blocks(32).tolist()
    assert seen and all(any(row in prose_validation for row in blocks.tolist()) for blocks in seen)
    assert not any(row in unread for blocks in seen for row in blocks.tolist())
    assert report["data"]["mix"]["moby-dick"]["used"]["selection"] == {"part": "validation"}
    assert report["data"]["used"]["training"]["windows"] == (len(source.train_blocks(32)) + len(prose.train_blocks(32)))
    assert report["data"]["seen"] == {str(corpus): True, "moby-dick": True, "sotu": False}
    assert report["train"]["tokens_seen"] == 2 * 2 * 32  # steps x batch x seq_len


def test_a_run_whose_extra_texts_were_all_read_says_so_in_its_report(tmp_path, llama_dir, corpus):
    """eval.extra_texts holds only moby-dick, which data.mix feeds calibration: no figure is out of domain."""
    output = tmp_path / "run"
    mixed = recipe(llama_dir, corpus, output, {"name": "wanda", "sparsity": "2:4"})
    mixed.data.mix, mixed.eval.extra_texts, mixed.eval.tasks = ["moby-dick"], ["moby-dick"], []
    report = run(mixed)
    assert report["data"]["seen"]["moby-dick"] is True
    assert "every eval.extra_texts entry (moby-dick) was read" in report["data"]["warning"]
    markdown = (output / "report.md").read_text()
    assert markdown.splitlines()[2].startswith("**Warning:** every eval.extra_texts entry (moby-dick)")


def test_source_share_sets_how_many_train_windows_each_text_gives_and_the_report_says_so(
    tmp_path, llama_dir, corpus, one_thread
):
    """data.source_share 0.5: the mix text gives as many train windows as the source, and report.json counts them."""
    shared = recipe(
        llama_dir,
        corpus,
        tmp_path / "run",
        {"name": "nm_gumbel", "sparsity": "2:4", "prior": "magnitude"},
        train={"steps": 1, "batch_size": 2, "lr": 0.05},
    )
    shared.data.mix, shared.data.source_share = ["moby-dick"], 0.5
    report = run(shared)
    _, tokenizer = load_model(str(llama_dir))
    source_windows = len(prepare(tokenizer, str(corpus)).train_blocks(32))
    assert report["data"]["source_share"] == 0.5
    assert report["data"]["mix"]["moby-dick"]["used"]["calibration, training"] == {
        "part": "train",
        "windows": source_windows,
    }
    assert report["data"]["used"]["training"]["windows"] == 2 * source_windows
