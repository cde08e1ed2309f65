"""GPU variant: seconds per instance and peak GPU memory for forward, recommend and full-tuning steps.

    python -m bench.gpu                          # on a CUDA device: SmolLM2-135M's architecture, bf16
    python -m bench.gpu --zoo ZOO                # take the architecture from the zoo's smollm2-135m config.json
    python -m bench.gpu --device cpu --tiny      # smoke test anywhere (a tiny Llama, CPU)

A randomly initialised Llama with SmolLM2-135M's architecture (hidden 576, 30 layers, 9 heads, 3 KV heads,
intermediate 1536, vocab 49152; weights do not change the timing) and a synthetic ILP over 4,344 items
(amazon-scientific's catalog). Each history is --seq-len tokens with a query token every --query-every
tokens. At each batch size (default 1 and 256):

- forward:    the backbone alone, bf16 weights, inference mode;
- recommend:  forward + ILP logits at the last query + top-10, bf16 weights (the paper's inference row);
- train step: full tuning, fp32 master weights under bf16 autocast: forward, ILP cross-entropy at every
              query position, backward, AdamW step (an out-of-memory is reported, not fatal).

Reported: seconds per batch (median of --repeats after --warmup), seconds per instance, instances/s, and
peak GPU memory (torch.cuda.max_memory_allocated, weights included). The row to beat is the paper's
Table 7: opt-125m on a V100, batch 1, 0.02 s per instance, 0.97 GB. Writes JSON and a markdown table to
`<out>/<date>-<machine>-gpu-<device>[-tag].{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, format_table, load_average, log, provenance, result_path, write_json

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json, the fields that shape compute
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
PAPER_TABLE7 = {
    "model": "opt-125m",
    "device": "V100",
    "batch": 1,
    "seconds_per_instance": 0.02,
    "memory_gb": 0.97,
}
N_ITEMS = 4344  # amazon-scientific


def zoo_config(zoo_path: str | None, backbone: str) -> tuple[dict[str, Any] | None, str]:
    """The backbone's config.json from the zoo (read only), or None."""
    try:
        from st2si_cli import Zoo

        zoo = Zoo(zoo_path)
        art = zoo.find(backbone, kind="backbone")
        if art is None or "config.json" not in art.files:
            return None, f"no backbone {backbone!r} in the zoo at {zoo.root}"
        return json.loads(zoo.file(art, "config.json").read_text()), f"zoo {zoo.root}: {backbone} config.json"
    except Exception as e:  # the bench must also run where st2si or its zoo is absent
        return None, f"zoo not readable ({type(e).__name__}: {e})"


def build_config(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    from transformers import LlamaConfig

    if args.tiny:
        fields, source = dict(TINY), "tiny smoke-test architecture"
    else:
        fields, source = dict(SMOLLM2_135M), "SmolLM2-135M architecture (built-in numbers)"
        real, where = zoo_config(args.zoo, args.backbone) if args.zoo is not None else (None, "")
        if real is not None:
            if real.get("model_type") != "llama":
                raise SystemExit(
                    f"{where}: model_type {real.get('model_type')!r}, this bench builds Llama models"
                )
            diffs = {
                k: (v, real[k])
                for k, v in SMOLLM2_135M.items()
                if k in real
                and not (real[k] == v or isinstance(v, float) and math.isclose(real[k], v, rel_tol=1e-6))
            }
            if diffs:
                log(f"zoo config differs from the built-in numbers: {diffs}; using the zoo's")
            fields.update({k: real[k] for k in SMOLLM2_135M if k in real})
            source = where
        elif args.zoo is not None:
            log(f"{where}; using the built-in SmolLM2-135M numbers")
    cfg = LlamaConfig(**fields, attention_dropout=0.0)
    return cfg, fields, source


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Any, device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Median seconds per call and peak GPU memory (bytes) over the timed calls."""
    import torch

    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times), "seconds_min": min(times), "repeats": repeats}
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    return out


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (default where present), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama (smoke test, e.g. with --device cpu)")
    ap.add_argument("--zoo", default=None, help="read the backbone's config.json from this zoo (read only)")
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=N_ITEMS, help="ILP size (catalog items)")
    ap.add_argument(
        "--seq-len", type=int, default=None, help="tokens per history (default 256; 64 with --tiny)"
    )
    ap.add_argument(
        "--query-every", type=int, default=25, help="a query token every this many tokens (~ one item)"
    )
    ap.add_argument("--batch-sizes", default="1,256")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--modes", default="forward,recommend,train", help="which of forward, recommend, train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()

    import torch
    from transformers import LlamaModel

    if args.device is None:
        if not torch.cuda.is_available():
            print(
                "No CUDA device here. Run on a GPU machine, or smoke-test with: python -m bench.gpu --device cpu --tiny",
                file=sys.stderr,
            )
            return 2
        args.device = "cuda"
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    seq_len = args.seq_len or (64 if args.tiny else 256)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    t_start = time.time()
    prov = provenance()
    cfg, fields, source = build_config(args)
    device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({prov['cpu']})"
    log(f"{device_name}: {source}, {args.items} items, {seq_len} tokens per history")

    qpos = torch.arange(args.query_every - 1, seq_len, args.query_every)  # query positions in every history
    if qpos.numel() == 0:
        qpos = torch.tensor([seq_len - 1])
    gen = torch.Generator().manual_seed(args.seed)
    results: list[dict[str, Any]] = []

    def inputs(batch: int) -> tuple[Any, Any]:
        ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device)
        targets = torch.randint(0, args.items, (batch, qpos.numel()), generator=gen).to(device)
        return ids, targets

    # Inference: bf16 weights.
    if {"forward", "recommend"} & set(modes):
        torch.manual_seed(args.seed)
        model = LlamaModel(cfg).to(device=device, dtype=torch.bfloat16).eval()
        ilp = (torch.randn(args.items, cfg.hidden_size, generator=gen) * 0.02).to(
            device=device, dtype=torch.bfloat16
        )
        n_params = sum(p.numel() for p in model.parameters())
        last = qpos[-1].item()
        for batch in batch_sizes:
            ids, _ = inputs(batch)
            if "forward" in modes:

                def fwd(ids: Any = ids) -> None:
                    with torch.inference_mode():
                        model(input_ids=ids, use_cache=False)

                results.append(run_mode("forward", batch, fwd, device, args))
            if "recommend" in modes:

                def rec(ids: Any = ids) -> None:
                    with torch.inference_mode():
                        h = model(input_ids=ids, use_cache=False).last_hidden_state[:, last]
                        (h @ ilp.T).float().topk(10, dim=1)

                results.append(run_mode("recommend", batch, rec, device, args))
        del model, ilp
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    # Full tuning: fp32 master weights, bf16 autocast, AdamW over backbone + ILP.
    if "train" in modes:
        torch.manual_seed(args.seed)
        model = LlamaModel(cfg).to(device).train()
        ilp = torch.nn.Linear(cfg.hidden_size, args.items, bias=False).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW([*model.parameters(), *ilp.parameters()], lr=5e-5, weight_decay=0.0)
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        qp = qpos.to(device)
        for batch in batch_sizes:
            ids, targets = inputs(batch)

            def step(ids: Any = ids, targets: Any = targets) -> None:
                with torch.autocast(dev_type, dtype=torch.bfloat16):
                    h = model(input_ids=ids, use_cache=False).last_hidden_state[:, qp]  # [B, Q, d]
                    logits = ilp(h).float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.items), targets.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            results.append(run_mode("train step", batch, step, device, args))
        del model, ilp, opt

    paper = PAPER_TABLE7
    for r in results:
        if r["mode"] == "recommend" and r["batch"] == 1 and r.get("seconds_per_instance"):
            r["vs_paper_table7"] = {
                "time_ratio": r["seconds_per_instance"] / paper["seconds_per_instance"],
                "memory_ratio": (r["peak_memory_gb"] / paper["memory_gb"])
                if r.get("peak_memory_gb") is not None
                else None,
            }
    rows = [
        [
            r["mode"],
            r["batch"],
            r.get("seconds"),
            r.get("seconds_per_instance"),
            r.get("instances_per_s"),
            r.get("peak_memory_gb"),
            r.get("note", ""),
        ]
        for r in results
    ]
    rows.append(
        [
            "paper Table 7: opt-125m, V100, inference",
            1,
            None,
            paper["seconds_per_instance"],
            None,
            paper["memory_gb"],
            "the row to beat",
        ]
    )
    headers = ["mode", "batch", "s/batch", "s/instance", "instances/s", "peak GPU GB", "note"]
    text = format_table(headers, [[_fmt(v) for v in row] for row in rows])
    record = {
        "part": "gpu",
        "device": device,
        "device_name": device_name,
        "tiny": args.tiny,
        "architecture": {"source": source, **fields, "parameters": n_params},
        "items": args.items,
        "seq_len": seq_len,
        "queries_per_history": int(qpos.numel()),
        "batch_sizes": batch_sizes,
        "precision": {
            "forward/recommend": "bf16 weights",
            "train step": "fp32 weights, bf16 autocast, AdamW",
        },
        "warmup": args.warmup,
        "repeats": args.repeats,
        "paper_table7": paper,
        "results": results,
        "cuda": torch.version.cuda,
        "provenance": {
            **prov,
            "load_average_end": load_average(),
            "wall_seconds": round(time.time() - t_start, 1),
        },
        "table": text,
    }
    slug = (
        re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")[:40]
        if device.startswith("cuda")
        else "cpu"
    )
    part = f"gpu-{slug}" + ("-tiny" if args.tiny else "")
    path = write_json(result_path(Path(args.out), part, args.tag), record)
    md = (
        f"# GPU bench: {device_name}\n\ncommand: `{prov['command']}`\n\n{source}; {n_params:,} backbone parameters; "
        f"ILP over {args.items} items; {seq_len} tokens per history, {int(qpos.numel())} queries.\n\n{text}\n"
    )
    path.with_suffix(".md").write_text(md)
    print(f"\n{device_name}: {source}\ncommand: {prov['command']}\n")
    print(text)
    print(f"\nwrote {path} and {path.with_suffix('.md').name}")
    return 0


def run_mode(mode: str, batch: int, fn: Any, device: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    log(f"{mode}, batch {batch}")
    rec: dict[str, Any] = {"mode": mode, "batch": batch}
    try:
        m = measure(fn, device, args.warmup, args.repeats)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        rec["note"] = "out of memory"
        return rec
    rec.update(m, seconds_per_instance=m["seconds"] / batch, instances_per_s=batch / m["seconds"])
    return rec


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


if __name__ == "__main__":
    sys.exit(main())
