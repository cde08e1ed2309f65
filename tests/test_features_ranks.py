"""The feature pass split across the processes of a torchrun job: the blocks, the shards of any spans,
and real 2-process runs on the CPU whose cache is the bytes and ID of one process's."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import REPO, build_zoo, synthetic_dataset

from st2si_cli.adapt import FeatureOptions, get_features
from st2si_cli.backbones.load import load_backbone
from st2si_cli.data.prepare import load_dataset
from st2si_cli.features.cache import compute_features, read_shards
from st2si_cli.features.ranks import split_blocks, world
from st2si_cli.model.samples import build_samples, plan_batches
from st2si_cli.model.text import ItemTokenizer, TextConfig
from st2si_cli.zoo.artifact import write_safetensors_atomic
from st2si_cli.zoo.store import Zoo

pytestmark = pytest.mark.usefixtures("one_thread")  # as the ranks (OMP_NUM_THREADS=1): the same sums

MAX_BATCH = 4  # small batches: the tiny dataset makes a plan of several batches, split over the ranks

# Each rank of `torchrun --nproc_per_node 2 RANK_SCRIPT ZOO OUT MAX_BATCH` runs `adapt` (rank 0 trains a head, the
# other returns None), then `get_features` (the stored cache, on every rank), and writes what it saw and
# the batches its pass computed to OUT/rank-R.json.
RANK_SCRIPT = """
import hashlib, json, os, sys
from pathlib import Path

from st2si_cli.adapt import FeatureOptions, adapt, get_features
from st2si_cli.features import cache, shards
from st2si_cli.features.ranks import world
from st2si_cli.model.text import TextConfig
from st2si_cli.train.head import HeadConfig
from st2si_cli.zoo.store import Zoo

root, out = sys.argv[1], Path(sys.argv[2])  # and sys.argv[3]: max_batch
rank, size = world()
computed = []
real_run_batches = shards.run_batches

def counting(model, samples, batches, start=0, stop=None):
    for j, b, h in real_run_batches(model, samples, batches, start=start, stop=stop):
        computed.append(j)
        yield j, b, h

shards.run_batches = counting
if os.environ.get("LOSE_SHARDS") == str(rank):  # this rank's shards vanish before the ranks meet
    real_finish = cache.finish_on_ranks

    def finish_without_my_shards(zoo, rank, computed_tokens, read_the_rest, store_cache, stage):
        (stage / f"shard-{computed[0]:06d}.safetensors").unlink()
        return real_finish(zoo, rank, computed_tokens, read_the_rest, store_cache, stage)

    cache.finish_on_ranks = finish_without_my_shards
zoo = Zoo(root)
opts = FeatureOptions(dtype="fp32", max_batch=int(sys.argv[3]))
head = adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=1), feature_opts=opts)
art, fs, _ = get_features(zoo, "tiny-opt", zoo.get("toy", kind="dataset"), TextConfig(), opts)
record = {
    "rank": rank,
    "size": size,
    "head": head.id if head is not None else None,
    "features": art.id,
    "feats_sha": hashlib.sha256(fs.feats.numpy().tobytes()).hexdigest(),
    "computed": computed,
}
(out / f"rank-{rank}.json").write_text(json.dumps(record))
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A small zoo (the synthetic "toy" dataset, tiny-opt), copied by each test: same artifact IDs."""
    root = tmp_path_factory.mktemp("ranks") / "template"
    build_zoo(root, {"toy": synthetic_dataset(n_users=12)}).close()
    return root


def zoo_copy(template, path):
    shutil.copytree(template, path)
    return Zoo(path)


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


def rank_env(env=None):
    """The environment of a 2-rank job: this one's without a rank of its own, one thread a rank."""
    outside = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ST2SI_DEBUG")
    }
    return {
        **outside,
        "OMP_NUM_THREADS": "1",
        "ST2SI_NO_PROGRESS": "1",
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }


def run_two_ranks(tmp_path, root, env=None, timeout=300):
    """The rank script under `python -m torch.distributed.run --nproc_per_node 2 --standalone`: (exit
    code, its output, each rank's record in rank order). A run past `timeout` is killed, workers too."""
    script, out = tmp_path / "ranks_script.py", tmp_path / "out"
    script.write_text(RANK_SCRIPT)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    job = subprocess.Popen(
        [*TORCHRUN_2, str(script), str(root), str(out), str(MAX_BATCH)],
        cwd=REPO,
        env=rank_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a hung job is killed with its workers
    )
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        pytest.fail(f"the 2-rank job hung for {timeout}s:\n{output[-3000:]}")
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    return job.returncode, output, records


def two_ranks(tmp_path, root):
    """`run_two_ranks`, which must succeed: each rank's record."""
    code, output, records = run_two_ranks(tmp_path, root)
    assert code == 0 and len(records) == 2, output[-3000:]
    return records


def one_process_cache(template, path):
    """The features of a one-process pass with the rank script's settings, in a copy of the template."""
    z = zoo_copy(template, path)
    art, _, _ = get_features(
        z,
        "tiny-opt",
        z.get("toy", kind="dataset"),
        TextConfig(),
        FeatureOptions(dtype="fp32", max_batch=MAX_BATCH),
    )
    return z, art


def the_plan(z):
    """The batch plan of the rank script's pass, and its two blocks."""
    backbone = load_backbone(z, "tiny-opt", dtype="fp32")
    ds = load_dataset(z, "toy")
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig())
    samples = build_samples(ds, itok, itok.encode_items(ds.items), alignment=True, every_position=True)
    lengths = [len(s.tokens) for s in samples]
    batches = plan_batches(lengths, 16384, MAX_BATCH)
    return backbone, ds, lengths, batches, split_blocks([len(b) * lengths[b[0]] for b in batches], 2)


# ---- the blocks ----------------------------------------------------------------------------------------


def test_blocks_cover_every_batch_once_and_balance_tokens():
    rng = random.Random(0)
    for n in (1, 2, 3, 4, 7):
        for _ in range(50):
            costs = [rng.randint(1, 100) for _ in range(rng.randint(n, 60))]
            blocks = split_blocks(costs, n)
            assert len(blocks) == n and blocks[0][0] == 0 and blocks[-1][1] == len(costs)
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous: each batch once
            assert all(s <= e for s, e in blocks)
            ideal = sum(costs) / n
            for s, e in blocks:  # each block's tokens within one batch of its fair share
                assert abs(sum(costs[s:e]) - ideal) <= max(costs) + 1e-9
    # The plan's own costs: the longest batches come first, so the first block holds fewer batches.
    lengths = [rng.randint(3, 90) for _ in range(200)]
    batches = plan_batches(lengths, 512, 8)
    costs = [len(b) * lengths[b[0]] for b in batches]
    (s0, e0), (s1, e1) = split_blocks(costs, 2)
    assert sorted(j for s, e in ((s0, e0), (s1, e1)) for j in range(s, e)) == list(range(len(batches)))
    assert abs(sum(costs[s0:e0]) - sum(costs[s1:e1])) <= max(costs)
    assert e0 - s0 < e1 - s1
    assert split_blocks([5], 3) in (
        [(0, 1), (1, 1), (1, 1)],
        [(0, 0), (0, 1), (1, 1)],
        [(0, 0), (0, 0), (0, 1)],
    )
    assert split_blocks([], 2) == [(0, 0), (0, 0)]


def test_world_outside_torchrun_is_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world() == (1, 2)


def test_shards_of_any_spans_are_read_and_only_a_blocks_own_bad_shards_removed(tmp_path):
    """read_shards takes shards starting anywhere, reports the batches none holds, and removes a bad
    shard only where its name is a batch of `within` (another rank's shards are left alone)."""
    batches = [[0, 1], [2], [3, 4], [5], [6], [7, 8]]
    first_row = torch.arange(10) * 2  # two query rows per sample
    truth = torch.randn(18, 3)

    def shard(a, e):
        rows = torch.cat([torch.arange(2 * i, 2 * i + 2) for b in batches[a:e] for i in b])
        write_safetensors_atomic(
            {"feats": truth[rows], "span": torch.tensor([a, e])}, tmp_path / f"shard-{a:06d}.safetensors"
        )

    shard(0, 2)
    shard(3, 4)
    shard(5, 6)
    (tmp_path / "shard-000004.safetensors").write_bytes(b"damaged")
    feats = torch.zeros(18, 3)
    assert read_shards(tmp_path, batches, first_row, lambda d: feats, within=(0, 3)) == [2]
    assert (tmp_path / "shard-000004.safetensors").exists()  # batch 4 is another block's
    assert read_shards(tmp_path, batches, first_row, lambda d: feats, within=(3, 6)) == [4]
    assert not (tmp_path / "shard-000004.safetensors").exists()
    shard(2, 3)
    shard(4, 5)
    feats = torch.zeros(18, 3)
    assert read_shards(tmp_path, batches, first_row, lambda d: feats) == []
    assert torch.equal(feats, truth)


# ---- real 2-process runs ---------------------------------------------------------------------------------


def test_two_ranks_store_the_cache_of_one_process(tmp_path, template):
    """Both ranks compute a share; the stored features.safetensors and its ID are one process's; rank 0
    trains the head, rank 1's adapt returns None; both get the cache back."""
    reference_zoo, reference = one_process_cache(template, tmp_path / "one")
    z = zoo_copy(template, tmp_path / "two")
    ranks = two_ranks(tmp_path, z.root)

    art = z.get(reference.id, kind="features")
    assert (
        z.file(art, "features.safetensors").read_bytes()
        == reference_zoo.file(reference, "features.safetensors").read_bytes()
    )
    assert [r["features"] for r in ranks] == [reference.id, reference.id]
    assert ranks[0]["feats_sha"] == ranks[1]["feats_sha"]
    assert ranks[0]["head"] is not None and ranks[1]["head"] is None
    assert z.get(ranks[0]["head"], kind="head").meta["inputs"]["features"] == reference.id
    assert art.meta["ranks"] == 2 and "ranks" not in reference.meta
    assert art.meta["timings"]["tokens_computed"] == art.meta["timings"]["tokens"]

    _, _, lengths, batches, blocks = the_plan(z)
    assert len(batches) >= 4 and all(e > s for s, e in blocks)
    assert [r["computed"] for r in ranks] == [list(range(*blocks[0])), list(range(*blocks[1]))]
    assert not (z.root / "tmp" / art.name).exists()  # the staging folder went with the pass


def test_two_ranks_resume_the_shards_on_disk(tmp_path, template):
    """Shards left by a killed one-process pass (rank 0's block and the first batch of rank 1's) are
    kept: rank 0 computes nothing, rank 1 the rest of its block, and the cache is one process's."""
    reference_zoo, reference = one_process_cache(template, tmp_path / "one")
    z = zoo_copy(template, tmp_path / "two")
    backbone, ds, lengths, batches, ((_, hi), (_, end)) = the_plan(z)
    assert end - hi >= 2
    calls = {"n": 0}

    def die_in_rank_1s_second_batch(tokens, samples):
        calls["n"] += 1
        if calls["n"] == hi + 2:  # one call per batch; every batch a shard: batches 0..hi are on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_features(
            z,
            backbone,
            ds,
            z.get("toy", kind="dataset").id,
            TextConfig(),
            max_batch=MAX_BATCH,
            shard_seconds=0,
            on_progress=die_in_rank_1s_second_batch,
        )
    assert len(list((z.root / "tmp").glob("features-*/shard-*.safetensors"))) == hi + 1

    ranks = two_ranks(tmp_path, z.root)
    assert [r["computed"] for r in ranks] == [[], list(range(hi + 1, end))]
    art = z.get(reference.id, kind="features")
    assert [r["features"] for r in ranks] == [reference.id, reference.id]
    assert (
        z.file(art, "features.safetensors").read_bytes()
        == reference_zoo.file(reference, "features.safetensors").read_bytes()
    )
    left = sum(lengths[i] for b in batches[hi + 1 :] for i in b)
    assert art.meta["timings"]["tokens_computed"] == left < art.meta["timings"]["tokens"]


def test_a_batch_missing_after_the_meeting_stops_every_rank(tmp_path, template):
    """Rank 1's shard gone when the ranks meet: rank 0 stores nothing and says which batches are
    missing; rank 1 raises the same error instead of waiting for a cache (no rank hangs)."""
    z = zoo_copy(template, tmp_path / "two")
    code, output, records = run_two_ranks(tmp_path, z.root, env={"LOSE_SHARDS": "1"}, timeout=150)
    _, _, _, batches, ((_, hi), (_, end)) = the_plan(z)
    assert code != 0 and records == []
    assert f"no shard in {z.root / 'tmp'}" in output and f"holds batches {hi}-{end - 1} " in output
    assert "the feature pass failed on rank 0" in output  # rank 1's own error
    assert z.ls(kind="features") == [] and z.ls(kind="head") == []
    stage = next((z.root / "tmp").glob("features-*"))
    assert (stage / "shard-000000.safetensors").exists()  # rank 0's block stays on disk for a rerun


def test_torchrun_cli_recipe_shares_the_pass_and_rank_0_trains(tmp_path, template):
    """`torchrun --nproc_per_node 2 -m st2si_cli adapt --domain D` as users type it: both ranks compute
    a share of the pass, the stored cache is the bytes and ID of one process's, the recipe's stages are
    trained once (by rank 0) and one JSON record is printed."""
    z = zoo_copy(template, tmp_path / "two")
    cmd = [
        *TORCHRUN_2,
        "-m",
        "st2si_cli",
        "--zoo",
        str(z.root),
        "adapt",
        "--domain",
        "toy",
        "--backbone",
        "tiny-opt",
    ]
    cmd += ["--dtype", "fp32", "--batch-tokens", "256", "--budget", "2s", "--seeds", "1", "--json"]
    job = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    records = [json.loads(line) for line in job.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1, job.stdout  # rank 1 computed its share and printed nothing

    [features] = z.ls(kind="features")
    one_zoo = zoo_copy(template, tmp_path / "one")
    opts = FeatureOptions(dtype="fp32", batch_tokens=256)
    one, _, _ = get_features(one_zoo, "tiny-opt", one_zoo.get("toy", kind="dataset"), TextConfig(), opts)
    assert features.id == one.id
    assert (
        z.file(features, "features.safetensors").read_bytes()
        == one_zoo.file(one, "features.safetensors").read_bytes()
    )
    # two ranks, and batches enough for each to have a block of its own
    assert features.meta["ranks"] == 2 and features.meta["timings"]["batches"] >= 4
    assert records[0]["stages"][0]["stage"] == "sasrec-s0"
    names = [h.name for h in z.ls(kind="head")]
    assert len(names) == len(set(names)) and "toy/recipe-sasrec-s0" in names  # each stage stored once
