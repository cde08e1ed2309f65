"""The records `bench/tuning_summary.py` reads: GPU runs (`bench/gpu_real.py`) with their quality files,
`pretrain --json` outputs and top-K results, as one list of tuned models and the heads they started from."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import log
from bench.gpu_compare import _ranks, _sanitize
from bench.gpu_steps import ADAPT_STEPS, parse_variant

CHOICE = (
    "tuned: the row with the best validation NDCG@10 among those with figures whose best point is not their "
    "start; test NDCG@10 is reported, never used to choose"
)


@dataclass
class Head:
    """A head's validation and test NDCG@10, with its per-user test ranks where a quality file has them."""

    name: str
    valid: float | None
    test: float | None
    ranks: list[int] | None = None
    source: str | None = None


@dataclass
class Tried:
    """One row: what the summary file shows, plus the ranks of the model and of its start."""

    row: dict[str, Any]
    ranks: list[int] | None = None
    start: Head | None = None
    reference: Head | None = None  # the same machine's frozen ILP, for a run from random ILP rows


def _load(path: str | Path) -> dict[str, Any]:
    """A JSON file: one document, or the first line of a JSON-lines file (`st2si ... --json` output)."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError:
        return json.loads(text.splitlines()[0])


def quality_heads(quality: dict[str, Any], source: str) -> dict[str, Head]:
    """The st2si heads of a quality file by name, with their figures and per-user test ranks."""
    return {
        r["head"]: Head(
            r["head"], r["valid_metrics"].get("NDCG@10"), r["metrics"].get("NDCG@10"), _ranks(r), source
        )
        for r in quality["rows"]
        if r.get("source") == "st2si" and r.get("head")
    }


def find(heads: dict[str, Head], name: str | None, domain: str) -> Head | None:
    """A head by the name a command gave it, with or without its domain prefix."""
    if not name:
        return None
    short = name.removeprefix(f"{domain}/")
    for key in (name, short, f"{domain}/{short}"):
        if key in heads:
            return heads[key]
    return None


def pretrain_flags(command: str) -> dict[str, str]:
    """The options of a pretrain command line: `--lr 5e-05` -> {"lr": "5e-05"}, a bare flag -> ""."""
    argv = shlex.split(command)
    flags = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            flags[word[2:]] = "" if nxt.startswith("--") else nxt
    return flags


def method(flags: dict[str, str]) -> str:
    """What a pretrain command tuned, in words: `full tuning, dropout 0.1, lr 5e-05, from gpu-ilp`."""
    k = int(flags.get("tune-layers") or 0)
    what = "full tuning" if k == 0 else f"top-{k} tuning"
    if int(flags.get("lora") or 0):
        what = f"LoRA r={flags['lora']} on " + ("every layer" if k == 0 else f"the top {k} layers")
    parts = [what]
    if float(flags.get("dropout") or 0):
        parts.append(f"dropout {flags['dropout']}")
    if "lr" in flags:
        parts.append(f"lr {flags['lr']}")
    if flags.get("head-lr"):
        parts.append(f"ILP lr {flags['head-lr']}")
    for flag, words in (
        ("no-alignment", "histories only (no ID alignment)"),
        ("no-multi-query", "last query only"),
    ):
        if flag in flags:
            parts.append(words)
    if flags.get("valid-every"):
        parts.append(f"validated every {flags['valid-every']} steps")
    parts.append(f"from {flags['init-head']}" if flags.get("init-head") else "from random ILP rows")
    return ", ".join(parts)


def variant_flags(variant: Any) -> dict[str, str]:
    """The pretrain options a gpu_real.py step name stands for (a skipped step has no command)."""
    flags = {
        "tune-layers": str(variant.tune_layers),
        "lora": str(variant.lora),
        "dropout": str(variant.dropout),
    }
    if variant.lr is not None:
        flags["lr"] = str(variant.lr)
    if variant.head_lr is not None:
        flags["head-lr"] = str(variant.head_lr)
    if variant.init:
        flags["init-head"] = "the ilp step's head"
    return flags


def kept_start(record: dict[str, Any], init: str | None) -> bool:
    """Started from a head, and the point kept is that start (step 0; epoch 0 in records without steps)."""
    if not init:
        return False
    best = record.get("best_step")
    return (best if best is not None else record.get("best_epoch")) == 0


def start_valid_in_run(history: list[dict[str, Any]] | None) -> float | None:
    first = (history or [{}])[0]
    return first.get("valid_NDCG@10") if first.get("epoch") == 0 else None


def start_row(head: Head | None, relation: str) -> dict[str, Any] | None:
    if head is None:
        return None
    return {
        "head": head.name,
        "valid_ndcg10": head.valid,
        "test_ndcg10": head.test,
        "relation": relation,
        "figures_from": head.source,
    }


class Records:
    """The records given, read into rows."""

    def __init__(self, baseline: dict[str, Any], baseline_file: str):
        self.domain = baseline["domain"]
        self.dataset = baseline["dataset"]
        self.cpu_heads = quality_heads(baseline, Path(baseline_file).name)
        self.gpu_heads: list[dict[str, Head]] = []  # per GPU record: its ILP steps' and quality heads
        self.tried: list[Tried] = []
        self.files = [baseline_file]  # every file read, for the summary's `sources`

    def check(self, what: str, domain: str | None, dataset_id: str | None = None) -> None:
        if domain is not None and domain != self.domain:
            raise SystemExit(f"{what} is about {domain}, the baseline about {self.domain}: no summary")
        if dataset_id is not None and dataset_id != self.dataset["id"]:
            raise SystemExit(
                f"{what} is of dataset {dataset_id[:12]}, the baseline of {self.dataset['id'][:12]}: no summary"
            )

    def add_gpu(self, path: str, quality_path: str | None) -> None:
        record = json.loads(Path(path).read_text())
        self.files.append(path)
        self.check(path, record.get("domain"))
        for s in record["steps"]:
            if s.get("step") == "prepare" and s.get("output"):
                self.check(path, None, s["output"][0].get("id"))
        if quality_path is None:
            named = [s["result_file"] for s in record["steps"] if s.get("result_file")]
            beside = Path(path).parent / named[-1] if named else None
            if beside is not None and beside.exists():
                quality_path = str(beside)
            elif named:
                log(f"{path}: its quality file {named[-1]} is not beside it; no per-user ranks from it")
        ranked: dict[str, Head] = {}
        if quality_path:
            quality = json.loads(Path(quality_path).read_text())
            self.check(quality_path, quality.get("domain"), quality["dataset"]["id"])
            ranked = quality_heads(quality, Path(quality_path).name)
            self.files.append(quality_path)
        gpu = record["environment"].get("gpu") or f"device {record.get('device')}"
        paths = record.get("paths")
        heads: dict[str, Head] = {}  # the ILP steps' heads, by name
        reference = None  # the ilp step's
        for s in record["steps"]:
            if s.get("step") in ADAPT_STEPS and s.get("returncode") == 0 and s.get("output"):
                o = s["output"][0]
                head = find(ranked, o["head"], self.domain) or Head(
                    o["head"],
                    o["valid"].get("NDCG@10"),
                    o["metrics"].get("NDCG@10"),
                    None,
                    "its adapt record",
                )
                heads[o["head"]] = head
                if s["step"] == "ilp":
                    reference = head
        self.gpu_heads.append({**ranked, **heads})
        records = {}
        for s in record["steps"]:
            if s.get("step", "").endswith("-record") and s.get("output") and "metrics" in s["output"][0]:
                records.setdefault(s["step"].removesuffix("-record"), s["output"][0])
        for s in record["steps"]:
            step = s.get("step", "")
            if step.endswith("-record") or step in ADAPT_STEPS or step in ("pull", "prepare", "quality"):
                continue
            try:
                variant = parse_variant(step)
            except ValueError:
                continue
            if variant is None:
                continue
            command = _sanitize(s.get("command", ""), paths)
            flags = pretrain_flags(command) if command else variant_flags(variant)
            init = (s.get("variant") or {}).get("init_head") or flags.get("init-head")
            start = find(heads, init, self.domain) or find(ranked, init, self.domain)
            name = s.get("head") or f"{self.domain}/{variant.name}"
            model = find(ranked, name, self.domain) if s.get("returncode") == 0 else None
            if not command:  # skipped: no head to start from, or no time
                init = None
            self.tried.append(
                tried(
                    head=name,
                    what=method(flags),
                    device=gpu,
                    command=command,
                    status=_status(s),
                    record=records.get(step) if s.get("returncode") == 0 else None,
                    model=model,
                    start=start,
                    init=init,
                    reference=reference,
                    seconds=s.get("seconds"),
                    source=Path(path).name,
                    step=step,
                )
            )

    def add_run(self, path: str, command: str, device: str | None) -> None:
        o = _load(path)
        self.check(path, o.get("domain"))
        self.files.append(path)
        flags = pretrain_flags(command)
        init = flags.get("init-head")
        start = None
        for heads in [*self.gpu_heads, self.cpu_heads]:  # the first record given that has it
            start = find(heads, init, self.domain)
            if start:
                break
        record = {
            "metrics": {"valid": o.get("valid", {}), "test": o.get("metrics", {})},
            **{k: o.get(k) for k in ("best_epoch", "best_step", "stopped_by", "history", "timings")},
        }
        self.tried.append(
            tried(
                head=o.get("head"),
                what=method(flags),
                device=device or flags.get("device") or None,
                command=command,
                status="ok",
                record=record,
                start=start,
                init=init,
                seconds=(o.get("timings") or {}).get("total_seconds"),
                source=Path(path).name,
            )
        )

    def add_top(self, path: str) -> None:
        t = json.loads(Path(path).read_text())
        self.check(path, t.get("domain"))
        self.files.append(path)
        child = t.get("child") or {}
        flags = pretrain_flags(child.get("command", ""))
        init = flags.get("init-head") or (t.get("init_heads") or [None])[0]
        start = find(self.cpu_heads, init, self.domain)
        if start is None and init:
            known = [h for h in t.get("init_head_metrics") or [] if h.get("name") == init]
            if known:
                ranks = known[0].get("test_ranks")
                start = Head(
                    init,
                    known[0].get("valid_ndcg10"),
                    known[0].get("ndcg10"),
                    _ranks(known[0], "test_ranks") if ranks else None,
                    Path(path).name,
                )
        model = None
        if (t.get("ranks") or {}).get("test"):  # the run's own per-user ranks (its final evaluation)
            model = Head(
                (t.get("run") or {}).get("backbone") or "",
                (t.get("valid") or {}).get("NDCG@10"),
                (t.get("test") or {}).get("ndcg10"),
                _ranks(t["ranks"], "test"),
                Path(path).name,
            )
        record = {
            "metrics": {
                "valid": t.get("valid", {}),
                "test": {"NDCG@10": (t.get("test") or {}).get("ndcg10")},
            },
            "timings": {"train_seconds": t.get("train_seconds")},
            **{k: t[k] for k in ("best_epoch", "best_step", "stopped_by", "history") if k in t},
        }
        self.tried.append(
            tried(
                head=(t.get("run") or {}).get("backbone"),
                what=method(flags),
                device=f"{t.get('cpu', 'CPU')} ({t.get('cores')} cores)",
                command=t.get("command", ""),
                status="ok"
                if child.get("returncode", 0) == 0
                else f"failed (exit {child.get('returncode')})",
                record=record,
                model=model,
                start=start,
                init=init,
                seconds=child.get("wall_s"),
                source=Path(path).name,
                pretrain_command=child.get("command"),
            )
        )


def tried(
    *,
    head: str | None,
    what: str,
    device: str | None,
    command: str,
    status: str,
    record: dict[str, Any] | None,
    model: Head | None = None,
    start: Head | None = None,
    init: str | None = None,
    reference: Head | None = None,
    seconds: float | None = None,
    **extra: Any,
) -> Tried:
    """One row from a pretrain run's record (None: it failed or was skipped); its figures come from the
    per-user ranks of `model` where a quality file has them, else from the record."""
    record = record or {}
    metrics = record.get("metrics") or {}
    if model is not None:
        valid, test, figures = model.valid, model.test, f"per-user ranks ({model.source})"
    else:
        valid = (metrics.get("valid") or {}).get("NDCG@10")
        test = (metrics.get("test") or {}).get("NDCG@10")
        figures = "its run record" if record else None
    if start is None and init:
        start = Head(init, None, None, None, "not in the files given")
    row = {
        "method": what,
        "device": device,
        "command": command,
        "status": status,
        "head": head,
        "valid_ndcg10": valid,
        "test_ndcg10": test,
        "figures_from": figures,
        "best_epoch": record.get("best_epoch"),
        "best_step": record.get("best_step"),
        "stopped_by": record.get("stopped_by"),
        "kept_start": kept_start(record, init) if record else None,
        "seconds": seconds,
        "train_seconds": (record.get("timings") or {}).get("train_seconds"),
        "start": start_row(start, "--init-head") if init else None,
        "start_valid_in_run": start_valid_in_run(record.get("history")),
        **extra,
    }
    return Tried(row, model.ranks if model else None, start if init else None, reference)


def _status(step: dict[str, Any]) -> str:
    if "skipped" in step:
        return f"skipped: {step['skipped']}"
    rc = step.get("returncode")
    return "ok" if rc == 0 else f"failed (exit {rc})"
