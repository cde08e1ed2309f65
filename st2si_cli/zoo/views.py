"""`views/<artifact id>/`: folders of relative links to an artifact's blobs, for loaders that want a
directory (`from_pretrained`). Relative links keep working when the zoo is moved or copied; a view
whose links are missing, absolute or dangling is rebuilt on use and reported by `zoo verify`."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from st2si_cli.zoo.locks import tmp_prefix


def link_target(root: Path, fname: str, sha: str) -> str:
    """The relative link from `views/<id>/<fname>` to `blobs/<sha[:2]>/<sha>`."""
    depth = len(Path(fname).parts)  # the link's folder is views/<id>/<dirs of fname>
    return os.path.join(*([".."] * (depth + 1)), "blobs", sha[:2], sha)


def view_is_sound(root: Path, folder: Path, files: Mapping[str, str]) -> bool:
    """Every file is a relative link to its blob, and the blob is there."""
    for fname, sha in files.items():
        link = folder / fname
        if not link.is_symlink() or os.readlink(link) != link_target(root, fname, sha) or not link.exists():
            return False
    return True


def build_view(root: Path, art_id: str, files: Mapping[str, str]) -> Path:
    """The artifact's view, made (or remade) with relative links; safe against other processes."""
    target = root / "views" / art_id
    if target.is_dir() and view_is_sound(root, target, files):
        return target
    tmp = Path(tempfile.mkdtemp(dir=root / "tmp", prefix=tmp_prefix("view")))
    for fname, sha in files.items():
        dest = tmp / fname
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(link_target(root, fname, sha), dest)
    if target.is_dir() and view_is_sound(root, target, files):
        # another process made it while this one built its own: keep theirs (moving a sound view
        # aside would pull it from under a loader reading it, e.g. the other rank of a torchrun job)
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    if target.exists():  # unsound: move it aside first (a non-empty folder cannot be replaced)
        old = Path(tempfile.mkdtemp(dir=root / "tmp", prefix=tmp_prefix("oldview")))
        try:
            os.replace(target, old / "v")
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def broken_views(root: Path, artifacts: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Names of the folders under views/ that are not a sound view of an indexed artifact."""
    bad = []
    for folder in sorted((root / "views").iterdir()):
        files = artifacts.get(folder.name)
        if files is None or not folder.is_dir() or not view_is_sound(root, folder, files):
            bad.append(folder.name)
    return bad


def build_private_view(root: Path, art_id: str, files: Mapping[str, str]) -> Path:
    """The artifact's view where views/ may not be written (a read-only zoo): the sound one if it is
    there, else a folder of absolute links outside the zoo, removed when the process ends."""
    target = root / "views" / art_id
    if target.is_dir() and view_is_sound(root, target, files):
        return target
    folder = Path(tempfile.mkdtemp(prefix=f"st2si-view-{art_id[:12]}-"))
    atexit.register(shutil.rmtree, folder, True)
    blobs = root.resolve() / "blobs"
    for fname, sha in files.items():
        dest = folder / fname
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(blobs / sha[:2] / sha, dest)
    return folder
