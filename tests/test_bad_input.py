"""The bad-input catalogue as a test: one row per way a user (or a crashing machine) can hand MaskPrune bad
input, each run through `prune.cli.main` in-process and checked three ways: the exit code, a phrase of the
one-paragraph message (no traceback: `main` returns), and what is on disk afterwards (after a failure nothing
that existed was changed or deleted and no report.json appeared; rows that succeed check their own files).

Rows marked `works` behaved before the fixes of issue 15 (`works+11`: the message did, but the output directory
was claimed anyway); every other row names the defect it covers and failed before its fix.
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
    """The inputs, and the runs rows start from: a finished 2:4 and 50% run, an nm_gumbel run killed after training,
    a finished 2:4 run with recovery."""
    root = write_inputs(tmp_path_factory.mktemp("lab"))
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
