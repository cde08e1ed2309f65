"""Full tuning in one process on a tiny OPT: samples, training, storing, resume, ablations, several domains."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time

import pytest
import torch
from helpers import REPO, build_zoo, cli_command, cli_env, run_cli, synthetic_dataset
from safetensors.torch import load_file

from st2si_cli.adapt import FeatureOptions, adapt, evaluate
from st2si_cli.errors import St2siError
from st2si_cli.heads.store import load_head_weight
from st2si_cli.model.samples import ALIGN, TRAIN, collate
from st2si_cli.model.st2si import ST2SI
from st2si_cli.model.text import NEW_QUERY_TOKEN, TextConfig
from st2si_cli.pretrain import distributed as dist
from st2si_cli.pretrain.config import PretrainConfig
from st2si_cli.pretrain.corpus import build_corpus, epoch_order, epoch_samples, split_even
from st2si_cli.pretrain.full import pretrain
from st2si_cli.pretrain.loop import learning_rate_schedule
from st2si_cli.pretrain.weights import load_trainable
from st2si_cli.train.head import HeadConfig

FAST = dict(epochs=2, lr=1e-3, batch_size=8)
FP32 = FeatureOptions(dtype="fp32")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # for the CLI processes

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here runs on one intra-op thread


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One zoo for the module: the runs build on each other (resume, adapt on a tuned backbone)."""
    return build_zoo(
        tmp_path_factory.mktemp("zoo"),
        {
            "toy": synthetic_dataset(),
            "toy2": synthetic_dataset(n_users=30, n_items=20, seed=1),
            "toy3": synthetic_dataset(n_users=25, n_items=15, seed=2),
        },
    )


@pytest.fixture(scope="module")
def corpus(zoo):
    _, tokenizer = load_trainable(zoo, zoo.get("tiny-opt"), "dot")
    return build_corpus(zoo, [zoo.get("toy", kind="dataset")], tokenizer, TextConfig())


def weights_of(zoo, art):
    return load_file(str(zoo.file(art, "model.safetensors")))


# ---- samples, batches, schedule -----------------------------------------------------------------------


def test_training_samples_use_only_the_training_part_and_the_ablations_cut_them(zoo, corpus):
    from st2si_cli.data.prepare import load_dataset

    ds = load_dataset(zoo, "toy")
    full = epoch_samples(corpus, PretrainConfig(), 1)
    histories = [s for s in full if s.roles[0] == TRAIN]
    aligns = [s for s in full if s.roles == [ALIGN]]
    users = [u for u, seq in enumerate(ds.sequences) if len(seq) >= 4]
    assert [s.owner for s in histories] == users and [s.targets for s in aligns] == [
        [i] for i in range(ds.n_items)
    ]
    q = corpus.itok.query_id
    for s in histories:
        seq = ds.sequences[s.owner]
        assert s.targets == seq[1:-2]  # every training position; never the valid or test item
        assert all(s.tokens[p] == q for p in s.query_pos) and s.tokens[-1] == q
    no_mq = epoch_samples(corpus, PretrainConfig(multi_query=False), 1)
    assert all(len(s.targets) == 1 for s in no_mq)
    assert [s.targets[0] for s in no_mq if s.roles == [TRAIN]] == [s.targets[-1] for s in histories]
    assert not any(s.roles == [ALIGN] for s in epoch_samples(corpus, PretrainConfig(alignment=False), 1))
    both = epoch_samples(corpus, PretrainConfig(multi_query=False, alignment=False), 1)
    assert len(both) == len(histories) and all(len(s.targets) == 1 for s in both)


def test_crops_are_seeded_per_epoch_and_stay_inside_the_training_part(zoo, corpus):
    from st2si_cli.data.prepare import load_dataset

    ds = load_dataset(zoo, "toy")
    cfg = PretrainConfig(sampling="crop", alignment=False)
    one, again, two = (
        epoch_samples(corpus, cfg, 1),
        epoch_samples(corpus, cfg, 1),
        epoch_samples(corpus, cfg, 2),
    )
    assert [s.tokens for s in one] == [s.tokens for s in again]
    assert [s.tokens for s in one] != [s.tokens for s in two]
    for s in one + two:
        train = ds.sequences[s.owner][:-2]
        starts = [i for i in range(1, len(train)) if train[i : i + len(s.targets)] == s.targets]
        assert starts, "targets are consecutive training items after the first"
    assert any(len(s.targets) < len(ds.sequences[s.owner]) - 3 for s in one)  # some crops are short


def test_global_batches_split_evenly_and_the_shuffle_ignores_the_world_size():
    assert split_even(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split_even([1], 3) == [[1], [], []]
    assert epoch_order(50, 0, 1) == epoch_order(50, 0, 1) != epoch_order(50, 0, 2)
    sched = learning_rate_schedule(total_steps=40, warmup_steps=100)  # warm-up clipped to 4 steps
    lrs = [sched(s) for s in range(40)]
    assert lrs[:4] == sorted(lrs[:4]) and lrs[4] == 1.0 and lrs[39] < 0.01
    assert learning_rate_schedule(10_000, 100)(99) < 1.0 == learning_rate_schedule(10_000, 100)(100)


def test_forward_loss_is_cross_entropy_at_the_queries_and_logits_cover_every_item(zoo, corpus):
    model, _ = load_trainable(zoo, zoo.get("tiny-opt"), "dot")
    m = ST2SI(model, corpus.n_items).eval()
    samples = epoch_samples(corpus, PretrainConfig(), 1)[:5]
    ids, rows, cols, targets = collate(samples, corpus.pad_id)
    logits, none = m(ids, rows, cols)
    assert none is None and logits.shape == (len(targets), corpus.n_items)
    _, loss = m(ids, rows, cols, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets))


# ---- the run ------------------------------------------------------------------------------------------


def test_pretrain_trains_and_stores_a_backbone_a_head_and_a_run(zoo):
    res = pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=PretrainConfig(**FAST), out="ft", device="cpu")
    losses = [r["loss"] for r in res.history]
    assert len(losses) == 2 and losses[-1] < losses[0]
    bb, head, run = res.backbone, res.heads["toy"], res.run
    assert (bb.kind, bb.name, head.kind, head.name, run.kind, run.name) == (
        "backbone",
        "ft",
        "head",
        "toy/ft",
        "run",
        "run/ft",
    )
    assert head.meta["backbone"] == bb.id and head.meta["dataset"] == zoo.get("toy", kind="dataset").id
    assert head.meta["text"]["query"] == "dot" and head.meta["method"] == "full"
    before, after = weights_of(zoo, zoo.get("tiny-opt")), weights_of(zoo, bb)
    assert before.keys() == after.keys()
    assert not torch.equal(
        before["model.decoder.layers.0.fc1.weight"], after["model.decoder.layers.0.fc1.weight"]
    )
    for key in ("flags", "config", "metrics", "history", "timings", "inputs", "world_size"):
        assert key in run.meta
    assert run.meta["world_size"] == 1 and len(run.meta["history"]) == 2
    assert set(run.meta["metrics"]) >= {"valid", "test", "alignment"}
    assert run.meta["inputs"] == {
        "backbone": zoo.get("tiny-opt").id,
        "datasets": [zoo.get("toy", kind="dataset").id],
    }
    assert run.meta["outputs"] == {"backbone": bb.id, "heads": {"toy": head.id}}
    assert not list((zoo.root / "tmp").glob("run-*"))  # staging removed
    # `evaluate` reads the new head and backbone with the plain loader, and agrees with the run (fp32).
    result = evaluate(zoo, "toy", feature_opts=FP32)
    assert result["head_id"] == head.id and result["backbone"] == "ft"
    for k in ("NDCG@10", "Recall@10", "MRR"):
        assert result["metrics"][k] == pytest.approx(run.meta["metrics"]["test"][k], abs=1e-6)


def test_max_minutes_stops_after_the_epoch_that_passes_it_and_says_so(zoo):
    cfg = PretrainConfig(epochs=5, patience=5, lr=1e-3, batch_size=8, max_minutes=1e-6)
    res = pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=cfg, out="ft-budget", device="cpu")
    assert len(res.history) == 1  # the first epoch already passes the budget
    assert res.run.meta["stopped_by"] == "time" and res.run.meta["early_stopped"] is False
    assert res.heads["toy"].meta["stopped_by"] == "time"
    # the budget is not part of the run key: the same settings without it resume the same staged run
    assert PretrainConfig(**FAST).result_dict() == PretrainConfig(**FAST, max_minutes=3).result_dict()
    full = pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=PretrainConfig(**FAST), out="ft-epochs")
    assert full.run.meta["stopped_by"] == "epochs" and full.run.meta["early_stopped"] is False


def test_a_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(zoo):
    cfg = PretrainConfig(**FAST, save_every=2)
    last_a: dict = {}
    keep = lambda info, d=last_a: d.update(info["module"].state_dict())  # noqa: E731
    a = pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=cfg, out="uninterrupted", on_step=keep)
    last_a = {k: v.clone() for k, v in last_a.items()}
    n_artifacts = len(zoo.ls())

    def die(info):
        if info["global_step"] == 13:  # mid epoch 2 (9 steps per epoch); last checkpoint at step 12
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=cfg, out="resumed", on_step=die)
    assert len(zoo.ls()) == n_artifacts  # nothing half-done is listed
    state = json.loads(next((zoo.root / "tmp").glob("run-*/state.json")).read_text())
    assert (state["epoch"], state["step"], state["global_step"]) == (2, 3, 12)
    with pytest.raises(St2siError, match="--resume"):
        pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=cfg, out="resumed")
    last_b: dict = {}
    b = pretrain(
        zoo,
        ["toy"],
        backbone="tiny-opt",
        cfg=cfg,
        out="resumed",
        resume=True,
        on_step=lambda info: last_b.update(info["module"].state_dict()),
    )
    for k, v in last_a.items():
        torch.testing.assert_close(last_b[k], v, rtol=0, atol=1e-6)
    wa, wb = weights_of(zoo, a.backbone), weights_of(zoo, b.backbone)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(load_head_weight(zoo, b.heads["toy"]), load_head_weight(zoo, a.heads["toy"]))
    assert [r["loss"] for r in b.history] == pytest.approx([r["loss"] for r in a.history], abs=1e-6)
    assert [r["valid_NDCG@10"] for r in b.history] == pytest.approx([r["valid_NDCG@10"] for r in a.history])


def test_query_token_new_saves_the_token_and_the_resized_embeddings(zoo):
    from transformers import AutoModel, AutoTokenizer

    res = pretrain(
        zoo,
        ["toy"],
        backbone="tiny-opt",
        text=TextConfig(query="new"),
        cfg=PretrainConfig(epochs=1, lr=1e-3, batch_size=8, alignment=False),
        out="newq",
    )
    folder = zoo.view(res.backbone)
    tok = AutoTokenizer.from_pretrained(folder)
    assert NEW_QUERY_TOKEN in tok.get_vocab()
    model = AutoModel.from_pretrained(folder)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    head = res.heads["toy"]
    assert head.meta["text"]["query"] == "new"
    assert res.run.meta["flags"]["query-token"] == "new" and res.run.meta["flags"]["no-alignment"] is True
    result = evaluate(zoo, "toy", head_ref=head.id, feature_opts=FP32)
    assert result["metrics"]["NDCG@10"] == pytest.approx(res.run.meta["metrics"]["test"]["NDCG@10"], abs=1e-6)


def test_several_domains_share_one_item_space_and_adapt_takes_the_backbone_further(zoo):
    res = pretrain(
        zoo,
        ["toy", "toy2"],
        backbone="tiny-opt",
        cfg=PretrainConfig(epochs=2, lr=1e-3, batch_size=8),
        out="multi",
    )
    n1, n2 = (zoo.get(d, kind="dataset").meta["stats"]["items"] for d in ("toy", "toy2"))
    config = res.run.meta["config"]
    assert config["offsets"] == [0, n1] and config["n_items"] == n1 + n2
    assert res.run.domain == "toy+toy2" and set(res.run.meta["metrics"]["domains"]) == {"toy", "toy2"}
    for d, n in (("toy", n1), ("toy2", n2)):
        head = res.heads[d]
        assert head.meta["n_items"] == n and head.meta["backbone"] == res.backbone.id
        got = evaluate(zoo, d, head_ref=head.id, feature_opts=FP32)["metrics"]["NDCG@10"]
        assert got == pytest.approx(res.run.meta["metrics"]["domains"][d]["test"]["NDCG@10"], abs=1e-6)
    new = adapt(zoo, "toy3", backbone="multi", head_cfg=HeadConfig(max_epochs=2), feature_opts=FP32)
    assert (
        new.meta["backbone"] == res.backbone.id
        and new.meta["n_items"] == zoo.get("toy3").meta["stats"]["items"]
    )


def test_plain_checkpoint_round_trip_restores_model_optimizer_and_schedule(zoo, corpus, tmp_path):
    info = dist.DistInfo()

    def engine():
        torch.manual_seed(0)
        model, _ = load_trainable(zoo, zoo.get("tiny-opt"), "dot")
        m = ST2SI(model, corpus.n_items)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return dist.PlainEngine(
            m, opt, torch.optim.lr_scheduler.LambdaLR(opt, learning_rate_schedule(50, 10)), info, "fp32", 1.0
        )

    samples = epoch_samples(corpus, PretrainConfig(), 1)
    batches = [collate(samples[i : i + 6], corpus.pad_id) for i in range(0, 18, 6)]
    a = engine()
    for b in batches[:2]:
        a.micro_step(b, 1.0, True)
        a.step()
    a.save(tmp_path / "ck", info)
    b = engine()
    b.load(tmp_path / "ck")
    assert b.scheduler.state_dict() == a.scheduler.state_dict() and b.lr() == a.lr()
    for x, y in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(x, y)
    for eng in (a, b):  # the same next step: Adam's moments came back too
        eng.micro_step(batches[2], 1.0, True)
        eng.step()
    for x, y in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(x, y)


def test_bad_settings_are_one_line_errors(zoo):
    with pytest.raises(St2siError, match="sampling"):
        pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=PretrainConfig(sampling="random"))
    with pytest.raises(St2siError, match="twice"):
        pretrain(zoo, ["toy", "toy"], backbone="tiny-opt")
    with pytest.raises(St2siError, match="zero0"):
        pretrain(zoo, ["toy"], backbone="tiny-opt", deepspeed="zero9", cfg=PretrainConfig(epochs=1))


# ---- the command line -----------------------------------------------------------------------------------


def test_cli_run_survives_sigkill_and_resumes(zoo):
    args = [
        "pretrain",
        "--domain",
        "toy",
        "--backbone",
        "tiny-opt",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--save-every",
        "5",
        "--out",
        "cli",
        "--device",
        "cpu",
        "--json",
    ]
    before = {a.id for a in zoo.ls()}
    proc = subprocess.Popen(
        cli_command(zoo, *args),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(ONE_THREAD),
    )
    deadline = time.time() + 120
    while (
        not list((zoo.root / "tmp").glob("run-*/state.json"))
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before its first checkpoint"
    assert {a.id for a in zoo.ls()} == before  # no half-written artifact is listed
    r = run_cli(zoo, *args, "--resume", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backbone"] == "cli" and out["head"] == "toy/cli" and out["world_size"] == 1
    ls = run_cli(zoo, "zoo", "ls", "--kind", "run", "--json", env=ONE_THREAD)
    runs = {row["name"]: row for row in json.loads(ls.stdout)}
    assert "run/cli" in runs


def test_zoo_ls_shows_run_flags_and_metrics(zoo):
    from st2si_cli.cli.zoo_cmd import summarize

    res = pretrain(
        zoo,
        ["toy"],
        backbone="tiny-opt",
        out="ablation",
        cfg=PretrainConfig(epochs=1, batch_size=8, multi_query=False, sampling="crop"),
    )
    line = summarize(res.run)
    assert line.startswith("NDCG@10 0.") and line.endswith("[no-multi-query sampling=crop]"), line
    r = run_cli(zoo, "zoo", "ls", "--kind", "run", env={**ONE_THREAD, "COLUMNS": "250"})
    assert r.returncode == 0 and any(
        row.startswith("run/ablation ") and "[no-multi-query sampling=crop]" in row
        for row in r.stdout.splitlines()
    ), r.stdout


EVAL_PROBE = textwrap.dedent(  # run before the CLI's entry point, see helpers.run_cli
    """
    import atexit, sys
    atexit.register(lambda: print("DEEPSPEED:", "deepspeed" in sys.modules, file=sys.stderr))
    """
)


def test_eval_of_a_pretrained_head_never_imports_deepspeed(zoo):
    if zoo.find("toy/ft") is None:
        pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=PretrainConfig(**FAST), out="ft")
    r = run_cli(zoo, "eval", "--domain", "toy", "--head", "toy/ft", "--json", prelude=EVAL_PROBE)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["head"] == "toy/ft"
    assert "DEEPSPEED: False" in r.stderr
