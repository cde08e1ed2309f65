"""Item text and tokenisation: attributes -> token IDs, multi-query sequences, alignment samples.

An item's text is its attributes in a fixed order: the first written as is, later ones as
` name: value`; each attribute (prefix included) is cut to `max_attr_tokens` tokens. A sequence is
`T1 [Q] T2 [Q] ... Tn [Q]`, where `[Q]` is the tokenizer's existing "." token by default (a newly
added token would keep its random embedding while the backbone is frozen). No BOS token is added.
"""

from __future__ import annotations

import html
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

ALIGNMENT_PROMPT = "Please give the index of the following item: "
NEW_QUERY_TOKEN = "[Q]"
_SPACES = re.compile(r"\s+")
# An attribute's text is cut to this many characters per token of `max_attr_tokens` before it is
# tokenised (8192 for the default 32 tokens). No vocabulary's tokens come near 256 characters on
# average, so the cut never changes the tokens kept; it bounds what tokenising one long value costs
# (a tokenizer needs a few hundred bytes per character of its input).
ATTR_CHARS_PER_TOKEN = 256
# Characters tokenised in one call, at most (a batch is cut early when its texts add up to more).
BATCH_CHARS = 1 << 20
_warned_cut = False
_LATER_FIELDS = {
    "trim_periods": False,
    "positions": "all",
}  # TextConfig fields newer than the feature-cache format


@dataclass(frozen=True)
class TextConfig:
    """How items become tokens. Part of the feature-cache key and recorded in every head."""

    attributes: tuple[str, ...] = ("title",)  # attribute order; the first is written without a name
    max_attr_tokens: int = 32  # cap per attribute, its ` name: ` prefix included
    query: str = "dot"  # "dot": the tokenizer's existing "." token; "new": an added [Q] token
    max_items: int = 50  # items in one history window (the newest ones at inference)
    max_tokens: int = 1024  # token budget of a window (items + query tokens), newest first
    stride: int | None = (
        None  # training windows step back this many positions (None: max_items // 2), so each
    )
    # position sees at least max_items - stride earlier items
    clean: bool = True  # decode HTML entities and collapse whitespace (the authors did not)
    trim_periods: bool = (
        False  # drop periods ending an attribute, so the "." query is the item's only full stop
    )
    positions: str = "all"  # "all": windows give every training position a row; "newest": the newest window only (fast demos)

    @property
    def window_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.max_items // 2)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attributes"] = list(self.attributes)
        d["stride"] = self.window_stride  # the default written out: one cache key per behaviour
        for (
            name,
            default,
        ) in _LATER_FIELDS.items():  # added later: absent at their default, so keys stay valid
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextConfig:
        d = dict(d)
        d["attributes"] = tuple(d.get("attributes", ("title",)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def clean_text(text: str) -> str:
    return _SPACES.sub(" ", html.unescape(text)).strip()


@dataclass
class ItemTokenizer:
    """Tokenises item texts once and assembles token sequences for the model.

    `tokenizer` is a Hugging Face tokenizer; `query_id` the token ID of `[Q]`.
    """

    tokenizer: Any
    cfg: TextConfig
    query_id: int
    pad_id: int
    prompt_ids: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, tokenizer: Any, cfg: TextConfig) -> ItemTokenizer:
        return cls(
            tokenizer=tokenizer,
            cfg=cfg,
            query_id=query_token_id(tokenizer, cfg.query),
            pad_id=pad_token_id(tokenizer),
            prompt_ids=tokenizer(ALIGNMENT_PROMPT, add_special_tokens=False)["input_ids"],
        )

    def encode_items(self, items: Sequence[Mapping[str, Any]], batch: int = 2048) -> list[list[int]]:
        """Token IDs of each item's text (without the query token), attribute caps applied."""
        out: list[list[int]] = [[] for _ in items]
        n_attr = len(self.cfg.attributes)
        # Tokenise attribute by attribute, in batches (fast tokenizers parallelise a batch).
        for a in range(n_attr):
            texts, owners = [], []
            for i, item in enumerate(items):
                parts = _one_part(item, self.cfg, a)
                if parts is not None:
                    texts.append(parts)
                    owners.append(i)
            for lo, hi in _chunks(texts, batch, BATCH_CHARS):
                ids = self.tokenizer(texts[lo:hi], add_special_tokens=False)["input_ids"]
                for owner, tok in zip(owners[lo:hi], ids):
                    out[owner].extend(tok[: self.cfg.max_attr_tokens])
        for i, ids in enumerate(out):
            if not ids:  # an item with none of the chosen attributes still needs a token
                out[i] = [self.pad_id]
        return out

    def history_window(self, item_ids: Sequence[Sequence[int]]) -> int:
        """How many of the newest items fit: at most max_items and max_tokens (queries counted)."""
        total, kept = 0, 0
        for ids in reversed(item_ids):
            cost = len(ids) + 1
            if kept >= self.cfg.max_items or (kept > 0 and total + cost > self.cfg.max_tokens):
                break
            total += cost
            kept += 1
        return kept

    def windows(self, item_ids: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
        """Windows that give every query position of a history exactly one feature, oldest first.

        Returns (start, used, end): the window holds items [start, end) (at most max_items and
        max_tokens, as `history_window`), and its queries at positions [used, end) are the ones used.
        The newest window ends at the last item; each earlier one ends where the next one's used
        part begins. A window uses its newest min(stride, m - (max_items - stride)) positions, but at
        least half of its m items (the token budget can make windows short), and all of them when it
        starts at the first item. So a position sees at least max_items - stride earlier items (or half
        its window, or all earlier items where there are fewer), and the pass costs at most about
        max_items / stride times one pass over the history.
        """
        stride = self.cfg.window_stride
        if not 1 <= stride <= self.cfg.max_items:
            raise ValueError(f"stride must be between 1 and max_items ({self.cfg.max_items}), not {stride}")
        context = self.cfg.max_items - stride
        out: list[tuple[int, int, int]] = []
        end = len(item_ids)
        while end > 0:
            m = self.history_window(item_ids[:end])
            start = end - m
            used = 0 if start == 0 else end - max(min(stride, m - context), -(-m // 2))
            out.append((start, used, end))
            end = used
        return out[::-1]

    def sequence(self, item_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
        """`T1 [Q] ... Tn [Q]` for already-windowed items; returns (tokens, query positions)."""
        tokens: list[int] = []
        positions: list[int] = []
        for ids in item_ids:
            tokens.extend(ids)
            positions.append(len(tokens))
            tokens.append(self.query_id)
        return tokens, positions

    def alignment(self, ids: Sequence[int]) -> list[int]:
        """`Please give the index of the following item: T [Q]`; the query is the last token."""
        return [*self.prompt_ids, *ids, self.query_id]


def _chunks(texts: Sequence[str], most: int, chars: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of `texts`: at most `most` texts each, and at most `chars` characters unless one
    text alone is longer."""
    out, lo, size = [], 0, 0
    for i, t in enumerate(texts):
        if i > lo and (i - lo >= most or size + len(t) > chars):
            out.append((lo, i))
            lo, size = i, 0
        size += len(t)
    if lo < len(texts):
        out.append((lo, len(texts)))
    return out


def attr_char_cap(cfg: TextConfig) -> int:
    """The most characters of one attribute's value that are tokenised (`ATTR_CHARS_PER_TOKEN`)."""
    return max(1, cfg.max_attr_tokens) * ATTR_CHARS_PER_TOKEN


def _warn_cut(length: int, cap: int) -> None:
    """Report the first attribute cut in a process on stderr, once."""
    global _warned_cut
    if not _warned_cut:
        _warned_cut = True
        sys.stderr.write(
            f"Warning: an item attribute of {length:,} characters was cut to its first {cap:,} before "
            "tokenising (the model reads only its first tokens); later cuts are not reported.\n"
        )


def _one_part(item: Mapping[str, Any], cfg: TextConfig, a: int) -> str | None:
    name = cfg.attributes[a]
    value = item.get(name)
    if value is None or value == "":
        return None
    cap = attr_char_cap(cfg)
    value = str(value)
    length = len(value)
    if length > 16 * cap:  # cleaning is not run over more than real text could shrink to the cap
        value = value[: 16 * cap]
    if cfg.clean:
        value = clean_text(value)
    if cfg.trim_periods:
        value = value.rstrip(" .")
    if not value:
        return None
    if len(value) > cap or length > 16 * cap:
        _warn_cut(length, cap)
        value = value[:cap]
    return value if a == 0 else f" {name}: {value}"


def query_token_id(tokenizer: Any, query: str) -> int:
    if query == "dot":
        ids = tokenizer(".", add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"'.' is not a single token for this tokenizer ({ids})")
        return ids[0]
    if query == "new":
        tid = tokenizer.convert_tokens_to_ids(NEW_QUERY_TOKEN)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {NEW_QUERY_TOKEN} token; add it first")
        return tid
    raise ValueError(f"query must be 'dot' or 'new', not {query!r}")


def pad_token_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0
