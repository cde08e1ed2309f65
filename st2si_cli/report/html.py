"""The report as one self-contained HTML page: inline CSS and SVG, no script, no external resource.

Every text from the data (titles, names, user keys, commands) goes through `html.escape`.
"""

from __future__ import annotations

from html import escape
from typing import Any

from st2si_cli.report.svg import bar_chart, color, line_chart

BEYOND = (
    ("ItemCoverage", "Coverage"),
    ("AveragePopularity", "Avg\u00a0pop."),
    ("GiniIndex", "Gini"),
    ("ShannonEntropy", "Entropy"),
    ("TailPercentage", "Tail\u00a0%"),
)

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#111827;
 background:#f9fafb;margin:0;padding:24px 32px 48px;max-width:1400px}
h1{font-size:26px;margin:0 0 2px}h2{font-size:19px;margin:30px 0 10px;border-bottom:2px solid #e5e7eb;padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px}
.sub{color:#4b5563;margin:0 0 8px}.note{color:#374151;margin:6px 0}.small{font-size:12px;color:#4b5563}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}.card span{color:#6b7280;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:10px}
figure.head{min-width:380px}figcaption{font-size:12px;color:#4b5563;max-width:380px}
figure.head figcaption{max-width:760px}
.chart .ct{font-size:13px;font-weight:600;fill:#111827}.chart .cl{font-size:11px;fill:#4b5563}
.chart .tk{font-size:10px;fill:#4b5563}.chart .grid{stroke:#eef0f3}.chart .axis{stroke:#9ca3af}
table{border-collapse:collapse;background:#fff;border:1px solid #e5e7eb}
td:first-child{white-space:nowrap}
th,td{padding:4px 7px;border-bottom:1px solid #eef0f3;text-align:left;vertical-align:top}
.scroll{overflow-x:auto;max-width:100%}table.heads{font-size:13px}table.heads td{white-space:nowrap}
th{background:#f3f4f6;font-size:12px;color:#374151;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.default td{background:#eff6ff}tr.ref td{background:#f5f5f4;font-style:italic}
.badge{display:inline-block;font-size:10px;font-weight:600;border-radius:4px;padding:0 5px;margin-left:5px;
 vertical-align:1px;font-style:normal}
.b-default{background:#2563eb;color:#fff}.b-new{background:#16a34a;color:#fff}.b-ref{background:#6b7280;color:#fff}
.b-hit{background:#dc2626;color:#fff}.b-seen{background:#e5e7eb;color:#374151}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.users{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:14px}
.user{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px}
.user .cols{display:grid;grid-template-columns:1fr 1.25fr;gap:12px}
.user ol{margin:0;padding-left:24px}.user li{margin:1px 0}
.user table{width:100%;border:none}.user td{padding:2px 6px}
tr.hit td{background:#fef2f2;font-weight:600}
.held{margin-top:8px;padding:6px 10px;background:#f3f4f6;border-radius:6px}
pre{background:#111827;color:#e5e7eb;padding:10px 12px;border-radius:6px;overflow-x:auto;font-size:12px;
 white-space:pre-wrap;word-break:break-all;margin:4px 0 12px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;font-size:13px}dt{font-weight:600}dd{margin:0}
"""


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return escape(str(v))


def _seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


def _title(item: dict[str, Any]) -> str:
    title = item.get("title")
    text = escape(str(title)) if title not in (None, "") else f"item {escape(str(item.get('id')))}"
    return text + (
        '<span class="badge b-new" title="added by st2si items add">new</span>' if item.get("new") else ""
    )


def _domain(r: dict[str, Any]) -> str:
    d = r["domain"]
    h = d["history_length"]
    p = d["popularity"]
    cards = [
        (f"{d['items']:,}", "items in the catalog"),
        (f"{d['users']:,}", "users"),
        (f"{d['interactions']:,}", "interactions"),
        (f"{h['median']:g}", f"median history length ({h['min']}–{h['max']}, mean {h['mean']})"),
        (f"{p['top_20pct_share'] * 100:.0f}%", "of training interactions go to the top 20% of items"),
    ]
    if d["retired"]:
        cards.append((f"{d['retired']:,}", "retired items"))
    if d["first_new_item"] is not None:
        cards.append((f"{d['items'] - d['first_new_item']:,}", "items added by st2si items add"))
    hist = bar_chart(
        [(str(lo), f"{lo}" if lo == hi else f"{lo}–{hi} items", n) for lo, hi, n in h["histogram"]],
        title="History lengths",
        x_label="items in a user's history",
        y_label="users",
    )
    tail = line_chart(
        [("items", [(x, max(y, 0.5)) for x, y in p["points"]])],
        title="Item popularity (long tail)",
        x_label="item rank by popularity (log)",
        y_label="training interactions (log)",
        x_log=True,
        y_log=True,
        markers=False,
    )
    versions = d["catalog_versions"]
    vtext = ""
    if len(versions) > 1:
        vtext = '<p class="note">Catalog versions: ' + "; ".join(
            f"v{v['version']} {escape(str(v['change']))} ({v['items']:,} items, {v['retired']} retired)"
            for v in versions
        )
        vtext += ".</p>"
    never = f" {p['items_never_seen']:,} items have no training interaction." if p["items_never_seen"] else ""
    return (
        '<section id="domain"><h2>The domain</h2><div class="cards">'
        + "".join(f'<div class="card"><b>{escape(a)}</b><span>{escape(b)}</span></div>' for a, b in cards)
        + f'</div><div class="charts"><figure>{hist}</figure><figure>{tail}'
        + f"<figcaption>The most popular item has {p['max']:,} training interactions, the median item "
        + f"{p['median']:g}.{never}</figcaption></figure></div>{vtext}</section>"
    )


def _heads(r: dict[str, Any]) -> str:
    k = r["k"]
    if not r["heads"]:
        name = escape(str(r["domain"]["name"]))
        return (
            '<section id="heads"><h2>Heads</h2><p class="note">No head for this catalog yet: '
            f"<code>st2si adapt --domain {name}</code> trains one.</p></section>"
        )
    cols = [
        "Head",
        "Kind",
        "Backbone",
        "Valid NDCG@10",
        "Test NDCG@10",
        "Recall@10",
        "MRR",
        *(f"{short} @{k}" for _, short in BEYOND),
        "Best epoch",
        "Training",
    ]
    rows = []
    for i, h in enumerate(r["heads"]):
        cls = "default" if h["default"] else ("ref" if h["id_only_reference"] else "")
        badges = '<span class="badge b-default">default</span>' if h["default"] else ""
        if h["id_only_reference"]:
            badges += '<span class="badge b-ref">ID-only SASRec</span>'
        beyond = h["beyond"] or {}
        cells = [
            f'<td><span class="swatch" style="background:{color(i)}"></span>{escape(h["name"])}{badges}</td>',
            f"<td>{escape(h['kind'])}</td>",
            f"<td>{escape(h['backbone'])}</td>",
            f'<td class="n">{_num(h["valid"].get("NDCG@10"))}</td>',
            f'<td class="n">{_num(h["test"].get("NDCG@10"))}</td>',
            f'<td class="n">{_num(h["test"].get("Recall@10"))}</td>',
            f'<td class="n">{_num(h["test"].get("MRR"))}</td>',
        ]
        for name, _ in BEYOND:
            v = beyond.get(f"{name}@{k}")
            digits = 1 if name == "AveragePopularity" else 4
            cells.append(f'<td class="n">{_num(v, digits) if v is not None else "–"}</td>')
        of = f" of {h['epochs']}" if h["epochs"] else ""
        cells.append(f'<td class="n">{_num(h["best_epoch"])}{of}</td>')
        cells.append(f'<td class="n">{_seconds(h["training_seconds"])}</td>')
        rows.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    notes = [h for h in r["heads"] if h["beyond_note"]]
    dh = r["default_head"]
    why = f"<b>Default head: {escape(str(dh['name']))}</b>, {escape(dh['reason'])}. "
    why += (
        "Without <code>--head</code>, <code>eval</code> and <code>recommend</code> use the domain's default "
        "head: the one pinned with <code>st2si zoo default</code>, else the best on validation NDCG@10."
    )
    if dh["best_on_validation"] and dh["best_on_validation"] != dh["name"]:
        why += (
            f" Best on validation NDCG@10: <b>{escape(dh['best_on_validation'])}</b> "
            "(<code>st2si zoo default DOMAIN --clear</code> makes the best the default)."
        )
    elif dh["best_on_validation"]:
        why += " It is also the best on validation NDCG@10."
    ref = r["reference"]
    reftext = (
        f'<p class="note">Reference: <b>{escape(ref["name"])}</b>, the in-tool ID-only SASRec (a sequence adapter '
        f"without item text); test NDCG@10 {_num(ref['test'].get('NDCG@10'))}."
        + (f" {escape(dh['lm_over_id_only'])}." if dh.get("lm_over_id_only") else "")
        + "</p>"
        if ref
        else ""
    )
    return (
        f'<section id="heads"><h2>Heads ({len(r["heads"])})</h2><p class="note">{why}</p>{reftext}'
        + '<div class="scroll"><table class="heads"><thead><tr>'
        + "".join(
            f'<th class="{"n" if j >= 3 else ""}">{"<br>".join(escape(w) for w in c.split(" "))}</th>'
            for j, c in enumerate(cols)
        )
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
        + f'<p class="small">Accuracy: the heads\' recorded metrics (full ranking, {escape(r["split"])} targets). '
        + f"Coverage … Tail % at k = {k}: every test user's top {k} from one scoring pass of the cached features "
        + "(RecBole's definitions; below).</p>"
        + "".join(f'<p class="small">{escape(h["name"])}: {escape(h["beyond_note"])}</p>' for h in notes)
        + (
            '<p class="small">Not shown: heads of earlier catalog versions (they refuse this one): '
            + ", ".join(escape(h["name"]) for h in r["older_heads"])
            + ".</p>"
            if r["older_heads"]
            else ""
        )
        + "</section>"
    )


def _curves(r: dict[str, Any]) -> str:
    ref = r["reference"]
    refs = [("ID-only SASRec (valid)", ref["valid"]["NDCG@10"])] if ref and "NDCG@10" in ref["valid"] else []
    figs = []
    for i, h in enumerate(r["heads"]):
        c = [color(i)]
        name = escape(h["name"])
        curve = h["curve"]
        if curve:
            best = next((p for p in curve if p["epoch"] == h["best_epoch"]), None)
            loss = line_chart(
                [(h["name"], [(p["epoch"], p["loss"]) for p in curve])],
                title="Training loss",
                x_label="epoch",
                y_label="loss",
                colors=c,
            )
            ndcg = line_chart(
                [(h["name"], [(p["epoch"], p["valid_NDCG@10"]) for p in curve])],
                title="Validation NDCG@10",
                x_label="epoch",
                y_label="NDCG@10",
                refs=[] if h["id_only_reference"] else refs,
                colors=c,
                mark=(best["epoch"], best["valid_NDCG@10"]) if best else None,
            )
            cap = f"{len(curve)} epochs; the ringed one was kept (best validation NDCG@10)."
            figs.append(
                f'<figure class="head"><h3>{name}</h3><div class="charts">{loss}{ndcg}</div>'
                f"<figcaption>{escape(cap)}</figcaption></figure>"
            )
        elif any(t.get("w") is not None for t in h["sweep"] or []):  # a sweep over the fusion weight
            pts = [(t.get("w"), t.get("valid_ndcg10")) for t in h["sweep"] if t.get("w") is not None]
            chart = line_chart(
                [(h["name"], pts)],
                title="Validation NDCG@10 by fusion weight",
                x_label="w (weight of the ILP)",
                y_label="NDCG@10",
                refs=refs,
                colors=c,
                x_int=False,
                mark=(h["fusion_w"], dict(pts).get(h["fusion_w"])) if h["fusion_w"] is not None else None,
            )
            figs.append(
                f'<figure class="head"><h3>{name}</h3>{chart}<figcaption>No epochs: a fusion\'s weight is chosen on '
                f"validation (ringed).</figcaption></figure>"
            )
        else:
            figs.append(
                f'<figure class="head"><h3>{name}</h3><p class="small">No per-epoch record.</p></figure>'
            )
    return (
        '<section id="curves"><h2>Training curves</h2><div class="charts">'
        + "".join(figs)
        + "</div></section>"
    )


def _users(r: dict[str, Any]) -> str:
    dh = r["default_head"]
    k = r["k"]
    cards = []
    for u in r["users"]:
        hist = "".join(f"<li>{_title(it)}</li>" for it in u["history"])
        start = u["history_length"] - len(u["history"]) + 1
        rows = []
        for j, it in enumerate(u["top"], 1):
            badge = '<span class="badge b-hit">held-out item</span>' if it["target"] else ""
            badge += '<span class="badge b-seen">in history</span>' if it["seen"] else ""
            rows.append(
                f'<tr class="{"hit" if it["target"] else ""}"><td class="n">{j}</td><td>{_title(it)}{badge}</td>'
                f'<td class="n">{it["score"]:.3f}</td></tr>'
            )
        top = (
            "<table><thead><tr><th class='n'>#</th><th>Recommended</th><th class='n'>score</th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
            if rows
            else '<p class="small">Not scored (see the heads table).</p>'
        )
        rank = (
            f"ranked <b>{u['rank']:,}</b> of {r['domain']['items']:,}"
            if u["rank"] is not None
            else "not ranked"
        )
        cards.append(
            f'<div class="user"><h3>User {escape(str(u["user"]))} '
            f'<span class="small">({u["history_length"]} items before the held-out one)</span></h3>'
            f'<div class="cols"><div><div class="small">Recent history, newest last</div>'
            f'<ol start="{start}">{hist}</ol></div><div><div class="small">Top {k} of {escape(str(dh["name"]))}</div>'
            f"{top}</div></div>"
            f'<div class="held">Held-out item: {_title(u["target"])}, {rank}.</div></div>'
        )
    how = "given by --user" if r.get("users_given") else f"drawn with seed {r['seed']}"
    return (
        f'<section id="users"><h2>Recommendations for {len(r["users"])} users</h2>'
        f'<p class="note">Users {escape(how)}; each history without its last item (the test target, held out), '
        f"ranked by the default head over the whole catalog. Items marked "
        f'<span class="badge b-new">new</span> were added by <code>st2si items add</code>.</p>'
        f'<div class="users">{"".join(cards)}</div></section>'
    )


def _reproduce(r: dict[str, Any]) -> str:
    blocks = [
        f"<h3>{escape(h['name'])}</h3><pre>{escape(chr(10).join(h['commands']))}</pre>" for h in r["heads"]
    ]
    cmd = r.get("command")
    top = f'<p class="note">This page: <code>{escape(cmd)}</code></p>' if cmd else ""
    return f'<section id="reproduce"><h2>Reproduce</h2>{top}' + "".join(blocks) + "</section>"


def _definitions(r: dict[str, Any]) -> str:
    k = r["k"]
    return (
        '<section id="definitions"><h2>Beyond-accuracy metrics</h2><dl>'
        f"<dt>Coverage@{k}</dt><dd>distinct items in all users' top {k}, over the catalog size.</dd>"
        f"<dt>Avg pop.@{k}</dt><dd>mean training interactions of a user's top-{k} items, averaged over users "
        "(lower: less popular items).</dd>"
        f"<dt>Gini@{k}</dt><dd>inequality of how often each catalog item is recommended: 0 all equally, "
        "near 1 a few items everywhere.</dd>"
        f"<dt>Entropy@{k}</dt><dd>Shannon entropy of the recommended items' shares, divided by the number of "
        "distinct items recommended (RecBole's normalisation).</dd>"
        f"<dt>Tail %@{k}</dt><dd>share of a user's top {k} in the long tail (the 10% of items with the fewest "
        "training interactions, among items that have any), averaged over users.</dd>"
        "</dl></section>"
    )


def render(report: dict[str, Any]) -> str:
    """The page for a `build_report` result."""
    d = report["domain"]
    head = (
        f'<header><h1>{escape(str(d["name"]))}</h1><p class="sub">st2si report · {len(report["heads"])} heads · '
        f"generated {escape(report['generated'])} in {report['seconds']:.1f} s · dataset "
        f"{escape(d['dataset_id'][:12])} · {escape(str(d['source'] or ''))}</p></header>"
    )
    body = head + _domain(report) + _heads(report)
    if report["heads"]:
        body += _curves(report)
    body += _users(report) + _reproduce(report) + _definitions(report)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>st2si report: {escape(str(d['name']))}</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
