"""The decode kernels of activation sparsity: y = W x reading only the weight columns of the inputs kept.

Two backends compute the same thing:
- `cpp`: sparse_decode.cpp, compiled on first use with torch.utils.cpp_extension (once per machine, cached by
  torch under ~/.cache/torch_extensions, tagged with the CPU's vector capability), when a C++ compiler and
  ninja are present. Kept columns are contiguous rows of W^T, read eight at a time with the next ones prefetched.
- `dense`: the masked dense computation `W (x * (|x| > t))`, which reads every column. What runs when no
  compiler is present (or the build fails): measured on this CPU, torch's own gathers (embedding_bag,
  index_select + mm, torch.compile of either) did not beat dense at the sparsities that keep quality
  (benchmarks/RESULTS.md, `activation`), so there is no third backend.

The wrappers (prune.methods.activation.layers) call `threshold_linear` / `threshold_ffn` only for calls of at
most `max_tokens` tokens (decode); prefill always runs masked dense. `use_backend` forces one backend (tests, the
benchmark).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("sparse_decode.cpp")
BUILD_FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]
Backend = Literal["cpp", "dense"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernel serves (others run masked dense)

log = logging.getLogger(__name__)
_state: dict[str, object] = {"loaded": None, "forced": None}  # loaded: the built backend (None: not tried yet)
_ops: dict[str, object] = {}  # the loaded operators, looked up once (torch.ops attribute lookups cost per call)


def _build() -> Backend:
    """Compile and load sparse_decode.cpp; `dense` (with one log line saying why) when that is impossible."""
    from torch.utils import cpp_extension  # imported here: it loads setuptools (0.4 s), needed only to build

    if shutil.which("c++") is None or not cpp_extension.is_ninja_available():
        log.warning("activation sparsity: no C++ compiler or ninja found; decode runs the masked dense path")
        return "dense"
    name = f"maskprune_sparse_decode_{torch.backends.cpu.get_cpu_capability().lower()}"
    try:
        log.info("activation sparsity: compiling the sparse decode kernel (once per machine, ~20 s)")
        library = cpp_extension.load(name, [str(SOURCE)], extra_cflags=BUILD_FLAGS, is_python_module=False)
    except (RuntimeError, OSError, ImportError) as error:
        log.warning("activation sparsity: the sparse decode kernel did not build (%s); decode runs masked dense", error)
        return "dense"
    if not hasattr(torch.ops.maskprune_sparse_decode, "threshold_linear"):
        torch.ops.load_library(library)
    _ops["linear"] = torch.ops.maskprune_sparse_decode.threshold_linear.default
    _ops["ffn"] = torch.ops.maskprune_sparse_decode.threshold_ffn.default
    return "cpp"


def backend() -> Backend:
    """The backend decode calls use: the forced one, else `cpp` when it builds, else `dense`."""
    if _state["forced"] is not None:
        return _state["forced"]
    if _state["loaded"] is None:
        _state["loaded"] = _build()
    return _state["loaded"]


@contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Run decode calls through `name` inside the block (`cpp` is built first and must build)."""
    if name == "cpp" and (_state["loaded"] or _build()) != "cpp":
        raise RuntimeError("the sparse decode kernel cannot be built on this machine (no compiler or ninja)")
    if name == "cpp":
        _state["loaded"] = "cpp"
    previous, _state["forced"] = _state["forced"], name
    try:
        yield
    finally:
        _state["forced"] = previous


def masked(x: Tensor, cut: Tensor) -> Tensor:
    """x with every entry whose magnitude is at or below its cut (float32 [width], compared in float32) zeroed."""
    return x * (x.abs() > cut)


def threshold_linear(x: Tensor, columns: Tensor, cut: Tensor, bias: Tensor | None) -> Tensor:
    """masked(x, cut) @ columns (+ bias) for x [rows, in] and columns = W^T [in, out] contiguous, reading only
    the rows of `columns` some row of x keeps."""
    return _ops["linear"](x, columns, cut, bias)


def threshold_ffn(
    x: Tensor,
    act: Tensor,
    cut: Tensor,
    up: Tensor,
    up_bias: Tensor | None,
    down_columns: Tensor,
    down_bias: Tensor | None,
) -> Tensor:
    """A gated FFN's down(masked(act, cut) * up(x)), with act = act_fn(gate(x)) [rows, inter] given,
    up [inter, hidden] as stored and down_columns = W_down^T [inter, hidden]: up and down run only for the
    neurons some row keeps (CATS)."""
    return _ops["ffn"](x, act, cut, up, up_bias, down_columns, down_bias)
