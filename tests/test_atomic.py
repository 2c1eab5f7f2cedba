import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from prune.core import atomic
from prune.core.atomic import (
    read_tensors_with_json,
    readable_mode,
    staged_directory,
    write_json_atomic,
    write_safetensors_atomic,
    write_tensors_with_json,
    write_text_atomic,
)
from prune.core.errors import UserInputError


def test_json_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "report.json"
    obj = {"ppl": 12.5, "tasks": {"docs_lastword": 0.4}, "shape": (1, 2), "path": tmp_path}
    write_json_atomic(path, obj)
    assert json.loads(path.read_text()) == {
        "ppl": 12.5,
        "tasks": {"docs_lastword": 0.4},
        "shape": [1, 2],
        "path": str(tmp_path),
    }
    assert os.listdir(path.parent) == ["report.json"]


def test_nan_is_refused_and_old_file_kept(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"ppl": 3.0})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"ppl": float("nan")})
    assert json.loads(path.read_text()) == {"ppl": 3.0}


def test_failed_replace_leaves_old_content_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    write_text_atomic(path, "old\n")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["report.md"]
    monkeypatch.undo()
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"


def test_safetensors_bytes_equal_a_plain_save_and_permissions_follow_the_umask(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.uint8), "a": torch.randn(2, 3)}
    save_file(tensors, tmp_path / "plain.safetensors")
    write_safetensors_atomic(tmp_path / "atomic.safetensors", tensors)
    assert (tmp_path / "atomic.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    assert stat.S_IMODE((tmp_path / "atomic.safetensors").stat().st_mode) == readable_mode()


def test_tensor_pair_writes_the_json_byte_for_byte(tmp_path):
    info = {"format_version": 1, "targets": {"x": {"shape": [2]}}}
    write_tensors_with_json(tmp_path, "masks.safetensors", {"x": torch.ones(2)}, "masks.json", info)
    assert (tmp_path / "masks.json").read_text() == json.dumps(info, indent=2)
    assert torch.equal(load_file(tmp_path / "masks.safetensors")["x"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["masks.json", "masks.safetensors"]


def test_tensor_pair_reads_back_what_was_written(tmp_path):
    info = {"format_version": 3, "method": "gating", "layers": {}}
    write_tensors_with_json(tmp_path, "p.safetensors", {"x": torch.arange(3.0)}, "p.json", info)
    read_info, tensors = read_tensors_with_json(tmp_path, "p.safetensors", "p.json", method="gating", format_version=3)
    assert read_info == info and torch.equal(tensors["x"], torch.arange(3.0))


def _damage(tmp_path, how: str) -> None:
    info = {"format_version": 3, "method": "gating"}
    write_tensors_with_json(tmp_path, "p.safetensors", {"x": torch.ones(2)}, "p.json", info)
    if how == "missing":
        (tmp_path / "p.safetensors").unlink()
    elif how == "json":
        (tmp_path / "p.json").write_text("{not json")
    elif how == "tensors":
        (tmp_path / "p.safetensors").write_bytes(b"\x00" * 5)
    elif how == "method":
        (tmp_path / "p.json").write_text(json.dumps({**info, "method": "activation"}))
    elif how == "version":
        (tmp_path / "p.json").write_text(json.dumps({**info, "format_version": 2}))


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "has no p.safetensors \\+ p.json; pass the run directory of a `prune run` with method gating"),
        ("json", "the gating files in .* are corrupt"),
        ("tensors", "the gating files in .* are corrupt"),
        ("method", "p.json is not a MaskPrune gating file of format 3"),
        ("version", "p.json is not a MaskPrune gating file of format 3"),
    ],
)
def test_tensor_pair_refuses_a_missing_corrupt_or_foreign_pair(tmp_path, how, message):
    _damage(tmp_path, how)
    with pytest.raises(UserInputError, match=message):
        read_tensors_with_json(tmp_path, "p.safetensors", "p.json", method="gating", format_version=3)


def test_staged_directory_replaces_the_target_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with staged_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    assert os.listdir(target) == ["a.txt"]
    assert stat.S_IMODE(target.stat().st_mode) == readable_mode(directory=True)
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "b.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert os.listdir(target) == ["a.txt"]  # the old directory stands, nothing staged is left behind
    assert os.listdir(tmp_path) == ["model"]
    with staged_directory(target) as staging:
        (staging / "b.txt").write_text("second")
    assert os.listdir(target) == ["b.txt"]


def test_a_complete_cache_entry_wins_and_a_leftover_is_replaced(tmp_path):
    target = tmp_path / "alias"
    target.mkdir()
    (target / "partial.bin").write_text("leftover")  # no config.json: incomplete
    complete = lambda path: (path / "config.json").is_file()  # noqa: E731
    with staged_directory(target, complete=complete) as staging:
        (staging / "config.json").write_text("mine")
    assert os.listdir(target) == ["config.json"]
    with staged_directory(target, complete=complete) as staging:
        (staging / "config.json").write_text("another process")
    assert (target / "config.json").read_text() == "mine"
    assert os.listdir(tmp_path) == ["alias"]
