"""Hugging Face hub downloads, through huggingface_hub's cache: dataset files for the corpus, model repositories for
sampling and evaluation. With HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) only the cache is read. Every failure
(network, missing file, cache miss) becomes one TinylmError line."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tinylm.errors import TinylmError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What tinylm reads from a model repository: configs, tokenizer and shard index (*.json), weights (only
# safetensors) and the card with its plot. Our exports hold exactly these, so their manifest still verifies.
MODEL_FILES = ["*.json", "*.safetensors", "*.md", "*.png"]


def cache_dir() -> str | None:
    """huggingface_hub reads its environment once, at import; read it again now so a later setting counts."""
    home = os.environ.get("HF_HOME")
    return os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else None)


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_repo_id(text: str) -> bool:
    """'owner/name', as the hub spells repository ids."""
    return _REPO_ID.fullmatch(text) is not None


def _one_line(what: str, exc: Exception, verb: str = "get") -> TinylmError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return TinylmError(f"cannot {verb} {what}{' (offline)' if offline() else ''}: {first}")


def dataset_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=filename, cache_dir=cache_dir(),
                                    local_files_only=offline()))
    except Exception as exc:  # network, missing file, offline cache miss: all one line for the user
        raise _one_line(f"{filename} from the Hugging Face dataset {repo_id}", exc) from None


def model_snapshot(repo_id: str) -> Path:
    """The local directory of a model repository's files that tinylm reads (MODEL_FILES), downloaded if needed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=MODEL_FILES, cache_dir=cache_dir(),
                                      local_files_only=offline()))
    except Exception as exc:  # as above
        raise _one_line(f"the Hugging Face model {repo_id}", exc) from None


def upload_model_folder(folder: Path, repo_id: str, message: str, private: bool = False, api=None) -> str:
    """Create the model repository (kept when it exists) and upload `folder` as one commit; returns its address.
    `api` is an HfApi or an object with its create_repo and upload_folder (made here when None)."""
    if offline():
        raise TinylmError(f"cannot upload to the Hugging Face model {repo_id}: HF_HUB_OFFLINE is set")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as exc:  # network, token, permissions: one line for the user
        raise _one_line(f"to the Hugging Face model {repo_id}", exc, verb="upload") from None
    return str(url)
