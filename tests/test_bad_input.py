"""The bad-input catalogue as a test: one row per way a user (or a crashing machine) can hand MaskPrune bad
input, each run through `prune.cli.main` in-process and checked three ways: the exit code, a phrase of the
one-paragraph message (no traceback: `main` returns), and what is on disk afterwards (after a failure nothing
that existed was changed or deleted and no report.json appeared; rows that succeed check their own files).

Rows marked `works` behaved before the fixes of issue 15 (`works+11`: the message did, but the output directory
was claimed anyway); every other row names the defect it covers and failed before its fix: a number for the
defects of issue 15, `25.<class>` for the classes of issue 25's second probe (memory bounds, damaged inputs on the
new paths, compare and sweep outputs, distributed launches, messages).
"""

from __future__ import annotations

import builtins
import errno
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prune.cli import main
from prune.runs import run_dir
from tests.conftest import docs_text, save_tiny_model, save_tiny_resnet


@dataclass
class Lab:
    """Shared inputs (tiny models, a corpus, recipes, finished and unfinished runs) and one row's scratch space."""

    root: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)  # more phrases a row's setup knows only when it runs
    err: str = ""  # what the command printed on stderr

    @property
    def corpus(self) -> Path:
        return self.root / "docs.txt"

    @property
    def wanda(self) -> str:  # wanda 2:4 on the tiny Llama (256 positions)
        return str(self.root / "wanda.yaml")

    @property
    def gumbel(self) -> str:  # nm_gumbel 2:4, 4 steps, a checkpoint every 2
        return str(self.root / "gumbel.yaml")

    def run(self, *extra: str, recipe: str | None = None, output: str = "out") -> list[str]:
        return ["run", recipe or self.wanda, "--output", str(self.tmp / output), *extra]

    def copy(self, name: str, to: str = "run") -> Path:
        """A copy of a prepared run directory, its recipe's `output` pointing at the copy."""
        target = self.tmp / to
        shutil.copytree(self.root / name, target)
        recipe = target / run_dir.RECIPE_FILE
        recipe.write_text(recipe.read_text().replace(str(self.root / name), str(target)))
        return target

    def hold_lock(self, directory: Path) -> int:
        """Another process holding the run's lock, as a live `prune run` does (until the cleanup kills it, however
        slowly a loaded machine reaches the lock check); returns its pid."""
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                "os.write(fd, str(os.getpid()).encode())\nprint('held', flush=True)\ntime.sleep(3600)",
                str(directory / run_dir.LOCK_FILE),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.cleanups.append(lambda: (holder.kill(), holder.wait()))
        assert holder.stdout.readline().strip() == "held"
        return holder.pid


@dataclass(frozen=True)
class Case:
    id: str
    defect: str  # the issue-15 defect the row covers, or "works"
    command: Callable[[Lab], list[str]]  # prepares the row's files, returns the command line
    code: int
    phrase: str  # part of the message on stderr
    after: Callable[[Lab], None] = lambda lab: None  # what must be on disk afterwards
    absent: str | None = None  # what the message must not say


# ------------------------------------------------------------------------------------------ row helpers


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def no_output(lab: Lab) -> None:
    """Bad input found before the claim: the output directory was never created."""
    assert not (lab.tmp / "out").exists()


def fail_on_forward(lab: Lab) -> None:
    """Any measurement (the dense evaluation is the first forward) fails the row: the check must come first."""

    def forward(*args, **kwargs):
        raise AssertionError("a forward ran before the check")

    lab.monkeypatch.setattr("prune.tasks.causal_lm.measure", forward)


def disk_error(lab: Lab, target: str, code: int) -> None:
    """`target` (a function writing a file) fails as a full, read-only or forbidden disk would make it."""

    def refuse(*args, **kwargs):
        path = next(str(arg) for arg in args if isinstance(arg, (str, os.PathLike)))
        raise OSError(code, os.strerror(code), path)

    lab.monkeypatch.setattr(target, refuse)


def export_with_masks(change: Callable[[dict, dict, str], None]) -> Callable[[Lab], list[str]]:
    """A row's command: `prune export` of a copy of the 2:4 run (model/ removed) whose mask files
    `change(tensors, masks.json, first target)` edited."""

    def command(lab: Lab) -> list[str]:
        run = lab.copy("wanda24")
        tensors, meta = load_file(run / "masks.safetensors"), json.loads((run / "masks.json").read_text())
        change(tensors, meta, sorted(meta["targets"])[0])
        save_file(tensors, run / "masks.safetensors")
        (run / "masks.json").write_text(json.dumps(meta))
        shutil.rmtree(run / "model")
        return ["export", str(run)]

    return command


def index_255(tensors: dict, meta: dict, name: str) -> None:
    tensors[name][0, 0] = 255


def half_width_in_json(tensors: dict, meta: dict, name: str) -> None:
    meta["targets"][name]["shape"][1] //= 2


def target_dropped(tensors: dict, meta: dict, name: str) -> None:
    del tensors[name], meta["targets"][name]


def indices_of_16_in_32(tensors: dict, meta: dict, name: str) -> None:
    meta["targets"][name].update(n=16, m=32)


def export_with_files_of_50(*names: str) -> Callable[[Lab], list[str]]:
    """A row's command: `prune export` of a copy of the 2:4 run holding the 50% run's `names`."""

    def command(lab: Lab) -> list[str]:
        run = lab.copy("wanda24")
        for name in names:
            shutil.copy(lab.root / "magnitude50" / name, run / name)
        shutil.rmtree(run / "model")
        return ["export", str(run)]

    return command


def no_model_dir(lab: Lab) -> None:
    assert not (lab.tmp / "run" / "model").exists()


def user_dir(lab: Lab) -> list[str]:
    """A user's directory holding their recipe, notes and data: `prune run d/recipe.yaml --output d`."""
    mine = lab.tmp / "mine"
    write(mine / "recipe.yaml", (lab.root / "wanda.yaml").read_text())
    write(mine / "notes.md", "my notes")
    write(mine / "data" / "corpus.txt", "my data")
    return ["run", str(mine / "recipe.yaml"), "--output", str(mine), "--overwrite"]


def user_files_kept(lab: Lab) -> None:
    assert (lab.tmp / "mine" / "notes.md").read_text() == "my notes"
    assert (lab.tmp / "mine" / "data" / "corpus.txt").read_text() == "my data"


def overwrite_keeps_user_file(lab: Lab) -> list[str]:
    run = lab.copy("wanda24")
    write(run / "notes.md", "mine")
    (run / "report.json").write_text('{"stale": true}')
    return ["run", lab.wanda, "--output", str(run), "--overwrite"]


def overwrote_only_ours(lab: Lab) -> None:
    run = lab.tmp / "run"
    assert (run / "notes.md").read_text() == "mine"
    assert "stale" not in json.loads((run / "report.json").read_text())
    only_run_files(run)


def only_run_files(run: Path) -> None:
    """Everything a run wrote is in run_dir.RUN_FILES (the list `--overwrite` removes), besides the user's."""
    unknown = {entry.name for entry in run.iterdir()} - run_dir.RUN_FILES - {"notes.md"}
    assert not unknown, f"files a run wrote that RUN_FILES does not list: {unknown}"


def unfinished_live(lab: Lab) -> list[str]:
    run = lab.copy("unfinished")
    lab.expected.append(f"(pid {lab.hold_lock(run)})")
    return ["run", lab.gumbel, "--output", str(run), "--overwrite"]


def stale_lock(lab: Lab) -> list[str]:
    run = lab.copy("unfinished")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write(run / run_dir.LOCK_FILE, dead.stdout)  # a run killed with -9 leaves this, unlocked
    return ["run", lab.gumbel, "--output", str(run), "--resume"]


def finished(lab: Lab) -> None:
    run = lab.tmp / "run"
    assert json.loads((run / "report.json").read_text())["train"]["steps"] == 4
    only_run_files(run)


def partial_checkpoint(lab: Lab) -> list[str]:
    """kill -9 while step 6's checkpoint was being written: its staging directory is half there."""
    run = lab.copy("unfinished")
    write(run / "train" / "checkpoints" / ".step-6.partial" / "masks.safetensors", b"\x00\x01 torn")
    return ["run", lab.gumbel, "--output", str(run), "--resume"]


def interrupted(lab: Lab) -> list[str]:
    from prune.methods.nm_gumbel.method import NMGumbelObjective

    original = NMGumbelObjective.begin_step

    def ctrl_c_at_step_3(self, step, total_steps):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step, total_steps)

    lab.monkeypatch.setattr(NMGumbelObjective, "begin_step", ctrl_c_at_step_3)
    return lab.run("--set", "train.log_every=1", recipe=lab.gumbel)


def resume_command_works(lab: Lab) -> None:
    """The command the Ctrl-C message prints resumes the run to the end."""
    lab.monkeypatch.undo()
    message = lab.err
    command = shlex.split(message.split("Resume with:")[1].strip().splitlines()[0])
    assert command[:2] == ["prune", "run"] and command[-1] == "--resume"
    assert main(command[1:]) == 0
    assert (lab.tmp / "out" / "report.json").is_file()


def rerun_succeeds(lab: Lab) -> None:
    """After a failure past the claim (a full disk) the same command, rerun, replaces the unfinished run."""
    assert not (lab.tmp / "out" / "report.json").exists()
    assert not [entry for entry in (lab.tmp / "out").iterdir() if entry.name.endswith(".tmp")]
    lab.monkeypatch.undo()
    assert main(lab.run()) == 0


def staged_files_gone(lab: Lab) -> None:
    assert not [entry.name for entry in (lab.tmp / "out").iterdir() if entry.name.startswith(".masks")]


def remote_code(lab: Lab) -> list[str]:
    """A model directory whose config.json maps to its own Python code, and a user who would answer 'y'."""
    model = lab.tmp / "remote"
    shutil.copytree(lab.root / "llama", model)
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    )
    write(model / "config.json", json.dumps(config))
    write(model / "evil.py", f"open({str(lab.tmp / 'RAN')!r}, 'w').write('evil code ran')\n")
    lab.monkeypatch.setattr(builtins, "input", lambda *args: "y")
    return ["eval", str(model), "--data", str(lab.corpus), "--seq-len", "32", "--tasks", "--no-latency"]


def no_code_ran(lab: Lab) -> None:
    assert not (lab.tmp / "RAN").exists()


def recipe_only_run(lab: Lab) -> list[str]:
    run = lab.tmp / "half"
    write(run / "recipe.yaml", (lab.root / "wanda24" / "recipe.yaml").read_text())
    return ["eval", str(run), "--data", str(lab.corpus), "--seq-len", "32", "--tasks", "--no-latency"]


def corrupt_model_dir(lab: Lab) -> list[str]:
    run = lab.copy("wanda24")
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    return ["eval", str(run), "--data", str(lab.corpus), "--seq-len", "32", "--tasks", "--no-latency"]


def bits_encoded(lab: Lab) -> None:
    meta = json.loads((lab.tmp / "out" / "masks.json").read_text())
    assert {info["encoding"] for info in meta["targets"].values()} == {"bits"}
    assert json.loads((lab.tmp / "out" / "report.json").read_text())["sparsity"]["target"] == "16:32"


def resumed_with_slash(lab: Lab) -> list[str]:
    run = lab.copy("unfinished")
    return ["run", lab.gumbel, "--output", f"{run}/", "--resume"]


# ------------------------------------------------------------------------------------------ issue 25 row helpers


def little_ram(lab: Lab, megabytes: int = 1024) -> None:
    """The machine has `megabytes` of RAM free for the run's stages (the memory estimate is checked, nothing is
    allocated); the model weights' own check still sees the real RAM."""
    lab.monkeypatch.setattr("prune.runs.preflight.available_ram", lambda: megabytes * 1024**2)


def damaged_checkpoint(damage: Callable[[Path], None], offload: str) -> Callable[[Lab], list[str]]:
    """A row's command: `prune run` of a copy of the sharded tiny Llama that `damage(directory)` changed, held as
    runtime.offload says."""

    def command(lab: Lab) -> list[str]:
        model = lab.tmp / "sharded"
        shutil.copytree(lab.root / "sharded", model)
        damage(model)
        return lab.run("--set", f"model={model}", "--set", f"runtime.offload={offload}")

    return command


def first_shard(model: Path) -> Path:
    return sorted(model.glob("model-*.safetensors"))[0]


def truncate_shard(model: Path) -> None:
    shard = first_shard(model)
    shard.write_bytes(shard.read_bytes()[:-64])


def corrupt_header(model: Path) -> None:
    shard = first_shard(model)
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"{garbage" + data[16:])


def delete_shard(model: Path) -> None:
    sorted(model.glob("model-*.safetensors"))[1].unlink()


def index_names_missing_file(model: Path) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "model-99999-of-99999.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def config_disagrees(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))


def config_not_json(model: Path) -> None:
    (model / "config.json").write_text("{not json")


def disk_full_on_call(lab: Lab, target: str, call: int = 1) -> None:
    """`target` (safetensors' save_file as a module imported it) fails from its `call`-th use on as a full disk
    makes safetensors fail: a SafetensorError holding the OS error."""
    from safetensors import SafetensorError

    original, calls = _resolve(target), {"n": 0}

    def save(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= call:
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                'message: "No space left on device" })'
            )
        return original(tensors, path, *args, **kwargs)

    lab.monkeypatch.setattr(target, save)


def _resolve(target: str):
    import importlib

    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def full_disk_pwrite(fd: int, data, offset: int) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what os.pwrite raises: no file name


def resumes_after_space_freed(lab: Lab) -> None:
    """The disk refused the second checkpoint: nothing half-written, and the printed command resumes the run."""
    run = lab.tmp / "out"
    assert (run / "train" / "checkpoints" / "latest").read_text() == "step-2"
    assert not [path for path in run.rglob("*") if ".staging-" in path.name or path.name.endswith(".tmp")]
    lab.monkeypatch.undo()
    command = lab.err.split("Resume with:")[1].split()  # the paragraph is wrapped; the lab's paths hold no spaces
    assert command[:2] == ["prune", "run"] and command[-1] == "--resume"
    assert main(command[1:]) == 0
    assert json.loads((run / "report.json").read_text())["train"]["steps"] == 4


def nothing_half_written(lab: Lab) -> None:
    run = lab.tmp / "out"
    assert not (run / "model").exists() and not (run / "report.json").exists()
    assert not [path for path in run.rglob("*") if ".staging-" in path.name or path.name.endswith((".tmp", ".partial"))]


def checkpoint_edited(edit: Callable[[Path], None]) -> Callable[[Lab], list[str]]:
    """A row's command: --resume of a copy of the unfinished run whose latest checkpoint `edit(checkpoint)` changed."""

    def command(lab: Lab) -> list[str]:
        run = lab.copy("unfinished")
        checkpoints = run / "train" / "checkpoints"
        edit(checkpoints / (checkpoints / "latest").read_text())
        return ["run", lab.gumbel, "--output", str(run), "--resume"]

    return command


def nan_in_masks(checkpoint: Path) -> None:
    tensors = load_file(checkpoint / "masks.safetensors")
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, checkpoint / "masks.safetensors")


def set_step(step: int) -> Callable[[Path], None]:
    def edit(checkpoint: Path) -> None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "step": step}))

    return edit


def rename_checkpoint(checkpoint: Path) -> None:
    """step-4 renamed step-2 (and `latest` pointing there): the name and trainer_state.json disagree."""
    checkpoint.rename(checkpoint.parent / "step-2")
    (checkpoint.parent / "latest").write_text("step-2")


def user_compare_dir(lab: Lab) -> list[str]:
    write(lab.tmp / "mine" / "compare.md", "my notes")
    return ["compare", str(lab.root / "wanda24"), "--output", str(lab.tmp / "mine")]


def user_compare_kept(lab: Lab) -> None:
    assert (lab.tmp / "mine" / "compare.md").read_text() == "my notes"
    assert sorted(entry.name for entry in (lab.tmp / "mine").iterdir()) == ["compare.md"]


def compared_before(lab: Lab, *extra: str) -> list[str]:
    """`prune compare` into a directory holding an earlier comparison and a note of the user's."""
    assert main(["compare", str(lab.root / "wanda24"), "--output", str(lab.tmp / "cmp")]) == 0
    write(lab.tmp / "cmp" / "notes.md", "mine")
    return ["compare", str(lab.root / "magnitude50"), "--output", str(lab.tmp / "cmp"), *extra]


def recompared_keeping_notes(lab: Lab) -> None:
    compared = lab.tmp / "cmp"
    assert (compared / "notes.md").read_text() == "mine"
    assert [row["sparsity"] for row in json.loads((compared / "compare.json").read_text())["rows"]][-1] == "0.5"


def one_row_per_run(lab: Lab) -> None:
    rows = json.loads((lab.tmp / "cmp" / "compare.json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["dense", "done"]


def sweep_file(lab: Lab) -> str:
    sweep = f"base: {lab.wanda}\ngrid: {{methods: [magnitude], sparsities: [0.5]}}\noutput: {lab.tmp / 'sweep'}\n"
    return str(write(lab.tmp / "sweep.yaml", sweep))


def no_sweep_dir(lab: Lab) -> None:
    assert not (lab.tmp / "sweep").exists()


def user_sweep_dir(lab: Lab) -> list[str]:
    write(lab.tmp / "sweep" / "notes.md", "my notes")
    return ["sweep", sweep_file(lab)]


def user_sweep_kept(lab: Lab) -> None:
    assert sorted(entry.name for entry in (lab.tmp / "sweep").iterdir()) == ["notes.md"]


def own_code_tokenizer(lab: Lab) -> list[str]:
    """A model whose config.json is plain Llama and whose tokenizer_config.json maps to the repository's code."""
    model = lab.tmp / "remote"
    shutil.copytree(lab.root / "llama", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    write(model / "tokenizer_config.json", json.dumps(config))
    write(model / "evil.py", f"open({str(lab.tmp / 'RAN')!r}, 'w').write('evil code ran')\n")
    return lab.run("--set", f"model={model}")


def export_without_masks(lab: Lab) -> list[str]:
    run = lab.copy("wanda24")
    for name in ("masks.safetensors", "masks.json"):
        (run / name).unlink()
    shutil.rmtree(run / "model")
    return ["export", str(run)]


BROKEN_JSONL = '{"text": "a line of text"}\n{oops\n'


def launched_with_cpu_flag(lab: Lab) -> list[str]:
    """What `accelerate launch --config_file recipes/accelerate/ddp.yaml --cpu` hands its one process."""
    lab.monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    lab.monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    lab.monkeypatch.delenv("WORLD_SIZE", raising=False)
    return lab.run(recipe=lab.gumbel)


def eval_of_run_dir(lab: Lab) -> list[str]:
    return ["eval", str(lab.root / "wanda24"), "--data", str(lab.corpus), "--tasks", "--no-latency", "--extra-texts"]


CASES = [
    # ---- already behaved as the README promises
    Case(
        "unknown key", "works", lambda lab: lab.run("--set", "data.bogus=1"), 2, "unknown key 'data.bogus'", no_output
    ),
    Case("impossible N:M", "works", lambda lab: lab.run("--set", "method.sparsity=4:2"), 2, "0 < N < M", no_output),
    Case(
        "impossible fraction",
        "works",
        lambda lab: lab.run("--set", "method.sparsity=1.5"),
        2,
        "strictly between 0 and 1",
        no_output,
    ),
    Case(
        "missing model",
        "works+11",
        lambda lab: lab.run("--set", "model=/no/such/model"),
        2,
        "no such directory",
        no_output,
    ),
    Case(
        "offline hub id",
        "works+11",
        lambda lab: (lab.monkeypatch.setenv("HF_HUB_OFFLINE", "1"), lab.run("--set", "model=someorg/nomodel"))[1],
        2,
        "Hugging Face Hub, which is unreachable",
        no_output,
    ),
    Case(
        "corrupt masks file",
        "works",
        lambda lab: (write(lab.copy("wanda24") / "masks.safetensors", b"garbage"), ["export", str(lab.tmp / "run")])[1],
        2,
        "corrupt",
    ),
    Case(
        "changed-recipe resume",
        "works",
        lambda lab: ["run", lab.gumbel, "--output", str(lab.copy("unfinished")), "--resume", "--set", "train.lr=0.02"],
        2,
        "recipe changed (train.lr)",
    ),
    Case("kill -9 during a checkpoint write", "works", partial_checkpoint, 0, "", finished),
    Case(
        "nm_gumbel 16:32 enumerates too much",
        "works",
        lambda lab: lab.run("--set", "method.sparsity=16:32", recipe=lab.gumbel),
        2,
        "candidate patterns",
        no_output,
    ),
    # ---- 2: the same command without --resume, a live run, a stale lock
    Case(
        "unfinished run, same command again",
        "2",
        lambda lab: ["run", lab.gumbel, "--output", str(lab.copy("unfinished"))],
        2,
        "unfinished run with checkpoints up to step 4. Pass --resume to continue it (with the same recipe), "
        "--overwrite to start over",
    ),
    Case("second run on a live run", "2", unfinished_live, 2, "is in use: another `prune run` (pid"),
    Case("stale lock of a killed run", "2", stale_lock, 0, "", finished),
    # ---- 3: --overwrite deletes only a MaskPrune run's own files
    Case(
        "--overwrite of a user's directory",
        "3",
        user_dir,
        2,
        "is not a MaskPrune run",
        user_files_kept,
        absent="--overwrite",
    ),
    Case("--overwrite keeps a user's file in a run", "3", overwrite_keeps_user_file, 0, "", overwrote_only_ours),
    Case(
        "finished run without --overwrite",
        "works",
        lambda lab: ["run", lab.wanda, "--output", str(lab.copy("wanda24"))],
        2,
        "pass --overwrite to replace it",
    ),
    # ---- 4: mask files checked against each other and the recipe before anything is written
    Case(
        "50% tensors under a 2:4 masks.json",
        "4",
        export_with_files_of_50("masks.safetensors"),
        2,
        "do not belong together",
        no_model_dir,
    ),
    Case(
        "a 50% run's mask files in a 2:4 run",
        "4",
        export_with_files_of_50("masks.safetensors", "masks.json"),
        2,
        "were not made by the run its recipe.yaml describes (name: 'magnitude' in masks.json, 'wanda' in recipe.yaml",
        no_model_dir,
    ),
    Case(
        "a target missing from both mask files",
        "4",
        export_with_masks(target_dropped),
        2,
        "do not cover the 14 modules",
        no_model_dir,
    ),
    Case(
        "masks.json entry of the wrong shape",
        "7",
        export_with_masks(half_width_in_json),
        2,
        "do not belong together",
        no_model_dir,
    ),
    Case(
        "masks.json claiming 16:32 indices",
        "8",
        export_with_masks(indices_of_16_in_32),
        2,
        "as 16:32 masks",
        no_model_dir,
    ),
    Case(
        "candidate index 255 of 2:4",
        "14",
        export_with_masks(index_255),
        2,
        "candidate index 255, beyond the 6 candidates of 2:4 (valid: 0-5)",
        no_model_dir,
    ),
    # ---- 5: non-finite numbers
    Case(
        "train.lr=.inf",
        "5",
        lambda lab: lab.run("--set", "train.lr=.inf", recipe=lab.gumbel),
        2,
        "train.lr: inf is not a finite number",
        no_output,
    ),
    Case(
        "method.dampening=.inf",
        "5",
        lambda lab: lab.run("--set", "method.name=sparsegpt", "--set", "method.dampening=.inf"),
        2,
        "method.dampening: inf is not a finite number",
        no_output,
    ),
    Case(
        "method.tau_end=.nan",
        "5",
        lambda lab: lab.run("--set", "method.tau_end=.nan", recipe=lab.gumbel),
        2,
        "method.tau_end: nan is not a finite number",
        no_output,
    ),
    # ---- 7: tracebacks that are now one paragraph with exit 2
    Case(
        "recipe not YAML",
        "7",
        lambda lab: ["run", str(write(lab.tmp / "r.yaml", "method: [wanda\n  x: {")), "--output", str(lab.tmp / "out")],
        2,
        "is not valid YAML",
        no_output,
    ),
    Case(
        "recipe not UTF-8",
        "7",
        lambda lab: [
            "run",
            str(write(lab.tmp / "r.yaml", b"method: {name: wanda}\n# caf\xe9\n")),
            "--output",
            str(lab.tmp / "out"),
        ],
        2,
        "is not UTF-8 text (byte 0xe9",
        no_output,
    ),
    Case(
        "malformed --set",
        "7",
        lambda lab: lab.run("--set", "method.sparsity=[2:4"),
        2,
        "the value of --set 'method.sparsity=[2:4' is not valid YAML",
        no_output,
    ),
    Case(
        "binary data file",
        "7",
        lambda lab: lab.run("--set", f"data.source={write(lab.tmp / 'blob.txt', bytes(range(256)) * 40)}"),
        2,
        "is not UTF-8 text (byte 0x80",
        no_output,
    ),
    Case(
        "output is a file",
        "7",
        lambda lab: lab.run(output=write(lab.tmp / "out", "x").name),
        2,
        "is a file; choose a directory",
    ),
    Case(
        "output below a file",
        "7",
        lambda lab: (write(lab.tmp / "f", "x"), lab.run(output="f/run"))[1],
        2,
        "lies below the file",
    ),
    Case(
        "read-only output disk",
        "7",
        lambda lab: (disk_error(lab, "prune.runs.run_dir.write_text_atomic", errno.EROFS), lab.run())[1],
        2,
        "the file system is read-only",
    ),
    Case(
        "output disk full before the report",
        "7",
        lambda lab: (disk_error(lab, "prune.runs.report.write_text_atomic", errno.ENOSPC), lab.run())[1],
        2,
        "the disk is full",
        rerun_succeeds,
    ),
    Case(
        "permission denied writing masks",
        "7",
        lambda lab: (disk_error(lab, "prune.core.atomic.save_file", errno.EACCES), lab.run())[1],
        2,
        "permission denied",
        staged_files_gone,
    ),
    Case(
        "seq_len above a GPT-2's positions",
        "7",
        lambda lab: lab.run("--set", f"model={lab.root / 'gpt2'}", "--set", "data.seq_len=512"),
        2,
        "data.seq_len 512 is longer than the 256 positions",
        no_output,
    ),
    Case("corrupt model/model.safetensors in prune eval", "7", corrupt_model_dir, 2, "are unreadable"),
    Case(
        "prune export with a broken recipe.yaml",
        "7",
        lambda lab: (write(lab.copy("wanda24") / "recipe.yaml", "method: [oops"), ["export", str(lab.tmp / "run")])[1],
        2,
        "recipe.yaml' is not valid YAML",
    ),
    Case(
        "prune eval --seq-len 0",
        "7",
        lambda lab: ["eval", str(lab.root / "llama"), "--data", str(lab.corpus), "--seq-len", "0", "--tasks"],
        2,
        "--seq-len 0: Input should be greater than or equal to 8",
    ),
    # ---- 8: N:M patterns a method cannot enumerate
    Case(
        "one-shot 16:32 (no enumeration)",
        "8",
        lambda lab: lab.run("--set", "method.sparsity=16:32"),
        0,
        "",
        bits_encoded,
    ),
    # ---- 10, 11, 12: checks before the claim and before the first forward
    Case(
        "seq_len above a Llama's positions",
        "10",
        lambda lab: lab.run("--set", "data.seq_len=512"),
        2,
        "data.seq_len 512 is longer than the 256 positions",
        no_output,
    ),
    Case(
        "targets that match nothing",
        "11",
        lambda lab: lab.run("--set", "method.targets=['*.nothing']"),
        2,
        "matches no",
        no_output,
    ),
    Case(
        "more calibration blocks than the data holds",
        "11",
        lambda lab: lab.run("--set", "data.calibration_samples=100000"),
        2,
        "calibration_samples=100000 needs",
        no_output,
    ),
    Case(
        "2:5 does not tile the layers",
        "12",
        lambda lab: (fail_on_forward(lab), lab.run("--set", "method.sparsity=2:5"))[1],
        2,
        "14 targeted layer(s) have an input size (64, 128) not divisible by M=5: 14 of them "
        "(model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj, ...; "
        "selected by 'model.layers.*.self_attn.q_proj'",
        no_output,
    ),
    Case(
        "lm-eval task name with a typo",
        "12",
        lambda lab: (fail_on_forward(lab), lab.run("--set", "eval.tasks=[hellaswgg]"))[1],
        2,
        "unknown task 'hellaswgg'",
        no_output,
    ),
    Case(
        "hub lm-eval task offline",
        "12",
        lambda lab: (
            fail_on_forward(lab),
            lab.monkeypatch.setenv("HF_HUB_OFFLINE", "1"),
            lab.run("--set", "eval.tasks=[arc_easy]"),
        )[2],
        2,
        "task 'arc_easy' needs its dataset from the Hugging Face Hub, which is unreachable",
        no_output,
    ),
    # ---- 13: one directory, however it is spelled
    Case("--output DIR/ resumes DIR", "13", resumed_with_slash, 0, "", finished),
    # ---- 14: messages that name the fix
    Case(
        "empty recipe",
        "14",
        lambda lab: ["run", str(write(lab.tmp / "empty.yaml", "")), "--output", str(lab.tmp / "out")],
        2,
        "A minimal recipe is the single line `method: {name: wanda, sparsity: 2:4}`",
        no_output,
    ),
    Case(
        "data source is a directory",
        "14",
        lambda lab: lab.run("--set", f"data.source={lab.root}"),
        2,
        "is a directory; pass one file in it",
        no_output,
    ),
    Case(
        "prune eval of a run holding only recipe.yaml",
        "14",
        recipe_only_run,
        2,
        "the run is unfinished (no report.json)",
        absent="export.save_model was false",
    ),
    Case("Ctrl-C says how to resume", "14", interrupted, 130, "Resume with: prune run", resume_command_works),
    Case("a model that ships its own code", "14", remote_code, 2, "never runs a model repository's code", no_code_ran),
    Case(
        "prune run of a model that ships its own code",
        "14",
        lambda lab: (remote_code(lab), lab.run("--set", f"model={lab.tmp / 'remote'}"))[1],
        2,
        "never runs a model repository's code",
        no_code_ran,
    ),
    # ---- issue 25, class 1: sizes that decide memory checked before the claim
    Case(
        "train.batch_size beyond the training windows",
        "25.1",
        lambda lab: lab.run("--set", "train.batch_size=1000", recipe=lab.gumbel),
        2,
        "train.batch_size 1000 asks for more windows per micro-batch than the training data holds",
        no_output,
    ),
    Case(
        "train.batch_size 100000: the estimate, the limit, the setting",
        "25.1",
        lambda lab: (little_ram(lab), lab.run("--set", "train.batch_size=100000", recipe=lab.gumbel))[1],
        2,
        "the run does not fit: training (train.batch_size 100000 x data.seq_len 32 tokens per micro-batch) needs about",
        no_output,
    ),
    Case(
        "calibration samples x seq_len beyond memory",
        "25.1",
        lambda lab: (little_ram(lab, 64), lab.run("--set", "data.calibration_samples=100000"))[1],
        2,
        "calibration (100000 windows of 32 tokens) needs about",
        no_output,
    ),
    Case(
        "eval.batch_size beyond memory",
        "25.1",
        lambda lab: (little_ram(lab), lab.run("--set", "eval.batch_size=100000"))[1],
        2,
        "evaluation (100000 windows of 32 tokens per forward) needs about",
        no_output,
    ),
    Case(
        "a sweep whose points cannot fit",
        "25.1",
        lambda lab: (little_ram(lab), ["sweep", sweep_file(lab), "--set", "eval.batch_size=100000"])[1],
        2,
        "lower eval.batch_size",
        no_sweep_dir,
    ),
    # ---- issue 25, class 2: damaged checkpoints (in memory and streamed), settings beyond what the code holds,
    # a full disk at any write, a prior run and a resumed checkpoint checked for content, all before the claim
    Case(
        "truncated shard, offload none", "works", damaged_checkpoint(truncate_shard, "none"), 2, "truncated", no_output
    ),
    Case(
        "truncated shard, offload disk",
        "25.2",
        damaged_checkpoint(truncate_shard, "disk"),
        2,
        "is truncated or corrupt (the file ends at byte",
        no_output,
    ),
    Case(
        "corrupt safetensors header, offload disk",
        "25.2",
        damaged_checkpoint(corrupt_header, "disk"),
        2,
        "model-00001-of-",
        no_output,
    ),
    Case(
        "missing shard, in memory",
        "25.2",
        damaged_checkpoint(delete_shard, "none"),
        2,
        "names 1 shard file(s) that",
        no_output,
    ),
    Case(
        "missing shard, offload disk",
        "25.2",
        damaged_checkpoint(delete_shard, "disk"),
        2,
        "the checkpoint is incomplete",
        no_output,
    ),
    Case(
        "index naming a missing file, offload cpu",
        "25.2",
        damaged_checkpoint(index_names_missing_file, "cpu"),
        2,
        "model-99999-of-99999.safetensors",
        no_output,
    ),
    Case(
        "tensors disagreeing with config.json, in memory",
        "25.2",
        damaged_checkpoint(config_disagrees, "none"),
        2,
        "do not match its config.json (shapes differ: model.layers.0.mlp.gate_proj.weight (128, 64) (config.json: "
        "(96, 64))",
        no_output,
    ),
    Case(
        "tensors disagreeing with config.json, offload disk",
        "25.2",
        damaged_checkpoint(config_disagrees, "disk"),
        2,
        "do not match its config.json",
        no_output,
    ),
    Case(
        "config.json not JSON",
        "25.2",
        damaged_checkpoint(config_not_json, "none"),
        2,
        "config.json is not JSON",
        no_output,
    ),
    Case(
        "empty model directory",
        "25.2",
        lambda lab: lab.run("--set", f"model={(lab.tmp / 'empty').mkdir() or lab.tmp / 'empty'}"),
        2,
        "has no config.json, so it is not a saved model",
        no_output,
    ),
    Case("seed beyond 64 bits", "25.2", lambda lab: lab.run("--set", f"seed={2**70}"), 2, "seed: Input", no_output),
    Case(
        "train.seed beyond 64 bits",
        "25.2",
        lambda lab: lab.run("--set", f"train.seed={2**70}", recipe=lab.gumbel),
        2,
        "train.seed: Input should be less than 9223372036854775808",
        no_output,
    ),
    Case(
        "runtime.threads beyond a C int",
        "25.2",
        lambda lab: lab.run("--set", f"runtime.threads={2**40}"),
        2,
        "runtime.threads: Input should be less than 2147483648",
        no_output,
    ),
    Case(
        "a temperature below float32",
        "25.2",
        lambda lab: lab.run("--set", "method.tau_start=1e-300", recipe=lab.gumbel),
        2,
        "method.tau_start: 1e-300 is outside float32's range",
        no_output,
    ),
    Case(
        "disk full at a training checkpoint",
        "25.2",
        lambda lab: (
            disk_full_on_call(lab, "prune.core.atomic.save_file", call=3),  # step 2's two files pass, step 4's fail
            lab.run(recipe=lab.gumbel),
        )[1],
        2,
        "train/checkpoints/step-4/masks.safetensors: the disk is full (No space left on device;",
        resumes_after_space_freed,
    ),
    Case(
        "disk full writing model/",
        "25.2",
        lambda lab: (disk_full_on_call(lab, "transformers.modeling_utils.safe_save_file"), lab.run())[1],
        2,
        "MB free on that disk",
        nothing_half_written,
    ),
    Case(
        "disk full writing a streamed shard",
        "25.2",
        lambda lab: (
            lab.monkeypatch.setattr("prune.models.shards.os.pwrite", full_disk_pwrite),
            lab.run("--set", f"model={lab.root / 'sharded'}", "--set", "runtime.offload=disk"),
        )[1],
        2,
        "model-00001-of-",
        nothing_half_written,
    ),
    Case(
        "method.prior naming a missing run",
        "25.2",
        lambda lab: lab.run("--set", f"method.prior={lab.tmp / 'nope'}", recipe=lab.gumbel),
        2,
        "method.prior",
        no_output,
    ),
    Case(
        "method.prior naming a run of another pattern",
        "25.2",
        lambda lab: lab.run("--set", f"method.prior={lab.root / 'magnitude50'}", recipe=lab.gumbel),
        2,
        "were learned for sparsity 0.5, not 2:4",
        no_output,
    ),
    Case(
        "--resume from a checkpoint holding NaN",
        "25.2",
        checkpoint_edited(nan_in_masks),
        2,
        "holds non-finite values",
    ),
    Case(
        "--resume from a step beyond train.steps",
        "25.2",
        checkpoint_edited(set_step(1_000_000)),
        2,
        "says step 1000000, but its directory is step-4",
    ),
    Case(
        "--resume from a checkpoint whose name and step disagree",
        "25.2",
        checkpoint_edited(rename_checkpoint),
        2,
        "says step 4, but its directory is step-2",
    ),
    # ---- issue 25, class 3: compare and sweep never overwrite what MaskPrune did not write
    Case(
        "prune compare into a user's directory",
        "25.3",
        user_compare_dir,
        2,
        "is not a MaskPrune comparison",
        user_compare_kept,
    ),
    Case("prune compare over an earlier comparison", "25.3", compared_before, 2, "already holds a comparison"),
    Case(
        "prune compare --overwrite keeps the user's note",
        "25.3",
        lambda lab: compared_before(lab, "--overwrite"),
        0,
        "",
        recompared_keeping_notes,
    ),
    Case(
        "prune compare RUN RUN/",
        "25.3",
        lambda lab: [
            "compare",
            str(lab.root / "wanda24"),
            f"{lab.root / 'wanda24'}/",
            "--output",
            str(lab.tmp / "cmp"),
        ],
        0,
        "",
        one_row_per_run,
    ),
    Case("prune sweep into a user's directory", "25.3", user_sweep_dir, 2, "is not a MaskPrune sweep", user_sweep_kept),
    Case(
        "a refused sweep leaves no directory",
        "25.3",
        lambda lab: ["sweep", sweep_file(lab), "--set", "model=/no/such/model"],
        2,
        "no such directory",
        no_sweep_dir,
    ),
    # ---- issue 25, class 5: a launch that would not be what its config says
    Case(
        "accelerate launch --cpu (one process whatever num_processes says)",
        "25.5",
        launched_with_cpu_flag,
        2,
        "`accelerate launch --cpu` started ONE process",
        no_output,
    ),
    # ---- issue 25, class 6: messages that name the real cause
    Case(
        "a tokenizer that ships its own code",
        "25.6",
        own_code_tokenizer,
        2,
        "ships its own Python code (an `auto_map` in tokenizer_config.json) and transformers would have to run it to "
        "build the tokenizer",
        no_code_ran,
    ),
    Case(
        "method.targets: []",
        "25.6",
        lambda lab: lab.run("--set", "method.targets=[]"),
        2,
        "method.targets: is an empty list, which would prune nothing",
        no_output,
    ),
    Case(
        "a .jsonl with a broken line",
        "25.6",
        lambda lab: lab.run("--set", f"data.source={write(lab.tmp / 'bad.jsonl', BROKEN_JSONL)}"),
        2,
        "line 2 is not JSON",
        no_output,
    ),
    Case(
        "a file given as a model",
        "25.6",
        lambda lab: lab.run("--set", f"model={lab.corpus}"),
        2,
        "is a file, not a model directory",
        no_output,
    ),
    Case(
        "a directory given as a recipe",
        "25.6",
        lambda lab: ["run", str(lab.root), "--output", str(lab.tmp / "out")],
        2,
        "is a directory; pass one YAML file",
        no_output,
    ),
    Case("export of a run without masks", "25.6", export_without_masks, 2, "holds no masks.safetensors + masks.json"),
    Case(
        "divergence at step 1 does not blame train.lr",
        "25.6",
        lambda lab: lab.run("--set", "method.kappa_start=3e38", "--set", "method.tau_start=1e-37", recipe=lab.gumbel),
        1,
        "train.lr played no part",
        lambda lab: None,
        absent="Lower train.lr",
    ),
    Case("prune eval RUN_DIR uses the run's seq_len", "25.6", eval_of_run_dir, 0, ""),
    # ---- issue 22: recovery settings, refused before the output is claimed
    Case(
        "recovery after per-input gating",
        "22",
        lambda lab: lab.run("--set", "method={name: gating}", "--set", "recover.steps=2"),
        2,
        "gating chooses what to compute per input and leaves no plain model to recover",
        no_output,
    ),
    Case(
        "recovery under offload",
        "22",
        lambda lab: lab.run("--set", "recover.steps=2", "--set", "runtime.offload=cpu"),
        2,
        "recover.steps trains the whole pruned model on the device, which runtime.offload: cpu does not hold",
        no_output,
    ),
    Case(
        "recover.targets matching nothing",
        "22",
        lambda lab: (
            fail_on_forward(lab),
            lab.run("--set", "recover.steps=2", "--set", "recover.targets=['*.mlp.nothing']"),
        )[1],
        2,
        "recover.targets: target pattern '*.mlp.nothing' matches no Linear/Conv1D module",
        no_output,
    ),
    Case(
        "unknown recover key",
        "22",
        lambda lab: lab.run("--set", "recover.rnak=4"),
        2,
        "unknown key 'recover.rnak'; allowed keys in recover: steps,",
        no_output,
    ),
    Case(
        "unknown recovery mode",
        "22",
        lambda lab: lab.run("--set", "recover.steps=2", "--set", "recover.mode=half"),
        2,
        "recover.mode: Input should be 'lora' or 'full'",
        no_output,
    ),
    Case(
        "prune export of a recovered run",
        "22",
        lambda lab: ["export", str(lab.copy("recovered"))],
        2,
        "trained the kept weights after pruning (recover.steps), which the masks alone cannot rebuild",
    ),
]


# ------------------------------------------------------------------------------------------ shared inputs


def write_inputs(root: Path) -> Path:
    """The lab's inputs: a corpus, tiny Llama and GPT-2 directories, and the wanda and nm_gumbel recipes."""
    write(root / "docs.txt", docs_text())
    save_tiny_model(root / "llama")
    save_tiny_model(root / "gpt2", "gpt2")
    write(
        root / "wanda.yaml",
        (
            f"model: {root / 'llama'}\n"
            f"data: {{source: {root / 'docs.txt'}, calibration_samples: 4, seq_len: 32}}\n"
            "method: {name: wanda, sparsity: 2:4}\n"
            "eval: {tasks: [], latency: false}\n"
        ),
    )
    write(
        root / "gumbel.yaml",
        (
            f"model: {root / 'llama'}\n"
            f"data: {{source: {root / 'docs.txt'}, calibration_samples: 4, seq_len: 32}}\n"
            "method: {name: nm_gumbel, sparsity: 2:4, prior: magnitude}\n"
            "train: {steps: 4, batch_size: 2, lr: 0.05, checkpoint_every: 2, log_every: 2}\n"
            "eval: {tasks: [], latency: false, dense_baseline: false}\n"
        ),
    )
    return root


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory) -> Path:
    """The inputs, a sharded copy of the tiny Llama, and the runs rows start from: a finished 2:4 and 50% run, an
    nm_gumbel run killed after training, a finished 2:4 run with recovery."""
    root = write_inputs(tmp_path_factory.mktemp("lab"))
    sharded = AutoModelForCausalLM.from_pretrained(root / "llama")
    sharded.save_pretrained(root / "sharded", max_shard_size="50KB")  # a few shards and an index
    AutoTokenizer.from_pretrained(root / "llama").save_pretrained(root / "sharded")
    torch.set_num_threads(1)
    assert main(["run", str(root / "wanda.yaml"), "--output", str(root / "wanda24")]) == 0
    assert (
        main(
            [
                "run",
                str(root / "wanda.yaml"),
                "--output",
                str(root / "magnitude50"),
                "--set",
                "method.name=magnitude",
                "--set",
                "method.sparsity=0.5",
            ]
        )
        == 0
    )
    assert main(["run", str(root / "gumbel.yaml"), "--output", str(root / "unfinished")]) == 0
    recovery = ["--set", "recover.steps=2", "--set", "recover.batch_size=2"]
    assert main(["run", str(root / "wanda.yaml"), "--output", str(root / "recovered"), *recovery]) == 0
    for name in ("report.json", "report.md", "masks.safetensors", "masks.json"):  # as if killed after training
        (root / "unfinished" / name).unlink()
    shutil.rmtree(root / "unfinished" / "model")
    return root


def snapshot(root: Path) -> dict[Path, tuple[int, int]]:
    """Every file's size and mtime (a run's lock file is bookkeeping: taking the lock records the pid)."""
    return {
        path: (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and path.name != run_dir.LOCK_FILE
    }


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, lab_root, tmp_path, monkeypatch, capsys, one_thread):
    lab = Lab(lab_root, tmp_path, monkeypatch)
    try:
        argv = case.command(lab)
        before = snapshot(tmp_path)
        code = main(argv)  # returns: a traceback would raise out of main instead
        err = lab.err = capsys.readouterr().err
        message = " ".join(err.split())
        assert code == case.code, message[-2000:]
        assert all(phrase in message for phrase in (case.phrase, *lab.expected)), message[-2000:]
        assert case.absent is None or case.absent not in message
        assert "Traceback" not in err
        if code != 0:
            error_lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted"))]
            assert len(error_lines) == 1 and len(err[err.index(error_lines[0]) :]) < 1000, "one short paragraph"
            after = snapshot(tmp_path)
            changed = [path for path, stamp in before.items() if after.get(path) != stamp]
            assert not changed, f"a failed command changed or deleted {changed}"
            assert not [path for path in after if path.name == "report.json" and path not in before]
        case.after(lab)
    finally:
        for cleanup in lab.cleanups:
            cleanup()


def test_every_defect_of_issue_15_on_our_side_has_a_row():
    covered = {defect for case in CASES for defect in case.defect.split("+")}
    assert {"2", "3", "4", "5", "7", "8", "10", "11", "12", "13", "14", "22", "works"} <= covered
    assert {"25.1", "25.2", "25.3", "25.5", "25.6"} <= covered  # issue 25's classes (4 and 7: other tests)


# ------------------------------------------------------------------------------------------ beside the table


def _config_classes():
    """Every config section class: the recipe's, every method's, the sweep's."""
    import prune.methods.registry  # noqa: F401 - registers every method's config class
    import prune.runs.recipe  # noqa: F401
    import prune.sweep.recipe  # noqa: F401
    from prune.core.config import StrictConfig

    found, todo = [], [StrictConfig]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _takes_float(annotation) -> bool:
    from typing import get_args

    return annotation is float or any(arg is float for arg in get_args(annotation))


def test_every_numeric_field_of_every_config_rejects_inf_and_nan():
    from pydantic import ValidationError

    checked = 0
    for cls in _config_classes():
        for name, info in cls.model_fields.items():
            if not _takes_float(info.annotation):
                continue
            for value in (math.inf, -math.inf, math.nan):
                with pytest.raises(ValidationError) as error:
                    cls.model_validate({"name": "x", name: value})
                assert any(item["loc"][0] == name for item in error.value.errors()), (cls.__name__, name, value)
            checked += 1
    assert checked >= 30  # train, data, method and sweep sections alike


def _takes_int(annotation) -> bool:
    from typing import get_args

    return annotation is int or any(arg is int for arg in get_args(annotation))


def test_every_number_of_every_config_is_bounded_to_what_torch_holds():
    """An integer beyond 64 bits and a float beyond float32 are refused by the recipe, before anything runs (a
    seed of 2^70 overflowed inside torch, a temperature of 1e-300 overflowed the float32 logits it divides)."""
    from pydantic import ValidationError

    checked = 0
    for cls in _config_classes():
        for name, info in cls.model_fields.items():
            values = [2**64, -(2**64)] if _takes_int(info.annotation) else []
            values += [1e300, -1e300, 1e-300] if _takes_float(info.annotation) else []
            for value in values:
                with pytest.raises(ValidationError) as error:
                    cls.model_validate({"name": "x", name: value})
                assert any(item["loc"][0] == name for item in error.value.errors()), (cls.__name__, name, value)
            checked += bool(values)
    assert checked >= 45  # every int and float field of the train, data, eval, runtime, method and sweep sections


def test_every_model_load_passes_trust_remote_code_false(monkeypatch, tmp_path, clip_dir):
    """A config with an auto_map would make transformers ask on the terminal and, answered 'y', run its code."""
    import transformers

    from prune.calibration.streaming import skeleton
    from prune.models.preflight import model_size
    from prune.runs.loading import load_model
    from prune.structural.shrink import LAYER_SIZES_KEY

    calls = []
    for cls, method in [
        (transformers.AutoModelForCausalLM, "from_pretrained"),
        (transformers.AutoModelForCausalLM, "from_config"),
        (transformers.AutoTokenizer, "from_pretrained"),
        (transformers.AutoConfig, "from_pretrained"),
        (transformers.AutoProcessor, "from_pretrained"),
        (transformers.CLIPModel, "from_pretrained"),
        (transformers.AutoModelForImageClassification, "from_pretrained"),
        (transformers.AutoImageProcessor, "from_pretrained"),
    ]:
        original = getattr(cls, method).__func__

        def spy(klass, *args, _original=original, _name=f"{cls.__name__}.{method}", **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", "unset")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, method, classmethod(spy))
    model_dir = save_tiny_model(tmp_path / "llama")
    load_model(str(model_dir))
    load_model(str(clip_dir), task="zero-shot-classification")
    load_model(str(save_tiny_resnet(tmp_path / "resnet")), task="image-classification")
    model_size(model_dir)  # the memory preflight and the streamed path build skeletons from the config
    skeleton(model_dir, torch.float32)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("prune.structural.shrink.build_model", stop)  # the per-layer loader, after its AutoConfig
    config = json.loads((model_dir / "config.json").read_text())
    write(model_dir / "config.json", json.dumps({**config, LAYER_SIZES_KEY: []}))
    with pytest.raises(Stop):
        load_model(str(model_dir))
    names = {name.split(".")[0] for name, _ in calls}
    assert {
        "AutoModelForCausalLM",
        "AutoTokenizer",
        "AutoConfig",
        "AutoProcessor",
        "CLIPModel",
        "AutoModelForImageClassification",
        "AutoImageProcessor",
    } <= names
    assert "AutoModelForCausalLM.from_config" in {name for name, _ in calls}
    assert all(value is False for _, value in calls), calls


def test_summarized_names_stay_short():
    from prune.core.errors import summarize_names

    names = [f"model.layers.{i}.{kind}" for i in range(30) for kind in ("self_attn.q_proj", "mlp.up_proj")]
    text = summarize_names(names)
    assert text.startswith(
        "60 of them (model.layers.0.self_attn.q_proj, model.layers.0.mlp.up_proj, "
        "model.layers.1.self_attn.q_proj, ...; selected by 'model.layers.*.self_attn.q_proj', "
        "'model.layers.*.mlp.up_proj')"
    )
    assert summarize_names(names[:2]) == "model.layers.0.self_attn.q_proj, model.layers.0.mlp.up_proj"
