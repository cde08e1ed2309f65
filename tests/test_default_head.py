"""Which head answers for a domain: the best on validation NDCG@10 of the heads of its current catalog
(ties: the newest), or the one pinned with `st2si zoo default`; and the in-tool ID-only SASRec
(`--head sasrec`) that the LM heads are shown against ("LM over ID-only")."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import build_zoo, run_cli_here, synthetic_dataset

from st2si_cli.adapt import FeatureOptions, adapt, evaluate
from st2si_cli.data.prepare import load_dataset
from st2si_cli.errors import ZooError
from st2si_cli.heads.choice import (
    choose_head,
    default_head,
    lm_over_id_only,
    pin_default,
    valid_score,
)
from st2si_cli.heads.registry import SASREC, get_kind, kind_for_config, kind_of
from st2si_cli.items import add_items
from st2si_cli.model.adapter import AdapterConfig
from st2si_cli.recommend import parse_requests, recommend
from st2si_cli.train.head import HeadConfig
from st2si_cli.zoo.lookup import PIN_KIND
from st2si_cli.zoo.meta import HeadMeta
from st2si_cli.zoo.store import Zoo

pytestmark = pytest.mark.usefixtures("one_thread")

FP32 = FeatureOptions(dtype="fp32")
SASREC_SMALL = AdapterConfig(
    hidden=16, layers=1, heads=2, max_len=8, batch_size=16, max_epochs=15, patience=15, use_text=False
)


def _adapt(zoo: Zoo, cfg, name: str):
    return adapt(zoo, "toy", backbone="tiny-opt", head_cfg=cfg, feature_opts=FP32, name=name)


@pytest.fixture(scope="module")
def heads_zoo(tmp_path_factory):
    """The synthetic domain "toy" with three heads, oldest first: an ILP trained for a few epochs
    ("toy/ilp"), an ID-only SASRec ("toy/sasrec") and an ILP that barely moved from its random start
    ("toy/weak", the newest). The synthetic users drift through the catalog by item ID, so the SASRec
    is well ahead on validation (about 0.50 against 0.25 on the tiny random backbone's features).
    Tests copy it before changing it."""
    zoo = build_zoo(tmp_path_factory.mktemp("default-head") / "zoo", {"toy": synthetic_dataset()})
    _adapt(zoo, HeadConfig(max_epochs=8, lr=3e-3), "toy/ilp")
    _adapt(zoo, SASREC_SMALL, "toy/sasrec")
    _adapt(zoo, HeadConfig(max_epochs=1, lr=1e-9, seed=3), "toy/weak")
    return zoo


@pytest.fixture
def zoo_copy(heads_zoo, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(heads_zoo.root, root)
    return Zoo(root)


def cli(zoo: Zoo, *args: str, input: str | None = None):
    return run_cli_here(zoo, *args, input=input, env={"ST2SI_NO_PROGRESS": "1"})


def score_of(zoo: Zoo, name: str) -> float:
    value = valid_score(zoo.get(name, kind="head"))
    assert value is not None
    return value


def pin_claims(zoo: Zoo, art_id: str) -> list[dict]:
    """The pin rows a head's manifest keeps: [{"kind", "name"}]."""
    from st2si_cli.zoo.manifests import manifest_path

    names = json.loads(manifest_path(zoo.root, art_id).read_text())["names"]
    return [{"kind": n["kind"], "name": n["name"]} for n in names if n["kind"] == PIN_KIND]


def set_valid(zoo: Zoo, name: str, metrics: dict) -> None:
    """Rewrite a head's recorded validation metrics in place (a test's way to make ties and old heads)."""
    head = zoo.get(name, kind="head")
    zoo.update_meta(head, metrics={**head.meta["metrics"], "valid": metrics})


# ---- the rule -----------------------------------------------------------------------------------------
def test_the_default_is_the_best_on_validation_not_the_newest(heads_zoo):
    scores = {n: score_of(heads_zoo, n) for n in ("toy/ilp", "toy/sasrec", "toy/weak")}
    best = max(scores, key=scores.get)
    assert best != "toy/weak" and scores["toy/weak"] < scores[best]  # the newest is not the best
    choice = default_head(heads_zoo, "toy")
    assert choice.head.name == best and not choice.pinned
    assert choice.reason == (f"the best on validation NDCG@10 ({scores[best]:.4f}) of 3 heads for domain toy")
    assert choose_head(heads_zoo, "toy").head.name == best
    assert choose_head(heads_zoo, "toy", "toy/weak").reason == "given by --head"


def test_ties_go_to_the_newest(zoo_copy):
    for name in ("toy/ilp", "toy/sasrec", "toy/weak"):
        set_valid(zoo_copy, name, {"NDCG@10": 0.25, "n_users": 40})
    assert default_head(zoo_copy, "toy").head.name == "toy/weak"
    set_valid(zoo_copy, "toy/weak", {"NDCG@10": 0.2, "n_users": 40})
    assert default_head(zoo_copy, "toy").head.name == "toy/sasrec"


def test_heads_without_validation_metrics_are_chosen_only_where_none_has_them(zoo_copy):
    set_valid(zoo_copy, "toy/weak", {})  # e.g. a head stored before validation metrics were kept
    choice = default_head(zoo_copy, "toy")
    assert choice.head.name != "toy/weak"
    assert "of 2 heads with validation metrics (1 without) for domain toy" in choice.reason
    for name in ("toy/ilp", "toy/sasrec"):
        set_valid(zoo_copy, name, {})
    choice = default_head(zoo_copy, "toy")
    assert choice.head.name == "toy/weak"
    assert choice.reason == "the newest of 3 heads for domain toy, none with validation NDCG@10"


def test_heads_of_an_older_catalog_are_not_candidates_and_a_pin_follows_its_head(zoo_copy, tmp_path):
    pin_default(zoo_copy, "toy", "toy/weak")
    items = tmp_path / "new.jsonl"
    items.write_text(json.dumps({"item": "n0", "title": "red lamp"}) + "\n")
    add_items(zoo_copy, "toy", items)
    choice = default_head(zoo_copy, "toy")
    # every head got a version for the grown catalog; the pinned one's version answers
    assert HeadMeta.of(choice.head).n_items == 26
    assert HeadMeta.of(choice.head).inputs.first("head") == zoo_copy.pinned_head("toy").id
    assert choice.head.name == "toy/weak"  # the name moved to the new version; the pin stays on the old
    assert choice.pinned and "its version for the current catalog" in choice.reason
    old = zoo_copy.pinned_head("toy")
    with pytest.raises(ZooError, match="ranks an older catalog of toy"):
        pin_default(zoo_copy, "toy", old.id)
    pin_default(zoo_copy, "toy", None)
    choice = default_head(zoo_copy, "toy")
    assert HeadMeta.of(choice.head).n_items == 26 and "of 3 heads for domain toy" in choice.reason


# ---- the pin ------------------------------------------------------------------------------------------
def test_pin_show_and_clear_through_the_cli(zoo_copy):
    best = default_head(zoo_copy, "toy").head
    proc = cli(zoo_copy, "zoo", "default", "toy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{best.name} ({best.short_id})"
    assert "Default head of toy: the best on validation NDCG@10 (" in proc.stderr

    proc = cli(zoo_copy, "zoo", "default", "toy", "toy/weak")
    assert proc.returncode == 0, proc.stderr
    weak = zoo_copy.get("toy/weak", kind="head")
    assert proc.stdout.strip() == f"toy/weak ({weak.short_id})"
    assert "Default head of toy: pinned with st2si zoo default." in proc.stderr
    # every command that picks a head says so
    proc = cli(zoo_copy, "eval", "--domain", "toy", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["head_id"] == weak.id
    assert "Using head toy/weak" in proc.stderr and "pinned with st2si zoo default" in proc.stderr
    proc = cli(
        zoo_copy,
        "recommend",
        "--domain",
        "toy",
        "--user-history",
        "-",
        input='{"user":"a","history":["3"]}\n',
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["head_id"] == weak.id and "pinned with st2si zoo default" in proc.stderr
    proc = cli(zoo_copy, "zoo", "ls", "--domain", "toy")
    assert "Default head: toy/weak, pinned with st2si zoo default." in proc.stderr
    proc = cli(zoo_copy, "report", "--domain", "toy", "--json", "--users", "1")
    assert proc.returncode == 0, proc.stderr
    dh = json.loads(proc.stdout)["default_head"]
    assert dh["name"] == "toy/weak" and dh["pinned"] and dh["best_on_validation"] == best.name
    proc = cli(zoo_copy, "zoo", "default", "toy", "--json")
    assert json.loads(proc.stdout) == {
        "domain": "toy",
        "head": "toy/weak",
        "head_id": weak.id,
        "pinned": True,
        "reason": "pinned with st2si zoo default",
    }

    # the pin is no name of the head: names, lookups and `zoo info` are as before
    assert zoo_copy.names_of(weak) == ["toy/weak"]
    assert zoo_copy.get("toy", kind=None).kind == "dataset"
    assert zoo_copy.find("toy/weak").id == weak.id
    # it is kept in the head's manifest, so an index rebuilt from the manifests keeps it
    assert {"kind": PIN_KIND, "name": "toy"} in pin_claims(zoo_copy, weak.id)

    proc = cli(zoo_copy, "zoo", "default", "toy", "--clear")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{best.name} ({best.short_id})"
    assert "Unpinned toy/weak" in proc.stderr and "the best on validation" in proc.stderr
    assert zoo_copy.pinned_head("toy") is None
    assert pin_claims(zoo_copy, weak.id) == []


def test_a_pin_survives_an_index_rebuilt_from_the_manifests_and_goes_with_its_head(zoo_copy):
    from st2si_cli.zoo.maintenance import rebuild_index

    pin_default(zoo_copy, "toy", "toy/weak")
    zoo_copy.close()
    rebuild_index(zoo_copy.root)
    zoo = Zoo(zoo_copy.root)
    assert zoo.pinned_head("toy").name == "toy/weak" and default_head(zoo, "toy").pinned
    proc = cli(zoo, "zoo", "rm", "toy/weak", "--kind", "head", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert zoo.pinned_head("toy") is None
    choice = default_head(zoo, "toy")
    assert not choice.pinned and "the best on validation NDCG@10" in choice.reason


def test_pin_errors(zoo_copy):
    proc = cli(zoo_copy, "zoo", "default", "toy", "toy/weak", "--clear")
    assert proc.returncode == 2 and "not both" in proc.stderr
    proc = cli(zoo_copy, "zoo", "default", "toy", "toy/nothing")
    assert proc.returncode != 0 and "no head artifact named 'toy/nothing'" in proc.stderr
    proc = cli(zoo_copy, "zoo", "default", "nowhere", "toy/weak")
    assert proc.returncode != 0 and "nowhere" in proc.stderr
    assert zoo_copy.pinned_head("toy") is None and zoo_copy.pinned_head("nowhere") is None


def test_an_old_zoo_without_pins_reads_and_its_default_is_the_best_on_validation(zoo_copy):
    assert zoo_copy.db.execute("SELECT COUNT(*) FROM names WHERE kind = ?", [PIN_KIND]).fetchone()[0] == 0
    best = max(("toy/ilp", "toy/sasrec", "toy/weak"), key=lambda n: score_of(zoo_copy, n))
    proc = cli(zoo_copy, "zoo", "default", "toy")
    assert proc.returncode == 0 and proc.stdout.startswith(best)
    proc = cli(zoo_copy, "zoo", "ls", "--domain", "toy")
    assert f"Default head: {best}, the best on validation NDCG@10 (" in proc.stderr
    assert "of 3 heads for domain toy." in proc.stderr


# ---- the in-tool ID-only SASRec ----------------------------------------------------------------------
def test_sasrec_is_a_registered_id_only_kind(heads_zoo):
    assert get_kind("sasrec") is SASREC and SASREC.id_only({}) and not get_kind("adapter").id_only({})
    assert kind_for_config(AdapterConfig(use_text=False)) is SASREC
    assert kind_for_config(AdapterConfig()).name == "adapter"
    head = heads_zoo.get("toy/sasrec", kind="head")
    meta = HeadMeta.of(head)
    assert meta.kind == "sasrec" and kind_of(head) is SASREC and meta.train["use_text"] is False
    assert meta.config_kind == "st2si-adapter-head"
    assert "item_text" not in {k for k, v in _tensors(heads_zoo, head).items() if v.numel()}


def _tensors(zoo, head):
    from st2si_cli.heads.store import load_head_tensors

    return load_head_tensors(zoo, head)


def test_sasrec_evals_and_recommends(heads_zoo):
    head = heads_zoo.get("toy/sasrec", kind="head")
    meta = HeadMeta.of(head)
    for split in ("valid", "test"):
        result = evaluate(heads_zoo, "toy", head_ref=head.id, split=split)
        assert result["metrics"]["NDCG@10"] == pytest.approx(
            getattr(meta.metrics, split)["NDCG@10"], abs=1e-6
        )
    ds = load_dataset(heads_zoo, "toy")
    line = json.dumps({"user": "0", "history": [ds.items[i]["id"] for i in ds.sequences[0][:-1]]})
    [out] = recommend(heads_zoo, "toy", parse_requests([line], "-", ds.items), k=5, head_ref=head.id)
    assert len(out["items"]) == 5 and out["head_id"] == head.id


def test_adapt_head_sasrec_from_the_cli_and_the_lm_over_id_only_line(zoo_copy):
    proc = cli(
        zoo_copy,
        *("adapt", "--domain", "toy", "--backbone", "tiny-opt", "--dtype", "fp32", "--head", "sasrec"),
        *("--hidden", "16", "--epochs", "2", "--batch-size", "16", "--seed", "5", "--name", "toy/sasrec2"),
    )
    assert proc.returncode == 0, proc.stderr
    head = zoo_copy.get("toy/sasrec2", kind="head")
    assert HeadMeta.of(head).kind == "sasrec" and HeadMeta.of(head).train["use_text"] is False
    assert "Default head: " in proc.stderr
    # a new LM head is shown against the best ID-only head of the domain
    proc = cli(
        zoo_copy,
        *(
            "adapt",
            "--domain",
            "toy",
            "--backbone",
            "tiny-opt",
            "--dtype",
            "fp32",
            "--head",
            "ilp",
            "--epochs",
            "2",
        ),
        *("--name", "toy/ilp2"),
    )
    assert proc.returncode == 0, proc.stderr
    ref = max(("toy/sasrec", "toy/sasrec2"), key=lambda n: score_of(zoo_copy, n))
    lm, r = score_of(zoo_copy, "toy/ilp2"), score_of(zoo_copy, ref)
    expected = f"LM over ID-only: {(lm / r - 1) * 100:+.1f}% NDCG@10 on validation (toy/ilp2 {lm:.4f} vs {ref} {r:.4f})"
    assert expected in proc.stderr
    assert lm_over_id_only(zoo_copy, "toy", zoo_copy.get("toy/ilp2", kind="head")) == expected
    # eval shows the head it uses against it; zoo ls the best LM head
    proc = cli(zoo_copy, "eval", "--domain", "toy", "--head", "toy/ilp2")
    assert proc.returncode == 0 and expected in proc.stderr
    best_lm = max(("toy/ilp", "toy/weak", "toy/ilp2"), key=lambda n: score_of(zoo_copy, n))
    proc = cli(zoo_copy, "zoo", "ls", "--domain", "toy")
    assert "LM over ID-only: " in proc.stderr and f"({best_lm} " in proc.stderr
    # an ID-only head gets no such line of its own
    assert lm_over_id_only(zoo_copy, "toy", head) is None


def test_no_lm_over_id_only_line_without_an_id_only_head(tmp_path):
    zoo = build_zoo(tmp_path / "zoo", {"toy": synthetic_dataset()})
    _adapt(zoo, HeadConfig(max_epochs=1), "toy/ilp")
    assert lm_over_id_only(zoo, "toy") is None
    proc = cli(zoo, "zoo", "ls", "--domain", "toy")
    assert "LM over ID-only" not in proc.stderr
    assert "Default head: toy/ilp, the only head for domain toy." in proc.stderr


def test_a_backbone_given_without_a_head_picks_among_that_backbones_heads(zoo):
    """`eval --backbone B` without `--head`: the default among the heads trained on B (the best on
    validation overall may be another backbone's); none on B is a one-line mismatch."""
    from st2si_cli.errors import MismatchError
    from st2si_cli.heads.choice import choose_head

    fp32 = FeatureOptions(dtype="fp32")
    opt = adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=1), feature_opts=fp32)
    choice = choose_head(zoo, "toy", backbone="tiny-opt")
    assert choice.head.id == opt.id and "on backbone" in choice.describe()
    with pytest.raises(MismatchError, match="no head of domain toy was trained on backbone tiny-llama"):
        choose_head(zoo, "toy", backbone="tiny-llama")
    llama = adapt(
        zoo,
        "toy",
        backbone="tiny-llama",
        head_cfg=HeadConfig(max_epochs=1),
        feature_opts=fp32,
        name="toy/llama",
    )
    assert choose_head(zoo, "toy", backbone="tiny-llama").head.id == llama.id
    assert choose_head(zoo, "toy", backbone="tiny-opt").head.id == opt.id
    assert evaluate(zoo, "toy", backbone="tiny-llama", feature_opts=fp32)["head_id"] == llama.id
