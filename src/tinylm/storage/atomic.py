"""Atomic writes and checksums: a reader never finds a half-written file where a complete one should be.

Files are written to a temporary name in the same directory, flushed to disk, then renamed into place (rename is
atomic on POSIX). Directories are built under a temporary name and renamed the same way.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tinylm.errors import TinylmError


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
def _writing(path: Path) -> Iterator[None]:
    """Our own file-system steps failing (a parent that is a file, no permission, a full disk) is one clear line."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise TinylmError(f"cannot write {path}: {exc.strerror or exc}{where}") from None


def make_dir(path: Path) -> None:
    """`mkdir -p` for an output directory; a file in its place, or no permission, is one clear line."""
    if path.exists() and not path.is_dir():
        raise TinylmError(f"cannot write {path}: it exists and is not a directory")
    with _writing(path):
        path.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed onto `path`."""
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise TinylmError(f"cannot write {path}: it is a directory")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, _default_mode(directory=False))
    try:
        with _writing(path):  # a full disk while the block writes is one clear line too
            yield tmp
        with _writing(path):
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in ONE atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _RENAMEAT2
    if _RENAMEAT2 is None:
        try:
            import ctypes

            _RENAMEAT2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", False)
        except OSError:
            _RENAMEAT2 = False
    if not _RENAMEAT2:
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel or a file system without it
    raise OSError(err, os.strerror(err), str(b))


_RENAMEAT2 = None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clean_leftovers(path: Path) -> None:
    """A writer killed mid-way leaves its hidden temporary directory (`.NAME.XXXX.tmp`) and, on systems without
    an atomic exchange, possibly the previous version as `.NAME.old`: put that back, drop the rest (and the remains
    of any deletion in the same folder)."""
    old = path.parent / f".{path.name}.old"
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        _remove(stale)
    for stale in path.parent.glob(".*.deleting"):  # any deletion cut short (see remove_directory)
        _remove(stale)
    if old.exists():
        _remove(old)


def manifest_kind(directory: Path) -> str | None:
    """What a directory tinylm wrote holds (a checkpoint, token shards, an export), as its manifest records it;
    None when the manifest does not say (written before kinds were recorded) or cannot be read."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    kind = manifest.get("kind", manifest.get("format")) if isinstance(manifest, dict) else None
    return kind if isinstance(kind, str) else None


def check_replaceable(path: Path, kind: str | None = None) -> None:
    """Only a directory tinylm wrote (it has a manifest.json) or an empty one is ever replaced: `--out ~` must not
    delete a home directory. With `kind`, a directory holding another kind of output (a run's checkpoint or token
    shards given as an export's --out) is refused too."""
    if not path.is_dir():
        raise TinylmError(f"{path} exists and is not a directory: refusing to replace it")
    if any(path.iterdir()) and not (path / MANIFEST_NAME).is_file():
        raise TinylmError(f"{path} exists and was not written by tinylm (no {MANIFEST_NAME}): refusing to replace "
                          "it; choose another directory or empty this one")
    held = manifest_kind(path) if kind is not None else None
    if held is not None and held != kind:
        raise TinylmError(f"{path} holds another kind of tinylm output ({held}, not {kind}): refusing to replace it; "
                          "choose another directory")


@contextlib.contextmanager
def atomic_directory(path: str | Path, replace: bool = True, manifest: bool = True,
                     kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`.

    At every instant `path` holds either the complete old version or the complete new one: the two are swapped in
    one atomic exchange where the system has it (Linux), otherwise the old one is moved aside only for the moment
    between two renames (and put back by the next write if a crash falls there). With `manifest`, a manifest.json
    is written last when the block has not written one, so every such directory can be verified. `kind` (what
    the directory holds) goes in that manifest, and an existing `path` holding another kind is never replaced.
    Every file follows the umask (some writers create theirs private), so an export can be shared as written."""
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(path)
        if path.exists():
            if not replace:
                raise TinylmError(f"{path} already exists")
            check_replaceable(path, kind)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, _default_mode(directory=True))
    try:
        with _writing(path):
            yield tmp
        with _writing(path):
            if manifest and not (tmp / MANIFEST_NAME).exists():
                write_manifest(tmp, extra={"kind": kind} if kind else None)
            for file in tmp.rglob("*"):
                if file.is_file():
                    os.chmod(file, _default_mode(directory=False))
                    with open(file, "rb+") as handle:
                        os.fsync(handle.fileno())
            _fsync_directory(tmp)
            if path.exists() and _exchange(tmp, path):
                _fsync_directory(path.parent)  # tmp now holds the old version, removed below
            else:
                old = None
                if path.exists():
                    old = path.parent / f".{path.name}.old"
                    os.replace(path, old)
                os.replace(tmp, path)
                _fsync_directory(path.parent)
                if old is not None:
                    _remove(old)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def remove_directory(path: str | Path) -> None:
    """Delete a directory so that no reader ever sees it half-deleted: renamed to a hidden name first."""
    path = Path(path)
    if not path.exists():
        return
    with _writing(path):
        doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".deleting", dir=path.parent))
        os.replace(path, doomed / path.name)
        _fsync_directory(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


MANIFEST_NAME = "manifest.json"
# The manifest's own checksum: its sizes, hashes and metadata are covered too. (A manifest without one, from before
# it existed, is still read: a damaged key name alone leaves everything it would protect intact.)
SELF_KEY = "manifest_sha256"


def _manifest_digest(body: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != SELF_KEY}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_manifest(directory: str | Path, name: str = MANIFEST_NAME, extra: dict[str, Any] | None = None) -> None:
    """Record the size and sha256 of every file in `directory` (written last, so its presence means complete)."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != name
    }
    body = {**(extra or {}), "files": files}
    body.pop(SELF_KEY, None)
    atomic_write_json(directory / name, {**body, SELF_KEY: _manifest_digest(body)})


def _manifest_entries(manifest: Any) -> dict[str, tuple[int, str]]:
    """{relative path: (bytes, sha256)}, or ValueError for anything else (an edited or damaged manifest)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("no files table")
    if SELF_KEY in manifest and manifest[SELF_KEY] != _manifest_digest(manifest):
        raise ValueError("its own checksum does not match")
    entries = {}
    for rel, item in manifest["files"].items():
        if not (isinstance(item, dict) and isinstance(item.get("bytes"), int) and isinstance(item.get("sha256"), str)):
            raise ValueError(f"bad entry for {rel!r}")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"entry {rel!r} points outside the directory")
        entries[rel] = (item["bytes"], item["sha256"])
    return entries


def verify_manifest(directory: str | Path, name: str = MANIFEST_NAME,
                    only: Iterable[str] | None = None) -> dict[str, Any]:
    """Check every file the manifest names (or those of them in `only`): present, same size, same sha256.
    Raises TinylmError naming the bad file."""
    directory = Path(directory)
    manifest_path = directory / name
    if not manifest_path.is_file():
        raise TinylmError(f"{directory}: no {name} (incomplete or not written by tinylm)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = _manifest_entries(manifest)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise TinylmError(f"{manifest_path}: corrupted manifest ({exc})") from None
    if only is not None:
        wanted = set(only)
        unlisted = sorted(wanted - set(files))
        if unlisted:
            raise TinylmError(f"{directory / unlisted[0]}: not listed in {manifest_path} (not written by tinylm?)")
        files = {rel: files[rel] for rel in files if rel in wanted}
    for rel, (expected_size, expected_sha) in files.items():
        file = directory / rel
        if not file.is_file():
            raise TinylmError(f"{file}: missing (listed in {name})")
        size = file.stat().st_size
        if size != expected_size:
            raise TinylmError(f"{file}: truncated or altered ({size} bytes, expected {expected_size})")
        if sha256_file(file) != expected_sha:
            raise TinylmError(f"{file}: checksum mismatch (corrupted)")
    return manifest
