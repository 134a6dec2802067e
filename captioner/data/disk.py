"""Disk space for a store's arrays, reserved before a byte of them is written.

`np.lib.format.open_memmap(mode="w+")` makes a sparse file: its blocks are allocated only as rows are
written, so a disk that fills up half-way kills the writer with SIGBUS and no word of why. Instead the
free space is checked for every array at once (one error naming the bytes needed and free), and each
file's blocks are then reserved with `posix_fallocate`, so writing its rows can no longer run out of
space. Nothing already on disk is touched when space is short.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np


class DiskFullError(OSError):
    """Not enough free space for a store: the message names the bytes needed and free."""


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB ({n:,} bytes)"


def array_bytes(dtype, shape: tuple[int, ...]) -> int:
    return int(np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64)))


def require_space(directory: Path, needed: int, what: str) -> None:
    """Raise DiskFullError unless the file system of `directory` has `needed` bytes free."""
    existing = Path(directory)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DiskFullError(
            errno.ENOSPC,
            f"{what} needs {_mib(needed)} but {existing} has {_mib(free)} free: free {_mib(needed - free)} "
            f"or point data.cache_dir at a larger disk; nothing already written was changed",
        )


def _reserve(path: Path) -> None:
    """Allocate every block of `path` now, so writes into its mapping cannot fail for lack of space."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"the disk filled up while reserving {_mib(os.fstat(fd).st_size)} for {path}") from None
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: the check above stands
            raise
    finally:
        os.close(fd)


def new_arrays(directory: Path, arrays: Mapping[str, tuple], what: str) -> dict[str, np.memmap]:
    """`{name: (dtype, shape)}` -> memory-mapped `directory/name.npy` files, created only once there is
    room for all of them, each with its blocks reserved; on a shortage none is left behind."""
    needed = sum(array_bytes(dtype, shape) + 4096 for dtype, shape in arrays.values())  # + each .npy header
    require_space(directory, needed, what)
    directory.mkdir(parents=True, exist_ok=True)
    created: dict[str, np.memmap] = {}
    try:
        for name, (dtype, shape) in arrays.items():
            path = directory / f"{name}.npy"
            created[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            _reserve(path)
    except DiskFullError:
        for name in list(created):
            del created[name]
            (directory / f"{name}.npy").unlink(missing_ok=True)
        raise
    return created
