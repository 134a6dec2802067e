"""Scratch directories for files a checkpoint carries (tokenizer files, a rebuilt encoder): private to the user.

A shared `/tmp/captioner-*` directory would let any other user of the machine plant a file under the
name the next load looks for (a vocabulary that changes every caption, a TorchScript file that runs
code). Each user gets `<tmp>/captioner-<uid>/<name>`, created 0700 and refused when another user owns
it or others can write to it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def private_dir(name: str) -> Path:
    """`<tmp>/captioner-<uid>/<name>`, made if needed, owned by this user and writable by no one else."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    root = Path(tempfile.gettempdir()) / f"captioner-{uid}"
    root.mkdir(mode=0o700, exist_ok=True)
    info = root.lstat()
    if stat.S_ISLNK(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != uid) or info.st_mode & 0o022:
        raise PermissionError(f"{root} is not a private directory of this user (owner {info.st_uid}, mode "
                              f"{stat.filemode(info.st_mode)}): remove it, or set TMPDIR to a directory of your own")
    directory = root / name
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory
