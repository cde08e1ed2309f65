"""`st2si report` as a person sees it: one self-contained HTML page of a tiny domain with two heads,
its content, its JSON, a read-only zoo, escaping, new items marked, and (where Chromium is installed)
the page loaded in a headless browser: rendered, screenshotted, no console error."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import subprocess

import pytest
from helpers import build_zoo, quick_adapter, quick_head, run_cli, synthetic_dataset

from st2si_cli.adapt import evaluate, read_dataset
from st2si_cli.data.prepare import store_dataset
from st2si_cli.metrics.beyond import NAMES
from st2si_cli.report import build_report, render

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL = '<script>alert("x")</script> & "quotes"'


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The synthetic domain "toy" with two heads on one feature cache: an ILP and a sequence adapter."""
    zoo = build_zoo(tmp_path_factory.mktemp("report") / "zoo", {"toy": synthetic_dataset()})
    quick_head(zoo, "toy", name="toy/ilp")
    quick_adapter(zoo, "toy", name="toy/ad", max_epochs=3)
    return zoo


@pytest.fixture(scope="module")
def page(zoo, tmp_path_factory):
    """The report written by the command line: (path, html)."""
    out = tmp_path_factory.mktemp("page") / "report.html"
    proc = run_cli(zoo, "report", "--domain", "toy", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the page goes to the file, the message to stderr
    assert "Wrote" in proc.stderr
    return out, out.read_text("utf-8")


def external_refs(html: str) -> list[str]:
    """src/href values (of scripts, styles, images, anything) and CSS url()/@import that leave the page."""
    refs = re.findall(r"""(?:src|href|xlink:href)\s*=\s*["']?([^"'\s>]+)""", html, re.I)
    refs += re.findall(r"url\(\s*['\"]?([^'\")]+)", html, re.I) + re.findall(
        r"@import\s+['\"]?([^'\";]+)", html
    )
    return [r for r in refs if not r.startswith(("#", "data:"))]


def zoo_state(root) -> dict[str, object]:
    """Every file of the zoo with its size, mtime and content hash, except the SQLite index, whose rows
    are compared instead (readers and checkpoints move pages between its files without changing it)."""
    files: dict[str, object] = {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("index.db")
    }
    con = sqlite3.connect(f"{(root / 'index.db').as_uri()}?mode=ro", uri=True)
    try:
        files["index.db rows"] = list(con.iterdump())
    finally:
        con.close()
    return files


def test_page_is_self_contained_and_shows_both_heads(page):
    _, html = page
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "http" not in " ".join(external_refs(html))
    assert not external_refs(html), external_refs(html)
    assert not re.search(r"<script|<link|<iframe|<object|<embed", html, re.I)
    for name in ("toy/ilp", "toy/ad"):
        assert name in html
    # every head has a loss curve and a validation curve, each its own SVG
    for name in ("toy/ilp", "toy/ad"):
        fig = re.search(r'<figure class="head"><h3>' + re.escape(name) + r"</h3>(.*?)</figure>", html, re.S)
        assert fig, name
        assert fig.group(1).count("<svg") == 2, name
        assert "Training loss" in fig.group(1) and "Validation NDCG@10" in fig.group(1)
    # the domain's charts, the heads table with beyond-accuracy columns, users, commands
    assert "History lengths" in html and "Item popularity (long tail)" in html
    header = html.replace("<br>", " ")  # the table's headers break between words
    for col in ("Valid NDCG@10", "Test NDCG@10", "Coverage @10", "Gini @10", "Entropy @10", "Training"):
        assert col in header
    assert html.count('class="user"') == 3
    assert "Held-out item" in html and "ranked <b>" in html
    assert "st2si adapt --domain toy --backbone tiny-opt --head adapter" in html
    assert 'class="badge b-default"' in html  # the default head is marked


def test_json_carries_the_same_content_and_agrees_with_eval(zoo):
    proc = run_cli(zoo, "report", "--domain", "toy", "--json", "--user", "u3", "--user", "u7", "-k", "5")
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    r = json.loads(line)
    assert [h["name"] for h in r["heads"]] == ["toy/ilp", "toy/ad"]
    # the default head is the best on validation NDCG@10 (ties: the newest, toy/ad), and the page says so
    valid = {h["name"]: h["valid"]["NDCG@10"] for h in r["heads"]}
    best = "toy/ad" if valid["toy/ad"] >= valid["toy/ilp"] else "toy/ilp"
    assert r["default_head"]["name"] == best == r["default_head"]["best_on_validation"]
    assert r["default_head"]["reason"].startswith(
        f"the best on validation NDCG@10 ({valid[best]:.4f}) of 2 heads"
    )
    assert not r["default_head"]["pinned"] and r["default_head"]["lm_over_id_only"] is None
    assert r["domain"]["items"] == 25 and r["domain"]["users"] == 40
    assert [u["user"] for u in r["users"]] == ["u3", "u7"]
    ds = read_dataset(zoo, "toy")
    for u in r["users"]:
        seq = ds.sequences[ds.users.index(u["user"])]
        assert u["target"]["index"] == seq[-1]
        assert [it["index"] for it in u["history"]] == seq[:-1][-10:]
        assert len(u["top"]) == 5
        assert any(it["target"] for it in u["top"]) == (u["rank"] <= 5)
    for h in r["heads"]:
        assert h["curve"] and h["curve"][0]["epoch"] == 1 and h["training_seconds"] is not None
        ev = evaluate(zoo, "toy", head_ref=h["name"], ks=(5,))
        for name in NAMES:
            assert h["beyond"][f"{name}@5"] == pytest.approx(ev["metrics"][f"{name}@5"], abs=1e-6)
    # the rank shown for a user is the one eval counts
    from st2si_cli.features.cache import load_feature_set
    from st2si_cli.heads.registry import user_ranks
    from st2si_cli.model.samples import TEST
    from st2si_cli.zoo.meta import Inputs

    head = zoo.get("toy/ad", kind="head")
    fs = load_feature_set(zoo, zoo.get(Inputs.of(head).first("features"), kind="features"))
    ranks = user_ranks(zoo, head, fs, ds.sequences, TEST)
    assert [u["rank"] for u in r["users"]] == [int(ranks[ds.users.index(u)]) for u in ("u3", "u7")]


def test_report_writes_nothing_to_the_zoo_and_bad_users_are_one_line(zoo, tmp_path):
    before = zoo_state(zoo.root)
    proc = run_cli(zoo, "report", "--domain", "toy", "--out", tmp_path / "r.html", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    after = zoo_state(zoo.root)
    assert after == before, {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    proc = run_cli(zoo, "report", "--domain", "toy", "--user", "nobody", "--out", tmp_path / "x.html")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "nobody" in proc.stderr
    assert not (tmp_path / "x.html").exists()
    proc = run_cli(zoo, "report", "--domain", "no-such-domain", "--out", tmp_path / "y.html")
    assert proc.returncode != 0 and proc.stderr.startswith("Error:")


def test_titles_and_user_names_are_escaped(tmp_path):
    ds = synthetic_dataset(n_users=6)
    ds.items[0]["title"] = EVIL
    ds.users[0] = "<b>user</b>"
    zoo = build_zoo(tmp_path / "zoo", {}, backbones=())
    store_dataset(zoo, ds, domain="evil", fmt="synthetic", source="synthetic")
    r = build_report(zoo, "evil", n_users=6)  # no head: the domain and the users' histories only
    html = render(r)
    assert EVIL not in html and "<b>user</b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in html
    assert "&lt;b&gt;user&lt;/b&gt;" in html
    assert not re.search(r"<script", html, re.I)


def test_items_added_later_are_marked_new(zoo, tmp_path):
    from st2si_cli.items import add_items
    from st2si_cli.zoo.store import Zoo

    shutil.copytree(zoo.root, tmp_path / "zoo")
    z = Zoo(tmp_path / "zoo")
    (tmp_path / "new.jsonl").write_text(
        "".join(json.dumps({"item": f"n{i}", "title": f"new lamp {i}"}) + "\n" for i in range(2))
    )
    add_items(z, "toy", tmp_path / "new.jsonl")
    r = build_report(z, "toy", k=27)  # the whole grown catalog: the new items are listed
    assert r["domain"]["first_new_item"] == 25 and r["domain"]["items"] == 27
    assert [h["name"] for h in r["heads"]] == ["toy/ilp", "toy/ad"] and len(r["older_heads"]) == 2
    for u in r["users"]:
        assert {it["index"] for it in u["top"] if it["new"]} == {25, 26}
    html = render(r)
    assert 'class="badge b-new"' in html and "new lamp 1" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium installed")
def test_page_renders_in_headless_chromium_without_console_errors(page, tmp_path):
    path, _ = page

    def chromium(*args, url):
        cmd = [
            "chromium",
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
            url,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def console(stderr: str) -> list[str]:
        return [line for line in stderr.splitlines() if ":CONSOLE" in line]

    # The check can see an error: a page that logs one shows up.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('seen')</script>")
    assert any("seen" in line for line in console(chromium("--dump-dom", url=bad.as_uri()).stderr))

    shot = tmp_path / "report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars", url=path.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not console(proc.stderr), console(proc.stderr)
    png = shot.read_bytes()
    assert (
        png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000
    )  # a page of charts and tables, not a blank one
    dom = chromium("--dump-dom", url=path.as_uri())
    assert dom.returncode == 0 and not console(dom.stderr)
    assert dom.stdout.count("<svg") >= 6 and "toy/ilp" in dom.stdout and "toy/ad" in dom.stdout
