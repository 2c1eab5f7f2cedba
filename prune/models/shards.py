"""Sharded safetensors checkpoints read and written one tensor at a time, so a model larger than RAM streams.

safetensors' own writers take a whole shard as a dict of in-memory tensors. A safetensors file is only
`u64 header length | JSON header | raw bytes`, and the header needs names, dtypes, shapes and offsets, all known
before any tensor exists. So `ShardedWriter` plans every shard up front (greedy, in the given order, as
transformers does), writes each header when the shard is first touched and `pwrite`s every tensor at its offset,
in any order. A shard is `<file>.partial` until its last tensor arrives, and the index
(`model.safetensors.index.json`, the format `from_pretrained` reads) is written last: a directory without it is
unfinished. `ShardReader` reads one tensor with `pread` into a fresh tensor, no memory map, so nothing stays
resident after the caller drops it (a mapped shard's touched pages count in RSS until unmapped).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prune.core.atomic import naming, write_text_atomic
from prune.core.errors import UserInputError, summarize_names

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ST_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {value: key for key, value in _ST_DTYPES.items()}

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]
_SAVE_AGAIN = "save the model again with save_pretrained."


def shard_files(model_dir: Path) -> list[str]:
    """The safetensors files of a checkpoint; UserInputError for a .bin-only (pickle) checkpoint, an index that is
    not JSON, or one naming a file that is not there."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserInputError(
                f"{index} is not a safetensors index ({type(error).__name__}: {error}); {_SAVE_AGAIN}"
            ) from None
        missing = [name for name in files if not isinstance(name, str) or not (model_dir / name).is_file()]
        if missing:
            shown = ", ".join(map(str, missing[:3])) + (", ..." if len(missing) > 3 else "")
            raise UserInputError(
                f"{index} names {len(missing)} shard file(s) that {model_dir} does not hold ({shown}): the checkpoint "
                f"is incomplete (a download or copy cut short?). Copy the missing shards, or {_SAVE_AGAIN}"
            )
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise UserInputError(
        f"{model_dir} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}), so runtime.offload: disk cannot "
        "stream it tensor by tensor (a .bin checkpoint is a pickle that loads whole); convert it once with "
        "from_pretrained(...).save_pretrained(dir) on a machine that can hold it, or use runtime.offload: cpu."
    )


def read_header(path: Path) -> tuple[int, dict]:
    """(header length, tensor entries) of one safetensors file, every entry checked against the file: a known dtype,
    a shape whose bytes match its offsets, data inside the file. UserInputError for a truncated or corrupt file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8)) if size >= 8 else (-1,)
            if not 0 < length <= size - 8:
                raise ValueError(f"its header length {length} does not fit a file of {size} bytes")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        header.pop("__metadata__", None)
        end = 0
        for name, entry in header.items():
            begin, stop = entry["data_offsets"]
            if entry["dtype"] not in _TORCH_DTYPES:
                raise ValueError(f"tensor {name!r} has the unknown dtype {entry['dtype']!r}")
            if not 0 <= begin <= stop or stop - begin != _nbytes(_TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"])):
                raise ValueError(f"tensor {name!r}'s offsets {entry['data_offsets']} do not match its shape")
            end = max(end, stop)
        if 8 + length + end > size:
            raise ValueError(f"the file ends at byte {size}, before its tensors' data ({8 + length + end} bytes)")
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as error:
        raise UserInputError(f"{path} is truncated or corrupt ({error}); {_SAVE_AGAIN}") from None
    return length, header


def check_checkpoint(model_dir: Path, expected: dict[str, tuple[int, ...]], required: set[str]) -> None:
    """Every safetensors file of the checkpoint whole (`read_header`), every tensor of the shape `expected` (what
    config.json describes, by state-dict name) says, and every name in `required` present (a streamed run reads
    each parameter itself; an in-memory load leaves transformers' renamings and tied weights to it). Headers
    only: no weight is read."""
    found: dict[str, tuple[int, ...]] = {}
    for filename in shard_files(model_dir):
        found.update({name: tuple(entry["shape"]) for name, entry in read_header(model_dir / filename)[1].items()})
    wrong = [
        f"{name} {found[name]} (config.json: {shape})"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    ]
    missing = sorted(name for name in required if name not in found)
    if wrong or missing:
        details = "; ".join(
            filter(
                None,
                [
                    f"shapes differ: {', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}" if wrong else "",
                    f"no tensor for {summarize_names(missing)}" if missing else "",
                ],
            )
        )
        raise UserInputError(
            f"the weights in {model_dir} do not match its config.json ({details}): the config or the shards belong "
            f"to another model. Put the checkpoint's own config.json beside its shards, or {_SAVE_AGAIN}"
        )


class ShardReader:
    """Lazy reader of a (sharded) safetensors checkpoint: headers up front, each tensor read when asked."""

    def __init__(self, model_dir: Path):
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for filename in shard_files(model_dir):
            path = model_dir / filename
            length, header = read_header(path)
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                self.entries[name] = (
                    path,
                    _TORCH_DTYPES[entry["dtype"]],
                    tuple(entry["shape"]),
                    8 + length + begin,
                    end - begin,
                )

    def specs(self) -> dict[str, TensorSpec]:
        return {name: (name, dtype, shape) for name, (_, dtype, shape, _, _) in self.entries.items()}

    def get_tensor(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, size = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if size else memoryview(b"")
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            got = 0
            while got < size:
                read = handle.readinto(buffer[got:])
                if not read:
                    raise OSError(f"{path}: file ends inside tensor {name!r} (truncated checkpoint?)")
                got += read
        return out


@dataclass
class _Shard:
    filename: str
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = field(default_factory=dict)
    size: int = 0
    data_start: int = 0
    fd: int | None = None
    pending: set[str] = field(default_factory=set)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[_Shard]:
    """Tensors in the given order; a new shard when the next tensor would overflow (a tensor larger than the
    limit gets a shard of its own)."""
    shards: list[_Shard] = []
    for name, dtype, shape in specs:
        size = _nbytes(dtype, shape)
        if not shards or (shards[-1].size and shards[-1].size + size > max_shard_bytes):
            shards.append(_Shard(filename=""))
        shard = shards[-1]
        shard.entries[name] = (dtype, tuple(shape), shard.size, shard.size + size)
        shard.size += size
        shard.pending.add(name)
    for number, shard in enumerate(shards, 1):
        shard.filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
    return shards


class ShardedWriter:
    """Write the tensors of a planned checkpoint one at a time into `directory`; `close()` checks that every
    tensor arrived and writes the index. As a context manager, an error leaves *.partial files and no index."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_bytes: int = 2 * 1024**3):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards = plan_shards(specs, max_shard_bytes)
        self.where = {name: shard for shard in self.shards for name in shard.entries}

    def pending(self) -> list[str]:
        return [name for shard in self.shards for name in shard.entries if name in shard.pending]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard = self.where[name]
        dtype, shape, begin, _ = shard.entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: got {tensor.dtype}{tuple(tensor.shape)}, planned {dtype}{shape}")
        if name not in shard.pending:
            raise ValueError(f"{name} written twice")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            if shard.fd is None:
                self._open(shard)
            view, offset = memoryview(data), shard.data_start + begin
            while view.nbytes:
                written = os.pwrite(shard.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as error:  # a full disk: name the shard (pwrite's error names no file)
            raise naming(error, self.directory / shard.filename) from error
        shard.pending.discard(name)
        if not shard.pending:
            self._finish(shard)

    def _open(self, shard: _Shard) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        for name, (dtype, shape, begin, end) in shard.entries.items():
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes with spaces
        shard.fd = os.open(self.directory / (shard.filename + ".partial"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(shard.fd, struct.pack("<Q", len(blob)) + blob)
        shard.data_start = 8 + len(blob)
        os.ftruncate(shard.fd, shard.data_start + shard.size)

    def _finish(self, shard: _Shard) -> None:
        os.fsync(shard.fd)
        os.close(shard.fd)
        shard.fd = None
        os.replace(self.directory / (shard.filename + ".partial"), self.directory / shard.filename)

    def close(self) -> None:
        missing = self.pending()
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[:3]}")
        index = {
            "metadata": {"total_size": sum(shard.size for shard in self.shards)},
            "weight_map": {name: shard.filename for shard in self.shards for name in shard.entries},
        }
        write_text_atomic(self.directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            for shard in self.shards:
                if shard.fd is not None:
                    os.close(shard.fd)
                    shard.fd = None
        return False
