"""Task accuracy through lm-eval (EleutherAI lm-evaluation-harness 0.4.13).

The in-memory model is wrapped by `lm_eval.models.huggingface.HFLM(pretrained=model, ...)` and run
with `lm_eval.simple_evaluate`. Tasks are resolved by name:

- local tasks: the YAMLs in `eval/tasks/` (work offline). `docs_lastword` is built from the
  `heldout_text` given here: examples are written to a temporary jsonl and the YAML's
  `dataset_kwargs.data_files` is pointed at it (an inline task config handed to lm-eval).
- any other name goes through lm-eval's own registry (hellaswag, lambada_openai, ...), whose
  datasets come from the Hugging Face Hub. The Hub is probed first (a few seconds at most); when it
  is unreachable, datasets are looked up in the local cache only (offline mode), so a task whose
  dataset was never cached fails at once with `TaskUnavailableError` instead of retrying for
  half a minute.

The score per task is `acc` (for loglikelihood tasks: the target is the greedy continuation; for
multiple choice: the highest-likelihood choice is right); a task without `acc` reports its first
higher-is-better metric (e.g. `exact_match`). A tag (a name for several tasks) reports each task.
`accuracy_scores` also returns lm-eval's standard error of that metric (closed form for a mean such as
`acc`: the sample standard deviation over sqrt(n); a bootstrap for the few metrics lm-eval bootstraps),
so a reader can tell a 2-point difference on 200 examples from noise.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from eval import lastword
from eval.hub_probe import hub_reachable
from eval.metric_errors import TaskUnavailableError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
HELDOUT_TASKS = frozenset({"docs_lastword"})  # local tasks whose data is built from heldout_text
# lm-eval's resamples for the metrics it bootstraps (not `acc`, whose standard error is closed-form).
STDERR_RESAMPLES = 1000

log = logging.getLogger(__name__)


def local_tasks() -> list[str]:
    """Names of the task YAMLs shipped in eval/tasks (these work offline)."""
    names = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            name = (yaml.safe_load(f) or {}).get("task")
        if isinstance(name, str):
            names.append(name)
    return names


def _local_yaml(name: str) -> dict[str, Any]:
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        if cfg.get("task") == name:
            return cfg
    raise KeyError(name)


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put datasets / huggingface_hub in offline mode (cache only) for the duration."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


# ---------------------------------------------------------------------------------- task managers
@functools.lru_cache(maxsize=1)
def _local_task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@functools.lru_cache(maxsize=1)
def _full_task_manager():
    """lm-eval's whole registry plus ours: indexing its task YAMLs takes seconds (benchmarks/RESULTS.md,
    `code_figures`), so it is built once and only when a non-local task is asked for."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=True)


# --------------------------------------------------------------------------------------- logging
class _DropMessages(logging.Filter):
    # Both are said on every in-memory model; that is how we use HFLM on purpose.
    _noise = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self._noise)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs at INFO by default; keep WARNING and above, drop known noise."""
    import datasets.utils

    logger = logging.getLogger("lm_eval")
    hf_logger = logging.getLogger("lm_eval.models.huggingface")  # filters act where records start
    level = logger.level
    flt = _DropMessages()
    logger.setLevel(logging.WARNING)
    hf_logger.addFilter(flt)
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        hf_logger.removeFilter(flt)
        if not bars_were_off:
            datasets.utils.enable_progress_bars()


@contextlib.contextmanager
def _serial_bootstrap() -> Iterator[None]:
    """lm-eval bootstraps in a multiprocessing pool unless DISABLE_MULTIPROC is set; forking a process that
    holds a model to resample a few hundred scores costs far more than doing it here. Its "bootstrapping for
    stddev" print would land in the caller's stdout (a results table): it goes nowhere."""
    saved = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if saved is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = saved


@contextlib.contextmanager
def _no_environment_probe() -> Iterator[None]:
    """simple_evaluate ends by describing the environment (torch's collect_env runs pip, nvidia-smi and more as
    subprocesses, and git for a commit hash) into results we never read; it has no switch, and on a small model
    the probe costs more than the evaluation. For the duration, it records nothing."""
    from lm_eval import evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda results: None), (lambda: None)
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash = saved


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Restore the caller's random / numpy / torch RNG states afterwards."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------- task loading
def _load_lastword(heldout_text: str, workdir: Path):
    examples = lastword.build_examples(heldout_text)
    if not examples:
        raise ValueError(
            "docs_lastword: the held-out text yielded no examples (it needs prose with sentences "
            f"of >= {lastword.MIN_CONTEXT_WORDS + 1} words ending in an alphabetic word)"
        )
    data = lastword.write_jsonl(examples, workdir / "docs_lastword.jsonl")
    cfg = _local_yaml("docs_lastword")
    cfg["dataset_kwargs"] = {
        **(cfg.get("dataset_kwargs") or {}),
        "data_files": {"test": str(data)},
        "cache_dir": str(workdir / "datasets_cache"),
    }
    return list(_local_task_manager().load([cfg])["tasks"].values())


def _load_named(name: str, *, local: bool, offline: bool) -> list:
    """Task/Group objects for a registered name; raises TaskUnavailableError with the reason."""
    offline_tasks = ", ".join(local_tasks())
    tm = _local_task_manager() if local else _full_task_manager()
    try:
        with _hub_offline(offline):
            loaded = tm.load([name])
    except KeyError:
        raise TaskUnavailableError(
            f"unknown task {name!r}: not in lm-eval's registry nor in {TASKS_DIR} (local tasks: {offline_tasks})"
        ) from None
    except Exception as exc:
        if offline:
            raise TaskUnavailableError(
                f"task {name!r} needs its dataset from the Hugging Face Hub, which is unreachable "
                f"(offline), and it is not in the local datasets cache. Tasks that work offline: "
                f"{offline_tasks}. ({type(exc).__name__}: {exc})"
            ) from exc
        raise TaskUnavailableError(f"task {name!r} could not be loaded: {type(exc).__name__}: {exc}") from exc
    groups = loaded.get("groups") or {}
    if name in groups:  # keep the group so lm-eval aggregates it
        return [groups[name]]
    return list(loaded["tasks"].values())


def check_tasks(tasks: list[str]) -> None:
    """Raise TaskUnavailableError at once, before any model work, for a task that cannot run: lm-eval (an
    optional extra) not installed, a name that is neither local nor in lm-eval's registry (close names
    suggested), or, with the Hub unreachable, a Hub task whose dataset is not in the local cache."""
    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise TaskUnavailableError(
            f"accuracy tasks ({', '.join(tasks)}) run through lm-eval, which is not installed here: "
            "`pip install 'maskprune[lm-eval]'` (or every extra: `pip install 'maskprune[all]'`)"
        )
    local = set(local_tasks())
    remote = [name for name in dict.fromkeys(tasks) if name not in local]
    if not remote:
        return
    registry = _full_task_manager().all_tasks
    for name in remote:
        if name not in registry:
            close = difflib.get_close_matches(name, [*registry, *local], n=3)
            raise TaskUnavailableError(
                f"unknown task {name!r}: not in lm-eval's registry nor in {TASKS_DIR}"
                + (f"; did you mean {', '.join(close)}?" if close else f" (local tasks: {', '.join(sorted(local))})")
            )
    if not hub_reachable():
        with _quiet():
            for name in remote:
                _load_named(name, local=False, offline=True)


# ------------------------------------------------------------------------------------- scoring
def _object_name(obj) -> str:
    name = getattr(obj, "task_name", None) or getattr(obj, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"cannot name lm-eval object {obj!r}")
    return name


@dataclass(frozen=True)
class TaskScore:
    value: float  # in [0, 1]
    stderr: float | None  # lm-eval's standard error of `value`; None when it gave none (e.g. one example)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _score(metrics: dict[str, Any], higher_is_better: dict[str, bool]) -> TaskScore | None:
    """`acc` if present, else the first higher-is-better numeric metric, with its `<metric>_stderr`."""
    numeric: dict[str, TaskScore] = {}
    for key, value in metrics.items():
        name, comma, filter_key = key.partition(",")
        if comma and "_stderr" not in name and _is_number(value):
            stderr = metrics.get(f"{name}_stderr,{filter_key}")
            numeric[name] = TaskScore(float(value), float(stderr) if _is_number(stderr) else None)
    if "acc" in numeric:
        return numeric["acc"]
    for key, score in numeric.items():
        if higher_is_better.get(key):
            return score
    return None


def task_accuracy(model, tokenizer, tasks: list[str], **options: Any) -> dict[str, float]:
    """Accuracy in [0, 1] of `model` on each task, through lm-eval; `options` (heldout_text, limit, batch_size)
    and errors as `accuracy_scores`, which also gives each score's standard error."""
    return {name: score.value for name, score in accuracy_scores(model, tokenizer, tasks, **options).items()}


def accuracy_scores(
    model,
    tokenizer,
    tasks: list[str],
    *,
    heldout_text: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, TaskScore]:
    """Accuracy in [0, 1] of `model` on each task and its standard error, through lm-eval.

    `heldout_text` feeds the local `docs_lastword` task (ValueError when that task is asked for
    without it). `limit` caps the examples per task. Unknown tasks, and hub tasks whose dataset
    cannot be fetched, raise `TaskUnavailableError` (a ValueError) before any model work.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(dict.fromkeys(tasks))  # de-duplicate, keep order
    if not tasks:
        raise ValueError("task_accuracy() needs at least one task name")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    needs_text = [t for t in tasks if t in HELDOUT_TASKS]
    if needs_text and not (heldout_text and heldout_text.strip()):
        raise ValueError(
            f"task(s) {needs_text} are built from held-out text: pass heldout_text= "
            "(the held-out split of the corpus as one string)"
        )

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    local = set(local_tasks())
    remote = [t for t in tasks if t not in local]
    offline = bool(remote) and not hub_reachable()

    was_training = getattr(model, "training", False)
    with _quiet(), tempfile.TemporaryDirectory(prefix="maskprune-eval-") as tmp:
        objects: list = []
        reported: list = []  # what to read back: each task, group, or each task of a tag
        for name in tasks:
            if name in HELDOUT_TASKS:
                built = _load_lastword(heldout_text, Path(tmp))
            else:
                built = _load_named(name, local=name in local, offline=offline)
            objects += built
            reported += built

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            # simple_evaluate reseeds random/numpy/torch
            with _hub_offline(offline), _rng_preserved(), _serial_bootstrap(), _no_environment_probe():
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=objects,
                    task_manager=_local_task_manager(),  # tasks are prebuilt: no registry index (_full_task_manager)
                    limit=limit,
                    log_samples=False,
                    bootstrap_iters=STDERR_RESAMPLES,
                )
        finally:
            if hasattr(model, "train"):
                model.train(was_training)

    if out is None:  # non-zero rank under a distributed launcher
        return {}
    results: dict[str, dict[str, Any]] = out["results"]
    hib: dict[str, dict[str, bool]] = out.get("higher_is_better", {})
    scores: dict[str, TaskScore] = {}
    for obj in reported:
        key = _object_name(obj)
        score = _score(results.get(key, {}), hib.get(key, {}))
        if score is not None:
            scores[key] = score
        elif hasattr(obj, "get_all_tasks"):  # a group without an aggregate metric: its tasks
            for task in obj.get_all_tasks():
                sub = _score(results.get(task.task_name, {}), hib.get(task.task_name, {}))
                if sub is not None:
                    scores[task.task_name] = sub
        else:
            raise ValueError(f"task {key!r} reported no accuracy-like metric: {results.get(key)}")
    return scores
