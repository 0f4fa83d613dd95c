"""The ``"cuda"`` backend: loader for the CUDA C++ extension built from ``csrc/``.

The extension is optional. ``is_available()`` says whether it loads here, and
``unavailable_reason()`` says in one line why not.
"""

from __future__ import annotations

from functools import lru_cache

import torch


class BuildError(RuntimeError):
    """The CUDA extension could not be built or loaded."""


@lru_cache(maxsize=None)
def _load():
    """(module or None, reason). Never raises."""
    if not torch.cuda.is_available():
        return None, "no CUDA device visible to torch"
    try:
        from . import _C  # built by CMakeLists.txt or the in-place build
    except ImportError as err:
        return None, f"the extension sba_kernels._C is not built ({err})"
    return _C, ""


def is_available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1] or "available"
