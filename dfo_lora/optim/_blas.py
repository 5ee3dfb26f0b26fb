"""Run a block with numpy's OpenBLAS limited to one thread.

Why (measured on the 2-core project machine, numpy 2.4 / scipy-openblas 0.3.31):
- pycma's eigendecompositions and matrix products give bitwise DIFFERENT results with 1
  and 2 OpenBLAS threads (full CMA-ES, dim 300, 80 generations), so a run, and the replay
  that restores its state, would depend on OMP_NUM_THREADS / OPENBLAS_NUM_THREADS (Ray
  sets OMP_NUM_THREADS=1 in its workers). With the count pinned, it does not.
- A 500 x 500 `eigh` took 34 ms on 1 thread and 300 ms on 2 threads of a busy 2-core
  machine; full CMA-ES at dim 500 ran ~25x slower with the default thread count.
  Matrices of this size gain little from threads anyway.

numpy does not expose the thread count, so this finds the OpenBLAS library numpy loaded
(numpy's wheels bundle `scipy_openblas`) and calls its `*_set_num_threads` through
ctypes, which is what threadpoolctl does. Where no OpenBLAS is found (MKL, Accelerate, a
numpy built differently) it does nothing, and `pinned()` says so. Not thread-safe: another
Python thread using BLAS during the block runs single-threaded too.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

_SYMBOLS = (  # (get, set) pairs, scipy-openblas wheels first
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)

_UNSET = object()
_functions: object = _UNSET  # cached (get, set) or None


def _candidate_paths() -> list[str]:
    paths: list[str] = []
    try:  # libraries this process has loaded (Linux)
        with open("/proc/self/maps") as maps:
            paths += re.findall(r"(/\S*openblas\S*\.(?:so|dylib)[\w.]*)", maps.read())
    except OSError:
        pass
    numpy_dir = os.path.dirname(np.__file__)
    for pattern in (
        os.path.join(os.path.dirname(numpy_dir), "numpy.libs", "*openblas*"),  # Linux wheels
        os.path.join(numpy_dir, ".dylibs", "*openblas*"),  # macOS wheels
    ):
        paths += sorted(glob.glob(pattern))
    return list(dict.fromkeys(paths))


def _find() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    global _functions
    if _functions is _UNSET:
        _functions = None
        for path in _candidate_paths():
            try:
                lib = ctypes.CDLL(path)  # already loaded by numpy: the same handle
            except OSError:
                continue
            for get_name, set_name in _SYMBOLS:
                if hasattr(lib, get_name) and hasattr(lib, set_name):
                    get, set_ = getattr(lib, get_name), getattr(lib, set_name)
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    _functions = (get, set_)
                    break
            if _functions is not None:
                break
    return _functions  # type: ignore[return-value]


def pinned() -> bool:
    """Whether `single_thread()` can actually pin the thread count here."""
    return _find() is not None


def current_threads() -> int | None:
    """numpy's OpenBLAS thread count, None when unknown."""
    fns = _find()
    return None if fns is None else int(fns[0]())


@contextmanager
def single_thread() -> Iterator[None]:
    """numpy's OpenBLAS on one thread inside the block, the previous count restored after."""
    fns = _find()
    if fns is None:
        yield
        return
    get, set_ = fns
    before = int(get())
    if before == 1:
        yield
        return
    set_(1)
    try:
        yield
    finally:
        set_(before)
