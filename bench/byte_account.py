"""Bytes that Triton kernels load and store, counted in Triton's CPU interpreter.

    with ByteCounter() as counted:        # TRITON_INTERPRET=1 set before triton is imported
        o = sba_kernels.intra_attention(q, k, v, partition, backend="triton")
    counted.launches                      # one `Launch` per kernel launch, in launch order

Every memory access of an interpreted kernel reaches one of four methods of the interpreter's
builder (`triton.runtime.interpreter.interpreter_builder`, one instance per process):

* ``create_masked_load`` / ``create_masked_store``: ``tl.load`` / ``tl.store`` with a mask, and
  without one (``create_load`` / ``create_store`` call them with an all-true mask); tensor
  descriptor loads and stores (the mask is the descriptor's bounds, so a TMA tile that hangs
  off the tensor counts only its in-bounds part), descriptor gathers and scatters (row by
  row), and atomic loads and stores;
* ``create_atomic_rmw`` (masked) and ``create_atomic_cas`` (every element): each element read
  and written once.

The counter wraps these on the builder instance, so every path into them counts once, and wraps
``GridExecutor.__call__`` (one call per launch) to open a `Launch` named after the kernel. An
access adds (elements whose mask is true) x (element size) to the kernel argument whose memory
holds each address (the first in argument order when arguments overlap), or to ``"(other)"``.
Block pointers (``tl.make_block_ptr``) need no hook: triton 3.9 removed them (they raise
NotImplementedError); tensor descriptors replace them.

What is counted is what the kernel asks for, element by element: bytes by construction, not
DRAM traffic. A GPU moves whole 32-byte sectors and may serve a re-read from L2, so a gathered
row of a few bytes costs more there and a re-read tile may cost less.

``ByteCounter(run=False)`` launches nothing: each launch is recorded with its kernel name and
program count only, so the grid of a full-size problem can be read without running it.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch
import triton
from triton.runtime import interpreter
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["ByteCounter", "Launch", "by_kernel"]

OTHER = "(other)"


@dataclass
class Launch:
    """One kernel launch: its programs and the bytes it read and wrote, per kernel argument."""

    kernel: str
    programs: int = 0
    read: Counter = field(default_factory=Counter)        # argument name -> bytes
    written: Counter = field(default_factory=Counter)

    def __add__(self, other: "Launch") -> "Launch":
        return Launch(self.kernel, self.programs + other.programs, self.read + other.read,
                      self.written + other.written)

    def __mul__(self, count: int) -> "Launch":
        """``count`` copies of this launch's traffic (programs too)."""
        return Launch(self.kernel, self.programs * count, Counter({a: b * count for a, b in self.read.items()}),
                      Counter({a: b * count for a, b in self.written.items()}))


def by_kernel(launches: Iterable[Launch]) -> dict[str, Launch]:
    """Launches of the same kernel summed, in order of first launch."""
    out: dict[str, Launch] = {}
    for launch in launches:
        # `launch * 1`: a copy, so later sums never change a launch the caller holds
        out[launch.kernel] = out[launch.kernel] + launch if launch.kernel in out else launch * 1
    return out


def _memory_ranges(fn, args: tuple, kwargs: dict) -> list[tuple[str, int, int]]:
    """``(argument name, first byte, end byte)`` of every tensor argument of a launch, in
    argument order; a tensor descriptor's range is its base tensor's."""
    ranges = []
    for name, value in inspect.getcallargs(fn, *args, **kwargs).items():
        if isinstance(value, TensorDescriptor):
            value = value.base
        if isinstance(value, torch.Tensor) and value.numel():
            span = sum((size - 1) * stride for size, stride in zip(value.shape, value.stride())) + 1
            ranges.append((name, value.data_ptr(), value.data_ptr() + span * value.element_size()))
    return ranges


def _element_bytes(ptrs) -> int:
    """Bytes of one element behind a pointer handle (an int1 is stored in one byte)."""
    return (ptrs.get_element_ty().primitive_bitwidth + 7) // 8


class ByteCounter:
    """While active (a context manager), records every interpreted Triton launch in
    ``launches``. Needs ``TRITON_INTERPRET=1`` (kernels on CPU tensors); not thread-safe."""

    HOOKS = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")

    def __init__(self, run: bool = True):
        self.run = run
        self.launches: list[Launch] = []
        self._ranges: list[tuple[str, int, int]] = []
        self._saved_call = None

    # ------------------------------------------------------------------ tallies
    def _tally(self, side: str, ptrs, mask: Optional[np.ndarray]) -> None:
        """Add the bytes at the addresses of ``ptrs`` where ``mask`` holds to ``side``
        (``"read"`` / ``"written"``) of the running launch, per argument."""
        addresses = ptrs.data.ravel() if mask is None else ptrs.data[np.broadcast_to(mask, ptrs.data.shape)]
        size = _element_bytes(ptrs)
        tally = getattr(self.launches[-1], side)
        left = np.ones(addresses.shape, dtype=bool)
        for name, start, end in self._ranges:
            inside = left & (addresses >= start) & (addresses < end)
            if inside.any():
                tally[name] += int(inside.sum()) * size
                left &= ~inside
        if left.any():
            tally[OTHER] += int(left.sum()) * size

    def _wrap_builder(self, builder) -> None:
        load, store = builder.create_masked_load, builder.create_masked_store
        rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

        def masked_load(ptrs, mask, *args, **kwargs):
            self._tally("read", ptrs, mask.data)
            return load(ptrs, mask, *args, **kwargs)

        def masked_store(ptrs, value, mask, *args, **kwargs):
            self._tally("written", ptrs, mask.data)
            return store(ptrs, value, mask, *args, **kwargs)

        def atomic_rmw(op, ptrs, value, mask, *args, **kwargs):
            self._tally("read", ptrs, mask.data)
            self._tally("written", ptrs, mask.data)
            return rmw(op, ptrs, value, mask, *args, **kwargs)

        def atomic_cas(ptrs, *args, **kwargs):
            self._tally("read", ptrs, None)
            self._tally("written", ptrs, None)
            return cas(ptrs, *args, **kwargs)

        for name, hook in zip(self.HOOKS, (masked_load, masked_store, atomic_rmw, atomic_cas)):
            setattr(builder, name, hook)       # on the instance: shadows the class's method

    # ------------------------------------------------------------------ launches
    def _wrap_launches(self) -> None:
        original = self._saved_call = interpreter.GridExecutor.__call__
        counter = self

        def call(executor, *args, **kwargs):
            # GridExecutor drops keywords the kernel does not take (num_warps, ...); so do we.
            params = inspect.signature(executor.fn).parameters
            kwargs = {k: v for k, v in kwargs.items() if k in params}
            counter.launches.append(Launch(executor.fn.__name__))
            counter._ranges = _memory_ranges(executor.fn, args, kwargs)
            if counter.run:
                return original(executor, *args, **kwargs)      # set_grid_dim records the programs
            grid = executor.grid
            grid = grid(inspect.getcallargs(executor.fn, *args, **kwargs)) if callable(grid) else grid
            counter.launches[-1].programs = int(np.prod(grid))

        interpreter.GridExecutor.__call__ = call

    def _record_grid(self, builder) -> None:
        set_grid_dim = builder.set_grid_dim

        def recorded(nx, ny, nz):
            self.launches[-1].programs = nx * ny * nz
            return set_grid_dim(nx, ny, nz)

        builder.set_grid_dim = recorded

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "ByteCounter":
        if not triton.knobs.runtime.interpret:
            raise RuntimeError("ByteCounter counts interpreted launches: "
                               "set TRITON_INTERPRET=1 before importing triton")
        builder = interpreter.interpreter_builder
        missing = [name for name in self.HOOKS + ("set_grid_dim",) if not hasattr(builder, name)]
        if missing or not hasattr(interpreter, "GridExecutor"):
            raise RuntimeError(f"triton {triton.__version__}'s interpreter lacks {missing or 'GridExecutor'}: "
                               "the byte counter's hooks need updating")
        if any(name in vars(builder) for name in self.HOOKS):
            raise RuntimeError("a ByteCounter is already active")
        self._wrap_builder(builder)
        self._record_grid(builder)
        self._wrap_launches()
        return self

    def __exit__(self, *exc) -> None:
        builder = interpreter.interpreter_builder
        for name in self.HOOKS + ("set_grid_dim",):
            delattr(builder, name)                 # the class's method shows through again
        interpreter.GridExecutor.__call__ = self._saved_call
