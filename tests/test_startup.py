"""Refusals are fast: bad input that needs no model is refused before torch, transformers, lm-eval (or any other
heavy library) is imported, so `prune` answers at once instead of after the seconds those imports take.

The rows are the bad-input table's (tests/test_bad_input.py) whose refusal needs no model; each runs the CLI in a
fresh interpreter whose import system refuses the heavy libraries, so importing one makes the row fail with a
traceback instead of exit 2. How fast that is, is measured by benchmarks/startup.py, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import prune
from prune.methods.registry import METHODS, get_method
from prune.methods.spec import MethodSpec
from tests.test_bad_input import CASES, Lab, write_inputs

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate", "datasets", "peft", "safetensors", "lm_eval", "matplotlib", "gguf")
BLOCKED = textwrap.dedent(
    f"""
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {HEAVY!r}:
                raise ImportError(f"{{name}} was imported before the refusal")

    sys.meta_path.insert(0, Blocked())
    """
)
NEEDS_NO_MODEL = (
    "unknown key",
    "impossible N:M",
    "impossible fraction",
    "missing model",
    "nm_gumbel 16:32 enumerates too much",
    "train.lr=.inf",
    "method.dampening=.inf",
    "method.tau_end=.nan",
    "recipe not YAML",
    "recipe not UTF-8",
    "malformed --set",
    "output is a file",
    "output below a file",
    "prune eval --seq-len 0",
    "empty recipe",
    "data source is a directory",
    "seed beyond 64 bits",
    "train.seed beyond 64 bits",
    "runtime.threads beyond a C int",
    "a temperature below float32",
    "method.targets: []",
    "a file given as a model",
    "a directory given as a recipe",
    "recovery after per-input gating",
    "recovery under offload",
    "unknown recover key",
    "unknown recovery mode",
)


def run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that cannot import the heavy libraries."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", BLOCKED + code], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.mark.parametrize("case", [case for case in CASES if case.id in NEEDS_NO_MODEL], ids=lambda case: case.id)
def test_refused_before_any_heavy_import(case, inputs, tmp_path, monkeypatch):
    argv = case.command(Lab(inputs, tmp_path, monkeypatch))
    done = run_blocked(f"from prune.cli import main\nsys.exit(main({argv!r}))", tmp_path)
    message = " ".join(done.stderr.split())
    assert done.returncode == case.code == 2, done.stderr[-2000:]
    assert case.phrase in message and "Traceback" not in done.stderr, done.stderr[-2000:]
    case.after(Lab(inputs, tmp_path, monkeypatch))


def test_every_row_named_here_is_in_the_table():
    assert set(NEEDS_NO_MODEL) <= {case.id for case in CASES}


def test_the_public_api_and_the_recipe_import_without_heavy_libraries(tmp_path):
    """`import prune` lists every public name and hands out the config classes; whatever needs torch is imported
    only when it is first used."""
    done = run_blocked(
        "import json, prune, prune.cli, prune.runs.recipe, prune.sweep.recipe\n"
        "config = prune.method_config('wanda', sparsity='2:4')\n"
        "print(json.dumps({'all': prune.__all__, 'dir': dir(prune), 'config': type(config).__name__}))\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout)
    assert seen["all"] == prune.__all__ and set(prune.__all__) <= set(seen["dir"])
    assert seen["config"] == "WandaConfig"


def test_every_public_name_resolves():
    assert len(prune.__all__) == len(set(prune.__all__))
    for name in prune.__all__:
        assert getattr(prune, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        prune.nothing  # noqa: B018


def test_every_declaration_names_the_spec_built_from_it():
    """The registry lists torch-free declarations; each names the MethodSpec that `get_method` imports on use."""
    for name, declared in METHODS.items():
        spec = get_method(name)
        assert isinstance(spec, MethodSpec) and spec.declared is declared, name
        assert (spec.name, spec.config_class, spec.kind, spec.tasks) == (
            name,
            declared.config_class,
            declared.kind,
            declared.tasks,
        )
        assert declared.config_class.__module__ == f"{declared.spec.partition(':')[0].rpartition('.')[0]}.config"


def test_a_bad_sweep_is_refused_before_any_heavy_import(tmp_path):
    (tmp_path / "base.yaml").write_text("method: {name: wanda, sparsity: 2:4}\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: base.yaml\ngrid: {methods: [wanda, nosuch], sparsities: [0.5]}\n")
    done = run_blocked(f"from prune.cli import main\nsys.exit(main(['sweep', {str(sweep)!r}]))", tmp_path)
    assert done.returncode == 2 and "unknown method 'nosuch'" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
