"""Rows for items a head never trained on, from their text: the maps from an item's alignment feature
(the backbone's hidden state at the query after its own text, as in `features/cache.py`) to a head row.

- `ridge`: for the paper's ILP, a ridge regression from alignment features to the trained rows of
  the known items (features standardised per dimension; the strength chosen on a held-out tenth of
  the known items), then applied to the new items' features. Seconds, even for large catalogs.
- `text`: the text-initialised ILP's own map (`train.head.text_init`): centre on the known items'
  mean feature, scale to the initial row norm.
- the sequence adapter needs no map: it scores items through their text features, so a new item's
  feature is appended to `item_text`, and its ID embedding is the unknown ID's (zero).
- `neighbour` (any head): a new item takes what training gave its nearest known item by text (the ILP
  row; the adapter's ID embedding, its own text feature kept), so it competes like that item does,
  popularity included. The other maps place new items near the average item, below the top ranks.

Every function here returns new tensors whose existing rows are copies of the old ones, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # strengths, relative to the mean eigenvalue of X^T X
HOLDOUT = 0.1  # fraction of the known items that chooses the strength
MAX_FIT = 50_000  # known items the regression is fitted on at most (a seeded sample beyond), bounding memory


@dataclass
class RidgeMap:
    """rows = ((x - x_mean) / x_std) @ coef + y_mean, fitted on known items."""

    x_mean: Tensor
    x_std: Tensor
    coef: Tensor  # [d, h]
    y_mean: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: Tensor) -> Tensor:
        xs = (x.double() - self.x_mean) / self.x_std
        return (xs @ self.coef + self.y_mean).float()


def _ridge_solve(x: Tensor, y: Tensor, rel: list[float]) -> list[Tensor]:
    """Coefficients of centred x [n, d] -> centred y [n, h] for each relative strength (one eigh)."""
    gram = x.T @ x
    evals, evecs = torch.linalg.eigh(gram)
    proj = evecs.T @ (x.T @ y)
    scale = float(evals.clamp_min(0).mean()) or 1.0
    return [evecs @ (proj / (evals.clamp_min(0) + r * scale)[:, None]) for r in rel]


def fit_ridge(x: Tensor, y: Tensor, grid: tuple[float, ...] = RIDGE_GRID, seed: int = 0) -> RidgeMap:
    """Ridge regression from features x [n, d] to rows y [n, h]; strength by held-out MSE."""
    if x.shape[0] < 2:
        raise ValueError("ridge placement needs at least 2 known items")
    n_known = x.shape[0]
    if n_known > MAX_FIT:
        pick = torch.randperm(n_known, generator=torch.Generator().manual_seed(seed))[:MAX_FIT]
        x, y = x[pick], y[pick]
    x, y = x.double(), y.double()
    x_mean, x_std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - x_mean) / x_std
    y_mean = y.mean(0)
    yc = y - y_mean
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(HOLDOUT * x.shape[0]))
    hold, fit = perm[:n_hold], perm[n_hold:]
    trials = []
    if fit.numel() >= 2:
        mu = yc[fit].mean(0)
        xm = xs[fit].mean(0)
        for r, coef in zip(grid, _ridge_solve(xs[fit] - xm, yc[fit] - mu, list(grid))):
            pred = (xs[hold] - xm) @ coef + mu
            trials.append({"strength": r, "holdout_mse": float(((pred - yc[hold]) ** 2).mean())})
        best = min(trials, key=lambda t: t["holdout_mse"])["strength"]
    else:
        best = 1.0
    [coef] = _ridge_solve(xs, yc, [best])
    info = {
        "method": "ridge",
        "strength": best,
        "known_items": n_known,
        "fitted_on": int(x.shape[0]),
        "trials": trials,
    }
    return RidgeMap(x_mean, x_std, coef, y_mean, info)


def text_rows(x_new: Tensor, x_known: Tensor, calibration: BiasCalibration | None = None) -> Tensor:
    """The text-initialised ILP's map: centre on the known items' mean, scale to the initial row norm;
    then, with `calibration`, the component along the mean query direction set as the trained rows have it."""
    d = x_new.shape[1]
    row_norm = (1.0 / d**0.5) * (d / 3) ** 0.5  # as `train_head` computes it for init "text"
    feats = x_new.float() - x_known.float().mean(0, keepdim=True)
    rows = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-8) * row_norm
    return calibration(rows) if calibration is not None else rows


@dataclass
class BiasCalibration:
    """Every query feature shares a large common direction u (the mean training query feature; in SmolLM2
    its norm is about 95% of a typical query's). A row's component along u adds the same amount to its
    score for every user, like a popularity bias, and training sets it per item. A row made from text has
    an arbitrary component there, so half the new items would outrank every trained one for everybody.
    This sets that component to the trained rows' mean; the rest of the row is kept."""

    direction: Tensor  # [d] unit vector u
    component: float  # the trained rows' mean component along u

    @classmethod
    def fit(cls, query_feats: Tensor, trained_rows: Tensor) -> BiasCalibration:
        mean = query_feats.float().mean(0)
        u = mean / mean.norm().clamp_min(1e-8)
        return cls(u, float((trained_rows.float() @ u).mean()))

    def __call__(self, rows: Tensor) -> Tensor:
        u = self.direction.to(rows.dtype)
        return rows - (rows @ u)[:, None] * u + self.component * u


def nearest_known(x_new: Tensor, x_known: Tensor, chunk: int = 1024) -> Tensor:
    """For each new item, the index of the known item whose alignment feature is nearest: cosine after
    standardising each dimension over the known items (so no single large dimension decides)."""
    mean, std = x_known.float().mean(0), x_known.float().std(0).clamp_min(1e-6)
    known = torch.nn.functional.normalize((x_known.float() - mean) / std, dim=1)
    new = torch.nn.functional.normalize((x_new.float() - mean) / std, dim=1)
    return torch.cat([(new[i : i + chunk] @ known.T).argmax(1) for i in range(0, new.shape[0], chunk)])


def set_rows(weight: Tensor, rows: dict[int, Tensor], n_items: int) -> Tensor:
    """`weight` grown to `n_items` rows, with `rows` (item -> row) written; other rows copied as they were."""
    out = torch.zeros(n_items, weight.shape[1], dtype=weight.dtype)
    out[: weight.shape[0]] = weight
    for i, row in rows.items():
        out[i] = row.to(weight.dtype)
    return out


def extend_adapter(
    tensors: dict[str, Tensor], text: dict[int, Tensor], n_items: int, id_from: dict[int, int] | None = None
) -> dict[str, Tensor]:
    """Adapter tensors for a catalog of `n_items`: item text features set for `text` (item -> feature),
    new items' ID embeddings zero (the unknown ID's) or, with `id_from` (new item -> known item), copied
    from that known item; the unknown/pad ID moved to the end."""
    out = dict(tensors)
    if tensors["item_text"].numel():
        out["item_text"] = set_rows(tensors["item_text"], text, n_items)
    if "item_emb.weight" in tensors:
        emb = tensors["item_emb.weight"]
        n_old = emb.shape[0] - 1
        grown = torch.zeros(n_items + 1, emb.shape[1], dtype=emb.dtype)
        grown[:n_old] = emb[:n_old]
        grown[n_items] = emb[n_old]
        for i, j in (id_from or {}).items():
            grown[i] = emb[j]
        out["item_emb.weight"] = grown
    return out


def known_alignment(fs: Any, n_trained: int) -> tuple[Tensor, Tensor]:
    """(item IDs, alignment features) of the trained items in a feature cache."""
    from st2si_cli.model.samples import ALIGN

    rows = fs.rows(ALIGN)
    rows = rows[fs.targets[rows] < n_trained]
    if rows.numel() == 0:
        raise ValueError("its feature cache has no alignment rows (computed without alignment)")
    return fs.targets[rows], fs.feats[rows].float()


def neighbours(fs: Any, n_trained: int, text: dict[int, Tensor]) -> dict[int, int]:
    """New item -> its nearest trained item by alignment feature (`nearest_known`)."""
    if not text:
        return {}
    ids, x = known_alignment(fs, n_trained)
    new_ids = sorted(text)
    near = ids[nearest_known(torch.stack([text[i] for i in new_ids]), x)]
    return dict(zip(new_ids, near.tolist()))


def ilp_rows(weight: Tensor, own_map: str, placing: Any) -> tuple[dict[int, Tensor], dict[str, Any]]:
    """ILP rows for the new items of `placing` (a `base.Placing`): copies of their nearest trained items'
    rows (neighbour placement), else by the map asked for, or by the head's `own_map` (ridge or text)."""
    from st2si_cli.model.samples import TRAIN

    text, fs = placing.text, placing.fs
    if placing.id_from:
        rows = {i: weight[j].float() for i, j in placing.id_from.items()}
        return rows, {"method": "neighbour", "known_items": placing.n_trained}
    if not text:
        return {}, {"method": "none"}
    ids, x = known_alignment(fs, placing.n_trained)
    new_ids = sorted(text)
    x_new = torch.stack([text[i] for i in new_ids])
    method = placing.placement if placing.placement not in ("auto", "neighbour") else own_map
    if method == "text":
        calibration = BiasCalibration.fit(fs.feats[fs.rows(TRAIN)], weight[ids])
        rows = text_rows(x_new, x, calibration)
        info = {"method": "text", "known_items": int(ids.numel()), "bias_component": calibration.component}
    else:
        ridge = fit_ridge(x, weight[ids].float())
        rows, info = ridge(x_new), ridge.info
    return dict(zip(new_ids, rows)), info
