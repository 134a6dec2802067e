"""A cache directory's manifest: what was computed and how, written last, checked on every open.

The image feature store (features.py, extraction.py) and the caption store (text.py) both keep a
`manifest.json`; its presence means the store is complete, and a store whose manifest disagrees with
the settings asked for is refused with the list of differences rather than silently reused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

MANIFEST = "manifest.json"


class StaleStoreError(RuntimeError):
    """A store on disk was made with other settings or other images than the ones asked for."""


def plain(value):
    """A config value (OmegaConf containers, tuples, paths) as the JSON it is stored as."""

    def default(v):
        if isinstance(v, Mapping):
            return dict(v)
        return list(v) if isinstance(v, Sequence) and not isinstance(v, str) else str(v)

    return json.loads(json.dumps(value, default=default))


@contextmanager
def sole_writer(directory: Path, rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold it while a store is checked and written: a second run on the same store (jobs of a sweep
    side by side, on one machine or on nodes sharing the file system) waits, then reads what the first
    wrote, so a complete store is never written again.

    A distributed run takes the lock once, on rank 0, and its other ranks wait at `barrier` until rank 0
    holds it: the ranks then share the writing by barriers of their own (a lock per rank would deadlock
    at the first of them). Every rank reads the manifest only after that barrier, so all of them see
    the same state."""
    lock = None
    if rank == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(directory.parent / f".{directory.name}.lock")  # hidden, beside the store
        lock.acquire()
    try:
        if world_size > 1 and barrier is not None:
            barrier()
        yield
    finally:
        if lock is not None:
            lock.release()


class CompleteStoreError(RuntimeError):
    """A writer was about to create arrays over a store whose manifest says it is complete."""


def refuse_complete(directory: Path) -> None:
    """Called before any array of a store is created: a complete store is never rewritten."""
    if (Path(directory) / MANIFEST).exists():
        raise CompleteStoreError(
            f"store {directory} is already complete (it has a {MANIFEST}); refusing to write its arrays again. "
            f"Delete the directory to re-extract it."
        )


def write_json(path: Path, value) -> None:
    """Write-then-rename, so a kill never leaves a truncated JSON file in place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def differences(found: Mapping, wanted: Mapping) -> list[str]:
    """One phrase per key of `wanted` whose stored value differs."""
    out = []
    for key in wanted:
        if found.get(key) != wanted[key]:
            if key == "image_ids":
                out.append(f"image_ids ({len(found.get(key) or [])} stored vs {len(wanted[key])} wanted)")
            else:
                out.append(f"{key} (stored {found.get(key)!r} vs wanted {wanted[key]!r})")
    return out


def read_manifest(directory: Path) -> dict | None:
    """The complete store's manifest, or None while the store is absent or unfinished."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def check_manifest(directory: Path, wanted: Mapping, what: str, fix: str) -> None:
    """Refuse a complete store made with other settings: one message listing the differences."""
    found = read_manifest(directory)
    diff = differences(found or {}, wanted)
    if diff:
        raise StaleStoreError(f"{what} {directory} was made with other settings: {'; '.join(diff)}. {fix}")
