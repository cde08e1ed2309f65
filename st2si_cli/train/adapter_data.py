"""A user's history rows in a `FeatureSet`, cut into the sequence adapter's windows and batches.

Each user's history rows are positions j = 0..n-2 of its sequence: the feature of the query after
item seq[j], target seq[j + 1]. Windows are right-padded; with a causal mask, real steps never see padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from st2si_cli.features.cache import FeatureSet
from st2si_cli.model.samples import ALIGN, TEST, TRAIN, VALID

UserRows = tuple[Tensor, list[int]]  # row of each position j = 0..n-2, and the ID at it (seq[j])


def user_sequences(fs: FeatureSet, sequences: Sequence[Sequence[int]]) -> list[UserRows]:
    """Each user's history rows in position order, checked against `sequences`.

    Raises ValueError naming the first user whose rows are not positions 0..n-2 with targets
    seq[1..n-1] and roles TRAIN.., VALID, TEST.
    """
    hist = torch.nonzero(fs.roles != ALIGN).flatten()
    owners = fs.owner[hist]
    n_users = len(sequences)
    if owners.numel() and (int(owners.min()) < 0 or int(owners.max()) >= n_users):
        raise ValueError(f"history rows name users outside [0, {n_users})")
    rows = hist[torch.sort(owners, stable=True).indices]  # by user, increasing row index within a user
    counts = torch.bincount(owners, minlength=n_users).tolist()
    expected_targets: list[int] = []
    expected_roles: list[int] = []
    for u, seq in enumerate(sequences):
        n = len(seq)
        if n < 3 or counts[u] != n - 1:
            raise ValueError(
                f"user {u}: {counts[u]} history rows for a sequence of {n} items (need n >= 3, n - 1 rows)"
            )
        expected_targets += list(seq[1:])
        expected_roles += [TRAIN] * (n - 3) + [VALID, TEST]
    bad = (fs.targets[rows] != torch.tensor(expected_targets, dtype=torch.long)) | (
        fs.roles[rows].long() != torch.tensor(expected_roles, dtype=torch.long)
    )
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        u = int(torch.searchsorted(torch.tensor(counts).cumsum(0), first, right=True))
        raise ValueError(f"user {u}: history rows do not line up with its sequence (targets or roles differ)")
    return [(r, list(seq[:-1])) for r, seq in zip(torch.split(rows, counts), sequences)]


def training_windows(users: Sequence[UserRows], max_len: int) -> list[UserRows]:
    """Each user's TRAIN positions (targets seq[1..n-3]) cut into chunks of at most `max_len`.

    Chunks are cut from the newest position backwards (only the oldest one may be short) and are
    windows of the user's own positions: every training position is trained exactly once, with the
    steps before it in its chunk as context, so context restarts at a chunk boundary.
    """
    out: list[UserRows] = []
    for rows, ids in users:
        m = len(ids) - 2  # positions 0..n-4 train; n-3 is VALID, n-2 TEST
        for end in range(m, 0, -max_len):
            start = max(0, end - max_len)
            out.append((rows[start:end], ids[start:end]))
    return out


def eval_windows(users: Sequence[UserRows], role: int, max_len: int) -> list[UserRows]:
    """Newest `max_len` positions up to the VALID (0..n-3) or TEST (0..n-2) position of each user."""
    if role not in (VALID, TEST):
        raise ValueError(f"role must be VALID or TEST; got {role}")
    out: list[UserRows] = []
    for rows, ids in users:
        end = len(ids) - (1 if role == VALID else 0)
        start = max(0, end - max_len)
        out.append((rows[start:end], ids[start:end]))
    return out


def collate(
    fs: FeatureSet, windows: Sequence[UserRows], n_items: int, device: Any = "cpu", *, feats: bool = True
) -> tuple[Tensor, ...]:
    """Right-padded (feats [B, T, d], ids [B, T], lengths [B], targets [B, T] with -100 at padding).

    `feats=False` (an ID-only adapter reads none): feats is [B, T, 0], nothing gathered."""
    lengths = torch.tensor([len(ids) for _, ids in windows], dtype=torch.long)
    b, t = len(windows), int(lengths.max())
    rows = torch.zeros(b, t, dtype=torch.long)
    ids = torch.full((b, t), n_items, dtype=torch.long)
    for k, (r, i) in enumerate(windows):
        rows[k, : len(i)] = r
        ids[k, : len(i)] = torch.tensor(i, dtype=torch.long)
    pad = torch.arange(t)[None, :] >= lengths[:, None]
    targets = fs.targets[rows].masked_fill(pad, -100)
    if not feats:
        return torch.zeros(b, t, 0, device=device), ids.to(device), lengths.to(device), targets.to(device)
    x = fs.feats[rows].float().masked_fill(pad[..., None], 0.0)
    return x.to(device), ids.to(device), lengths.to(device), targets.to(device)


def item_text_features(fs: FeatureSet, n_items: int) -> Tensor:
    """The ALIGN row's feature of every item (its own text), [n_items, d]."""
    rows = fs.rows(ALIGN)
    out = torch.zeros(n_items, fs.feats.shape[1])
    seen = torch.zeros(n_items, dtype=torch.bool)
    out[fs.owner[rows]] = fs.feats[rows].float()
    seen[fs.owner[rows]] = True
    if not bool(seen.all()):
        raise ValueError(
            f"{int((~seen).sum())} items have no ALIGN row; use_text needs features with alignment"
        )
    return out
