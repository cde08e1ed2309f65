"""`st2si zoo rm`, `zoo verify` and `zoo prune`: the commands that check the store and free space.

The logic lives in `st2si_cli.zoo.maintenance`; each command plans first and prints the plan (stdout),
and asks (stderr) or needs `--yes` before it deletes anything. `cli/app.py` registers them under `st2si zoo`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import typer

from st2si_cli.cli.options import open_zoo
from st2si_cli.cli.output import err, human_size, make_progress, out, print_json
from st2si_cli.errors import St2siError

if TYPE_CHECKING:  # the store pulls in sqlite-utils: imported only when a command runs
    from st2si_cli.zoo.maintenance import PrunePlan
    from st2si_cli.zoo.store import Artifact, RemovalPlan, VerifyReport, Zoo

JSON_HELP = "Print JSON on stdout instead of a table."
YES_HELP = "Do not ask for confirmation (required when stdin is not a terminal)."


def _label(art: Artifact) -> str:
    """`kind name (short id)`, or `kind short id` for an unnamed artifact."""
    return f"{art.kind} {art.name} ({art.short_id})" if art.name else f"{art.kind} {art.short_id}"


def _brief(art: Artifact) -> dict[str, Any]:
    return {"id": art.id, "kind": art.kind, "name": art.name}


def _confirm_or_refuse(what: str, dry_run: bool, yes: bool) -> None:
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if not (dry_run or yes or interactive):
        raise St2siError(
            f"refusing to {what} without --yes: stdin is not a terminal (see the plan with --dry-run)"
        )


# ---- rm --------------------------------------------------------------------------------------------
def _plan_dict(zoo: Zoo, plan: RemovalPlan) -> dict[str, Any]:
    art = plan.artifact
    return {
        **_brief(art),
        "names": plan.names,
        "size": art.size,
        "files": len(art.files),
        "blobs_freed": [{"sha256": sha, "size": size} for sha, size in plan.blobs],
        "blobs_kept": len(set(art.files.values())) - len(plan.blobs),
        "bytes_freed": plan.bytes_freed,
        "dependents": [_brief(d) for d in plan.dependents],
    }


def _print_plan(plan: RemovalPlan, dry_run: bool) -> None:
    art = plan.artifact
    verb = "Would remove" if dry_run else "Will remove"
    kept = len(set(art.files.values())) - len(plan.blobs)
    out.print(f"{verb} {_label(art)}: {len(art.files)} file(s)", markup=False, soft_wrap=True)
    out.print(f"  names dropped: {', '.join(plan.names) or '(none)'}", markup=False, soft_wrap=True)
    freed = f"  frees {human_size(plan.bytes_freed)} in {len(plan.blobs)} blob(s)"
    if kept:
        freed += f"; {kept} blob(s) shared with other artifacts are kept"
    out.print(freed, markup=False, soft_wrap=True)


def _warn_dependents(plan: RemovalPlan, force: bool) -> None:
    if not plan.dependents:
        return
    tail = "and would be left with a dangling input" if force else "(rm refuses without --force)"
    err.print(
        f"Warning: {len(plan.dependents)} artifact(s) list {_label(plan.artifact)} as an input {tail}:",
        markup=False,
        soft_wrap=True,
    )
    for d in plan.dependents:
        err.print(f"  {_label(d)}", markup=False, soft_wrap=True)


def rm_cmd(
    ref: str = typer.Argument(
        ..., metavar="NAME|ID", help="A name, a full ID or a unique ID prefix (6+ characters)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed and change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help=YES_HELP),
    force: bool = typer.Option(
        False, "--force", help="Remove it even though other artifacts list it as an input."
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="The kind of the named artifact, where kinds share a name."
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove an artifact, its names and the blobs no other artifact uses (planned first, then done).

    An artifact that others list as an input (a dataset or backbone with heads) is kept unless --force.
    """
    zoo = open_zoo(create=False)
    from st2si_cli.zoo.maintenance import plan_rm

    plan = plan_rm(zoo, ref, kind)
    _confirm_or_refuse(f"remove {_label(plan.artifact)}", dry_run, yes)
    result = _plan_dict(zoo, plan)
    if plan.dependents and not (force or dry_run):
        users = ", ".join(_label(d) for d in plan.dependents)
        raise St2siError(
            f"{_label(plan.artifact)} is an input of {users}: remove those first, or pass --force"
        )
    if not as_json:
        _print_plan(plan, dry_run)
    _warn_dependents(plan, force)
    if dry_run:
        if as_json:
            print_json({**result, "dry_run": True, "removed": False})
        return
    if not yes and not typer.confirm(f"Remove {_label(plan.artifact)}?", default=False, err=True):
        err.print("Nothing removed.", markup=False)
        raise typer.Exit(1)
    from st2si_cli.zoo.maintenance import execute_rm

    freed = execute_rm(zoo, plan, force=force)
    freed_set = set(freed)
    bytes_freed = sum(size for sha, size in plan.blobs if sha in freed_set)
    if as_json:
        print_json({**result, "bytes_freed": bytes_freed, "dry_run": False, "removed": True})
    else:
        out.print(
            f"Removed {_label(plan.artifact)}: freed {human_size(bytes_freed)}.", markup=False, soft_wrap=True
        )


# ---- verify ----------------------------------------------------------------------------------------
def _verify_dict(zoo: Zoo, report: VerifyReport) -> dict[str, Any]:
    def users(sha: str) -> list[dict[str, Any]]:
        return [_brief(zoo.get(a)) for a in sorted(set(zoo.artifacts_using_blob(sha)))]

    def blob(sha: str) -> dict[str, Any]:
        return {"sha256": sha, "path": str(zoo.blob_path(sha)), "artifacts": users(sha)}

    return {
        "root": str(zoo.root),
        "checked": report.checked,
        "ok": report.ok,
        "mismatched": [blob(sha) for sha in report.mismatched],
        "missing": [blob(sha) for sha in report.missing],
        "orphans": [{"sha256": name, "path": str(zoo.blob_path(name))} for name in report.orphans],
        "broken_views": [str(zoo.root / "views" / name) for name in report.broken_views],
        "links": report.links,
        "dangling_inputs": [{"artifact": _brief(zoo.get(a)), "input": ref} for a, ref in report.dangling],
        "unindexed_manifests": report.unindexed,
        "bad_manifests": report.bad_manifests,
        "missing_manifests": report.unmanifested,
    }


def _run_verify(zoo: Zoo) -> VerifyReport:
    total = zoo.blobs_total_size()
    with make_progress() as progress:
        task = progress.add_task("Verifying blobs", total=total, rate="")

        def advance(n: int) -> None:
            speed = progress.tasks[task].speed
            progress.update(task, advance=n, rate=f"{human_size(speed)}/s" if speed else "")

        from st2si_cli.zoo.maintenance import verify

        return verify(zoo, progress=advance)


def verify_cmd(
    repair: bool = typer.Option(
        False,
        "--repair",
        help="Rebuild a lost or damaged index from the artifacts' manifests; re-register artifacts the "
        "index lost; drop those whose blobs are corrupted or missing or whose inputs are gone (and say "
        "how to make each again); rebuild broken views. Links are reported, never removed.",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Re-hash every blob and check the views; report changed and missing blobs and broken views (exit 1)
    and orphan files (a warning; `st2si zoo prune` removes them)."""
    from st2si_cli.zoo.store import DamagedIndexError

    try:
        zoo = open_zoo(create=False)
    except DamagedIndexError as e:
        if not repair:
            raise
        _rebuild(e, as_json)
        zoo = open_zoo(create=False)
    if not zoo.exists:
        raise St2siError(f"there is no zoo at {zoo.root}")
    report = _run_verify(zoo)
    result = _verify_dict(zoo, report)
    if repair and not report.ok:
        _repair(zoo, report, result, as_json)
        return
    if as_json:
        print_json(result)
    else:
        for path in result["broken_views"]:
            out.print(f"BROKEN VIEW  {path}", markup=False, soft_wrap=True)
        for path in report.links:
            out.print(f"LINK  {path}  (never followed; move it away)", markup=False, soft_wrap=True)
        for d in result["dangling_inputs"]:
            a = d["artifact"]
            out.print(
                f"DANGLING INPUT  {a['kind']} {a['name'] or a['id'][:12]} lists {d['input'][:12]}, "
                "which is no longer in the zoo",
                markup=False,
                soft_wrap=True,
            )
        for art_id in report.unindexed:
            out.print(f"UNINDEXED  artifact {art_id[:12]} has a manifest but no index rows", markup=False)
        for path in report.bad_manifests:
            out.print(f"BAD MANIFEST  {path}", markup=False, soft_wrap=True)
        if report.unmanifested:
            out.print(f"MISSING MANIFESTS  {len(report.unmanifested)} artifact(s)", markup=False)
        for problem, key in (("MISMATCH", "mismatched"), ("MISSING", "missing")):
            for b in result[key]:
                used_by = (
                    ", ".join(f"{a['kind']} {a['name'] or a['id'][:12]}" for a in b["artifacts"])
                    or "no artifact"
                )
                out.print(f"{problem}  {b['sha256']}  used by {used_by}", markup=False, soft_wrap=True)
        status = "OK" if report.ok else "FAILED"
        out.print(
            f"{status}: checked {report.checked} blob(s) ({human_size(zoo.blobs_total_size())}): "
            f"{len(report.mismatched)} mismatched, {len(report.missing)} missing, "
            f"{len(report.broken_views)} broken view(s), {len(report.links)} link(s), "
            f"{len(report.dangling)} dangling input(s), {len(report.unindexed) + len(report.bad_manifests)} "
            "manifest problem(s).",
            markup=False,
            soft_wrap=True,
        )
        if not report.ok:
            err.print(
                "Run `st2si zoo verify --repair` to drop the damaged artifacts and re-register lost ones"
                + ("; links are never removed: move them away by hand." if report.links else "."),
                markup=False,
            )
    if report.orphans:
        err.print(
            f"Warning: {len(report.orphans)} orphan file(s) under {zoo.root / 'blobs'} that no artifact uses "
            "(left by an interrupted put or rm; `st2si zoo prune` removes them):",
            markup=False,
            soft_wrap=True,
        )
        for name in report.orphans:
            err.print(f"  {zoo.blob_path(name)}", markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def _rebuild(e: Exception, as_json: bool) -> None:
    """A new index from the manifests of a zoo whose index is missing, empty or damaged."""
    from st2si_cli.zoo.maintenance import rebuild_index

    root = e.root  # type: ignore[attr-defined]
    err.print(f"{e}", markup=False, soft_wrap=True)
    rebuilt = rebuild_index(root)
    for path, why in rebuilt.skipped:
        err.print(f"Skipped {path}: {why}", markup=False, soft_wrap=True)
    moved = f"; the old index is kept as {rebuilt.moved_aside}" if rebuilt.moved_aside else ""
    err.print(
        f"Rebuilt the index of {root} from {len(rebuilt.registered)} manifest(s){moved}.",
        markup=False,
        soft_wrap=True,
    )


def _repair(zoo: Zoo, report: VerifyReport, result: dict[str, Any], as_json: bool) -> None:
    from st2si_cli.zoo.maintenance import repair

    dropped = repair(zoo, report)
    if as_json:
        rows = [{**_brief(a), "rebuild": hint} for a, hint in dropped]
        print_json({**result, "repaired": not report.links, "dropped": rows})
        if report.links:
            raise typer.Exit(1)
        return
    for art, hint in dropped:
        out.print(f"Dropped {_label(art)}: make it again with: {hint}", markup=False, soft_wrap=True)
    if report.broken_views:
        out.print(
            f"Removed {len(report.broken_views)} broken view(s); they are rebuilt on use.", markup=False
        )
    if report.links:
        err.print(
            f"Not repaired: {len(report.links)} link(s) inside the zoo; move them away by hand.",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    out.print(f"Repaired: the zoo at {zoo.root} is consistent again.", markup=False, soft_wrap=True)


# ---- prune -----------------------------------------------------------------------------------------
def _prune_dict(plan: PrunePlan) -> dict[str, Any]:
    def rows(items: Any) -> list[dict[str, Any]]:
        return [{"path": str(i.path), "size": i.size, "reason": i.reason} for i in items]

    return {"remove": rows(plan.remove), "kept": rows(plan.kept), "bytes": plan.bytes_freed}


def prune_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be removed and change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help=YES_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove orphan blobs and leftovers under tmp/ of runs that have ended (planned first, then done).

    Work of a live process (its PID in the name, or a lock it holds) is kept.
    """
    from st2si_cli.zoo.maintenance import execute_prune, plan_prune

    zoo = open_zoo(create=False)
    plan = plan_prune(zoo)
    if plan.remove:
        _confirm_or_refuse("prune", dry_run, yes)
    result = _prune_dict(plan)
    if not as_json:
        verb = "Would remove" if dry_run else "Will remove"
        out.print(f"{verb} {len(plan.remove)} item(s), {human_size(plan.bytes_freed)}:", markup=False)
        for i in plan.remove:
            out.print(f"  {i.path}  {human_size(i.size)}  ({i.reason})", markup=False, soft_wrap=True)
        for i in plan.kept:
            err.print(f"Keeping {i.path}: a running process uses it.", markup=False, soft_wrap=True)
    if dry_run or not plan.remove:
        if as_json:
            print_json({**result, "dry_run": dry_run, "bytes_freed": 0})
        return
    if not yes and not typer.confirm("Remove them?", default=False, err=True):
        err.print("Nothing removed.", markup=False)
        raise typer.Exit(1)
    freed = execute_prune(zoo, plan)
    if as_json:
        print_json({**result, "dry_run": False, "bytes_freed": freed})
    else:
        out.print(f"Pruned: freed {human_size(freed)} ({freed:,} bytes).", markup=False)
