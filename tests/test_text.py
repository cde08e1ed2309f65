"""Samples and item text on a tiny randomly initialised OPT: roles and targets, history windows,
attribute caps and cleaning."""

from __future__ import annotations

from st2si_cli.data.prepare import load_dataset
from st2si_cli.model.samples import ALIGN, TEST, TRAIN, VALID, build_samples
from st2si_cli.model.text import ItemTokenizer, TextConfig


def test_samples_put_test_target_last_and_valid_before_it(zoo, backbone):
    ds = load_dataset(zoo, "toy")
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig())
    toks = itok.encode_items(ds.items)
    samples = build_samples(ds, itok, toks)
    assert len(samples) == ds.n_users + ds.n_items
    for u, s in enumerate(samples[: ds.n_users]):
        seq = ds.sequences[u]
        assert s.roles[-1] == TEST and s.targets[-1] == seq[-1]
        assert s.roles[-2] == VALID and s.targets[-2] == seq[-2]
        assert all(r == TRAIN for r in s.roles[:-2])
        assert all(s.tokens[p] == itok.query_id for p in s.query_pos)
        assert s.tokens[-1] == itok.query_id  # the last [Q] closes the history without its test item
    align = samples[ds.n_users]
    assert align.roles == [ALIGN] and align.targets == [0]
    assert align.tokens[: len(itok.prompt_ids)] == itok.prompt_ids


def test_history_window_keeps_newest_items_within_item_and_token_caps(backbone):
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig(max_items=3, max_tokens=12))
    items = [[1] * 3, [2] * 3, [3] * 3, [4] * 3]  # 4 tokens each with the query
    assert itok.history_window(items) == 3
    itok2 = ItemTokenizer.create(backbone.tokenizer, TextConfig(max_items=50, max_tokens=9))
    assert itok2.history_window(items) == 2
    # The newest item is always kept, even when it alone is over budget.
    assert itok2.history_window([[5] * 40]) == 1


def test_attribute_cap_and_html_cleaning(backbone):
    cfg = TextConfig(attributes=("title", "brand"), max_attr_tokens=5)
    itok = ItemTokenizer.create(backbone.tokenizer, cfg)
    [ids] = itok.encode_items([{"title": "A &amp;  B" + " x" * 40, "brand": "Acme"}])
    assert len(ids) <= 10
    assert backbone.tokenizer.decode(ids[:5]) == "A & B"
