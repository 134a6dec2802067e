"""An export directory as a Hugging Face Hub model repo: resolve a repo id to files, push a folder.

    Captioner.from_pretrained("user/repo")                       # huggingface_hub's snapshot_download
    python -m captioner.export ckpt=last.ckpt push_to_hub=user/repo   # HfApi.create_repo + upload_folder

The repo holds exactly what `python -m captioner.export` writes (model.safetensors, config.json,
tokenizer/, README.md, and onnx/ when exported), so a download is an export directory. Downloads go
through huggingface_hub's cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) and honour
HF_HUB_OFFLINE=1: offline, a repo already in the cache loads and any other fails with one line.
"""

from __future__ import annotations

import re
from pathlib import Path

# owner/name as the Hub spells repo ids (huggingface_hub.utils.validate_repo_id's characters)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(spec: str | Path) -> bool:
    """`user/repo` that is not a path on this machine (a local file or folder always wins)."""
    text = str(spec)
    return bool(REPO_ID.match(text)) and not Path(text).expanduser().exists() and not text.endswith((".ckpt", ".pt"))


def resolve(spec: str | Path, revision: str | None = None) -> Path:
    """A local path as is; a repo id -> the local snapshot folder of that repo (downloaded when allowed)."""
    if not is_repo_id(spec):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=str(spec), revision=revision))
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{spec} is neither a local path nor a Hub repo in the cache, and the Hub cannot be reached"
            f" (HF_HUB_OFFLINE, HF_HUB_CACHE): pass an export directory or a .ckpt, or download the repo where there is internet"
        ) from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"{spec}: no such Hub model repo (or it is private: log in with `hf auth login`)") from error


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` (if absent) and upload `folder` to it in one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not an export directory (config.json + model.safetensors): run captioner.export first")
    if not REPO_ID.match(repo_id):
        raise ValueError(f"push_to_hub={repo_id!r} is not a repo id: use user/name")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=f"captioner export of {folder.name}")
    return str(getattr(commit, "commit_url", commit))
