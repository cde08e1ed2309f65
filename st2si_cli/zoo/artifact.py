"""What the zoo stores and returns: artifacts, removal plans, verify reports, and the file helpers
they share (sha256 of a file, canonical JSON, atomic safetensors writes)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st2si_cli.zoo.meta import Inputs

CHUNK = 1 << 20


def sha256_file(path: Path, on_chunk: Callable[[int], Any] | None = None) -> str:
    """The file's sha256; `on_chunk(n_bytes)` after each chunk read (for progress bars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return h.hexdigest()


def is_sha256(value: Any) -> bool:
    """Whether `value` is a full sha256 in hex, the form of every artifact ID and blob name."""
    return isinstance(value, str) and len(value) == 64 and not value.strip("0123456789abcdef")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_safetensors_atomic(tensors: dict[str, Any], path: Path) -> None:
    """Write tensors as safetensors to a temp file beside `path`, then rename it into place."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@dataclass
class Artifact:
    id: str
    kind: str
    name: str | None
    domain: str | None
    created: float
    size: int
    meta: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # file name -> blob sha256

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "domain": self.domain,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "size": self.size,
            "files": self.files,
            "meta": self.meta,
        }


@dataclass
class RemovalPlan:
    artifact: Artifact
    names: list[str]
    blobs: list[tuple[str, int]]  # blobs no other artifact uses: (sha256, size)
    dependents: list[Artifact]  # artifacts whose meta lists this one as an input

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.blobs)


@dataclass
class VerifyReport:
    checked: int
    mismatched: list[str]  # blob sha256s whose bytes no longer hash to their name
    missing: list[str]  # blobs in the index with no file
    orphans: list[str]  # files under blobs/ that no artifact references
    broken_views: list[str] = field(default_factory=list)  # folders under views/ that need rebuilding
    links: list[str] = field(default_factory=list)  # links that could lead out of the zoo (never followed)
    dangling: list[tuple[str, str]] = field(default_factory=list)  # (artifact, input it lists that is gone)
    unindexed: list[str] = field(default_factory=list)  # artifacts with a manifest but no index rows
    bad_manifests: list[str] = field(default_factory=list)  # manifest files that cannot be read
    unmanifested: list[str] = field(default_factory=list)  # indexed artifacts without a manifest

    @property
    def ok(self) -> bool:
        return not (
            self.mismatched
            or self.missing
            or self.broken_views
            or self.links
            or self.dangling
            or self.unindexed
            or self.bad_manifests
            or self.unmanifested
        )


def input_ids(meta: Mapping[str, Any]) -> set[str]:
    """IDs in meta["inputs"], whatever its shape (see `meta.Inputs`)."""
    return set(Inputs.of(meta.get("inputs")).ids())
