"""Zoo files that no longer decode: one `ZooError` naming the artifact and the file.

A blob is hashed again only when its size, mtime or inode changed (`integrity`), so bytes changed in
place slip past that check and surface when the file is decoded. `decoding` turns such a failure into
an error that names the artifact and its file and points at `st2si zoo verify --repair`, which hashes
every blob and drops the damaged artifacts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from st2si_cli.errors import St2siError, ZooError

# What decoding damaged bytes raises: JSONDecodeError and UnicodeDecodeError are ValueErrors; a key
# changed in place is a KeyError; a bracket run deeper than the recursion limit a RecursionError.
DECODE_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, RecursionError)


def corrupt_file(art: Any, fname: str, error: BaseException) -> ZooError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ZooError(
        f"{art.kind} {art.name or art.short_id} ({art.short_id}, file {fname}) does not decode "
        f"({type(error).__name__}: {reason}): it was changed in the zoo; run `st2si zoo verify --repair`"
    )


@contextmanager
def decoding(art: Any, fname: str, errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Within the block, a decode failure (DECODE_ERRORS, and `errors`) is a ZooError naming `fname` of
    `art`. Errors of st2si itself (already one line) pass through."""
    try:
        yield
    except St2siError:
        raise
    except (*DECODE_ERRORS, *errors) as e:
        raise corrupt_file(art, fname, e) from None


def changed_files(zoo: Any, art: Any) -> list[str]:
    """The artifact's files whose blobs no longer hash to their IDs (hashes them all: for error paths)."""
    from st2si_cli.zoo.artifact import sha256_file

    changed = []
    for fname, sha in sorted(art.files.items()):
        path = zoo.blob_path(sha)
        if path.is_file() and sha256_file(path) != sha:
            changed.append(fname)
    return changed
