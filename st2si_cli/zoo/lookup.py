"""Finding artifacts in the index: by name (per kind), full ID or ID prefix; listing, names, dependents.

`Zoo` (st2si_cli.zoo.store) is this plus what writes; the lookups only read the index (`self.db`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlite_utils

from st2si_cli.errors import ZooError
from st2si_cli.zoo.artifact import Artifact, input_ids

# The names table also records each domain's pinned default head (`st2si zoo default`): a row of this
# kind, named after the domain, pointing at the head. It is no name of the head: lookups by name and
# `names_of` leave such rows out (and manifests keep them, so a rebuilt index keeps the pin).
PIN_KIND = "default-head"


class Lookups:
    """The reading half of `Zoo`."""

    root: Path
    db: sqlite_utils.Database

    def _row_to_artifact(self, row: Mapping[str, Any]) -> Artifact:
        files = {r["name"]: r["blob"] for r in self.db["files"].rows_where("artifact = ?", [row["id"]])}
        names = self.names_of(row["id"])
        return Artifact(
            id=row["id"],
            kind=row["kind"],
            name=names[0] if names else None,
            domain=row["domain"],
            created=row["created"],
            size=row["size"],
            meta=json.loads(row["meta"]),
            files=files,
        )

    def _by_id(self, art_id: str) -> Artifact | None:
        row = next(self.db["artifacts"].rows_where("id = ?", [art_id]), None)
        return self._row_to_artifact(row) if row is not None else None

    def get(self, ref: str, kind: str | None = None) -> Artifact:
        """Find an artifact by name, full ID or unique ID prefix (>= 6 characters)."""
        art = self.find(ref, kind)
        if art is None:
            what = f"{kind} " if kind else ""
            others = sorted(
                {
                    k
                    for (k,) in self.db.execute(
                        "SELECT kind FROM names WHERE name = ? AND kind != ?", [ref, PIN_KIND]
                    )
                }
            )
            hint = f" (there is a {' and a '.join(others)} with that name)" if kind and others else ""
            raise ZooError(f"no {what}artifact named {ref!r} in the zoo at {self.root}{hint}")
        return art

    def find(self, ref: str, kind: str | None = None) -> Artifact | None:
        """Names are per kind: without `kind`, a name that several kinds use is ambiguous."""
        sql, args = "SELECT kind, artifact FROM names WHERE name = ? AND kind != ?", [ref, PIN_KIND]
        if kind:
            sql, args = sql + " AND kind = ?", [ref, PIN_KIND, kind]
        rows = self.db.execute(sql + " ORDER BY kind", args).fetchall()
        if len(rows) > 1:
            kinds = " and a ".join(k for k, _ in rows)
            raise ZooError(f"{ref!r} names a {kinds}: say which with --kind")
        if rows:
            art = self._by_id(rows[0][1])
            if art is not None:
                # Found by one of its names: it carries that one. Several names can hold one artifact
                # (a tuning run that kept its start stores the source's weights under a new name), and
                # what a command prints and names after it (`DOMAIN/BACKBONE`) is the name it was given.
                return dataclasses.replace(art, name=ref)
        if len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            id_rows = list(self.db["artifacts"].rows_where("id LIKE ?", [ref + "%"]))
            if kind:
                id_rows = [r for r in id_rows if r["kind"] == kind]
            if len(id_rows) == 1:
                return self._row_to_artifact(id_rows[0])
            if len(id_rows) > 1:
                raise ZooError(f"ID prefix {ref!r} is ambiguous ({len(id_rows)} artifacts)")
        return None

    def ls(self, kind: str | None = None, domain: str | None = None) -> list[Artifact]:
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if domain:
            where.append("domain = ?")
            args.append(domain)
        rows = self.db["artifacts"].rows_where(" AND ".join(where) or None, args, order_by="created desc, id")
        return [self._row_to_artifact(r) for r in rows]

    def names_of(self, art: Artifact | str) -> list[str]:
        """Every name that points at the artifact, most recently set first."""
        art_id = art if isinstance(art, str) else art.id
        rows = self.db["names"].rows_where(
            "artifact = ? AND kind != ?", [art_id, PIN_KIND], order_by="updated desc, name"
        )
        return [r["name"] for r in rows]

    def pinned_head(self, domain: str) -> Artifact | None:
        """The head pinned as `domain`'s default (`st2si zoo default`), if any and still in the zoo."""
        row = self.db.execute(
            "SELECT artifact FROM names WHERE kind = ? AND name = ?", [PIN_KIND, domain]
        ).fetchone()
        return self._by_id(row[0]) if row is not None else None

    def dependents(self, art: Artifact) -> list[Artifact]:
        """Artifacts whose meta["inputs"] lists this one's ID."""
        return [a for a in self.ls() if a.id != art.id and art.id in input_ids(a.meta)]

    def newest(self, kind: str, domain: str) -> Artifact | None:
        arts = self.ls(kind=kind, domain=domain)
        return arts[0] if arts else None

    def blobs_total_size(self) -> int:
        """Bytes that `verify` will read (the indexed size of every blob)."""
        return self.db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]

    def artifacts_using_blob(self, sha: str) -> list[str]:
        """IDs of the artifacts that list this blob, each once."""
        rows = self.db.execute("SELECT DISTINCT artifact FROM files WHERE blob = ? ORDER BY artifact", [sha])
        return [artifact for (artifact,) in rows.fetchall()]
