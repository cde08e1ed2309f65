"""`blobs/<sha[:2]>/<sha>`: file contents stored once by sha256, written to a temp file under tmp/ and
renamed into place. Nothing here follows a link out of the zoo: links are listed (`links`) so that
`zoo verify` can report them, and skipped by every walk."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from st2si_cli.errors import ZooError
from st2si_cli.zoo.artifact import CHUNK, sha256_file
from st2si_cli.zoo.locks import tmp_prefix


def blob_path(root: Path, sha: str) -> Path:
    return root / "blobs" / sha[:2] / sha


def _place(root: Path, tmp: str | Path, sha: str) -> bool:
    """Rename a finished temp file to its blob path; False if the blob was there already."""
    final = blob_path(root, sha)
    final.parent.mkdir(exist_ok=True)
    if final.exists():
        os.unlink(tmp)
        return False
    os.replace(tmp, final)
    return True


def store_blob(root: Path, source: Path | bytes, move: bool = False) -> tuple[str, int, bool]:
    """Copy (or move, from under tmp/) a file or bytes into blobs/, atomically.
    Returns (sha256, size, whether this call wrote the blob file)."""
    tmp_dir = root / "tmp"
    if isinstance(source, (bytes, bytearray)):
        sha = hashlib.sha256(source).hexdigest()
        if blob_path(root, sha).exists():
            return sha, len(source), False
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=tmp_prefix("blob"))
        with removed_on_failure(tmp):
            with os.fdopen(fd, "wb") as f:
                f.write(source)
                f.flush()
                os.fsync(f.fileno())
            return sha, len(source), _place(root, tmp, sha)
    source = Path(source)
    size = source.stat().st_size
    if move and source.resolve().is_relative_to(tmp_dir.resolve()):
        sha = sha256_file(source)
        return sha, size, _place(root, source, sha)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=tmp_prefix("blob"))
    h = hashlib.sha256()
    with removed_on_failure(tmp):
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        sha = h.hexdigest()
        return sha, size, _place(root, tmp, sha)


def iter_blob_files(root: Path) -> Iterator[Path]:
    """The files under blobs/<xx>/; links (to folders or files) are not followed nor listed."""
    blobs = root / "blobs"
    if not blobs.is_dir() or blobs.is_symlink():
        return
    for sub in sorted(blobs.iterdir()):
        if sub.is_dir() and not sub.is_symlink():
            yield from sorted(p for p in sub.iterdir() if not p.is_symlink())


def links(root: Path) -> list[Path]:
    """Links inside the zoo that could lead out of it: anything under blobs/, manifests/ or tmp/ that
    is a link, and the zoo's own folders where they are links (views/ holds links by design)."""
    found = [root / sub for sub in ("blobs", "views", "tmp", "manifests") if (root / sub).is_symlink()]
    for sub in ("blobs", "manifests"):
        folder = root / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():
                found.append(entry)
            elif entry.is_dir():
                found += [p for p in sorted(entry.iterdir()) if p.is_symlink()]
    tmp = root / "tmp"
    if tmp.is_dir() and not tmp.is_symlink():
        found += [p for p in sorted(tmp.iterdir()) if p.is_symlink()]
    return found


@contextmanager
def removed_on_failure(path: str | Path) -> Iterator[None]:
    """Remove a temp file if the block that writes it fails (a full disk leaves nothing under tmp/)."""
    try:
        yield
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def write_error(root: Path, e: OSError) -> Exception:
    """A full disk as one line naming the zoo; any other OSError as it was."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ZooError(f"no space left on the device of the zoo at {root}: nothing was stored")
    return e
