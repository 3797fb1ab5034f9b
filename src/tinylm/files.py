"""Atomic writes and checksums: a reader never finds a half-written file where a complete one should be.

Files are written to a temporary name in the same directory, flushed to disk, then renamed into place (rename is
atomic on POSIX). Directories are built under a temporary name and renamed the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import TinylmError


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _default_mode(directory: bool) -> int:
    """What open()/mkdir() would give (mkstemp/mkdtemp make private 0600/0700 files, which would surprise users)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _default_mode(directory=False))
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (an old one is removed only then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise TinylmError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _default_mode(directory=True))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(directory: str | Path, name: str = "manifest.json", extra: dict[str, Any] | None = None) -> None:
    """Record the size and sha256 of every file in `directory` (written last, so its presence means complete)."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != name
    }
    atomic_write_json(directory / name, {"files": files, **(extra or {})})


def verify_manifest(directory: str | Path, name: str = "manifest.json") -> dict[str, Any]:
    """Check every file the manifest names: present, same size, same sha256. Raises TinylmError naming the bad file."""
    directory = Path(directory)
    manifest_path = directory / name
    if not manifest_path.is_file():
        raise TinylmError(f"{directory}: no {name} (incomplete or not written by tinylm)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise TinylmError(f"{manifest_path}: corrupted manifest ({exc})") from None
    for rel, expected in files.items():
        file = directory / rel
        if not file.is_file():
            raise TinylmError(f"{file}: missing (listed in {name})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise TinylmError(f"{file}: truncated or altered ({size} bytes, expected {expected['bytes']})")
        if sha256_file(file) != expected["sha256"]:
            raise TinylmError(f"{file}: checksum mismatch (corrupted)")
    return manifest
