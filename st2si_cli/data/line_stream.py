"""Input lines in batches as they arrive, and deterministic shards of them (for `recommend`).

`line_batches` reads a file descriptor directly: it hands back what has arrived as soon as no more
input is ready (or a batch is full), so a pipe or FIFO gets answers for its first lines before it is
closed. Each line comes with its 1-based number; a line that is not UTF-8 comes as None, and a line
over `MAX_LINE_BYTES` as a `TooLong` (never held in memory whole; the caller reports either with
the number). A byte-order mark on line 1 and a CR before each LF are dropped.

`Shard` keeps the non-blank lines of part i of n: contiguous blocks, so the outputs of parts 0..n-1
concatenated are the output of the whole input, in order.
"""

from __future__ import annotations

import io
import os
import select
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

READ_SIZE = 1 << 16
# The longest input line: one history (hundreds of items with their texts) takes a few tens of KB; a
# line costs a few hundred bytes of memory per byte once parsed and tokenised, so longer lines are
# refused rather than read.
MAX_LINE_BYTES = 4 << 20


@dataclass(frozen=True)
class TooLong:
    """A line longer than `limit` bytes, skipped without being kept."""

    limit: int

    def message(self) -> str:
        return f"line longer than {self.limit / (1 << 20):g} MiB (the most one history line may hold)"


NumberedLine = tuple[int, str | TooLong | None]


def _decode(raw: bytes, n: int) -> str | None:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError, OSError):
        return None


def _ready(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def line_batches(stream: IO[Any], max_lines: int) -> Iterator[list[NumberedLine]]:
    """Batches of (line number, text) of `stream`, at most `max_lines` each, each handed back as soon
    as the input has nothing more ready. A stream without a file descriptor (io.StringIO) is read as text."""
    fd = _fileno(stream)
    if fd is None:
        yield from _object_batches(stream, max_lines)
        return
    limit = MAX_LINE_BYTES
    parts: list[bytes] = []  # the line read so far (none once it is over the limit)
    size, n = 0, 0
    batch: list[NumberedLine] = []
    while True:
        if batch and not _ready(fd):
            yield batch
            batch = []
        chunk = os.read(fd, READ_SIZE)
        if not chunk:
            break
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            size += len(piece)
            if size <= limit:
                parts.append(piece)
            else:
                parts = []
            if end < 0:
                break
            n += 1
            batch.append((n, _decode(b"".join(parts), n) if size <= limit else TooLong(limit)))
            parts, size, start = [], 0, end + 1
            if len(batch) >= max_lines:
                yield batch
                batch = []
    if size:
        n += 1
        batch.append((n, _decode(b"".join(parts), n) if size <= limit else TooLong(limit)))
    if batch:
        yield batch


def _object_batches(stream: Any, max_lines: int) -> Iterator[list[NumberedLine]]:
    """`line_batches` of a stream without a file descriptor (io.StringIO, io.BytesIO): whole lines."""
    limit = MAX_LINE_BYTES
    batch: list[NumberedLine] = []
    for n, line in enumerate(stream, start=1):
        text: str | TooLong | None
        if isinstance(line, str):
            text = line.rstrip("\n").rstrip("\r")
            size = len(text) if len(text) * 4 <= limit else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                text = TooLong(limit)
            elif n == 1:
                text = text.removeprefix("\ufeff")
        else:
            raw = line.rstrip(b"\n")
            text = _decode(raw, n) if len(raw.removesuffix(b"\r")) <= limit else TooLong(limit)
        batch.append((n, text))
        if len(batch) >= max_lines:
            yield batch
            batch = []
    if batch:
        yield batch


def is_blank(line: NumberedLine) -> bool:
    return isinstance(line[1], str) and not line[1].strip()


@dataclass
class Shard:
    """Part `index` (0-based) of `count`: the non-blank lines [total*index//count, total*(index+1)//count)."""

    index: int
    count: int
    total: int  # non-blank lines in the whole input
    _seen: int = 0

    @classmethod
    def parse(cls, text: str) -> tuple[int, int]:
        """`"i/n"` -> (i, n) with 0 <= i < n; ValueError otherwise."""
        i, sep, n = text.partition("/")
        if not sep or not i.strip().isdigit() or not n.strip().isdigit():
            raise ValueError(f"{text!r} is not I/N (e.g. 0/4)")
        index, count = int(i), int(n)
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"{text!r}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
        return index, count

    def keep(self, batch: Iterable[NumberedLine]) -> list[NumberedLine]:
        lo = self.total * self.index // self.count
        hi = self.total * (self.index + 1) // self.count
        kept = []
        for line in batch:
            if is_blank(line):
                continue
            if lo <= self._seen < hi:
                kept.append(line)
            self._seen += 1
        return kept


def count_nonblank(batches: Iterable[list[NumberedLine]]) -> int:
    return sum(not is_blank(line) for batch in batches for line in batch)
