"""Item-to-item co-occurrence ("people who watched this also watched"), time-windowed and decayed.

Two events of one user co-occur when they are at most ``window`` steps apart in the user's
sequence and at most ``max_gap_days`` apart in time. A pair weighs

    exp(-gap / pair_tau) * 0.5 ** (age / half_life)

(closer in time = more related; recent pairs count more than old ones, ``age`` measured from
the end of the log). Co-occurrence is symmetric; it is normalised by the items' own (decayed)
counts, ``c_ij / ((n_i + s) ** alpha * (n_j + s) ** (1 - alpha))``: alpha = 0.5 is cosine,
higher alpha favours popular neighbours less for popular seeds; ``s`` damps the similarity of
rarely seen items. Each item keeps its ``neighbours`` best; ``similar(ids, k)`` serves them on
their own ("similar items"), and ``scores`` sums a user's recent items' neighbour lists, the
most recent behaviour weighing most.

Notation: N catalog size (ids 0, 1 reserved), K neighbours kept, Q queries, L history length.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl

from bstrec.features.spec import N_RESERVED
from bstrec.retrieval.popular import SECONDS_PER_DAY, decay_weights

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ItemCFConfig:
    """(``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    window: int = 10  # steps apart in a user's sequence
    max_gap_days: float = 30.0  # time apart
    pair_tau_days: float = 7.0  # pair weight exp(-gap / tau); 0 = no gap decay
    half_life_days: float = 180.0  # recency decay of a pair; 0 = none
    alpha: float = 0.5
    smoothing: float = 5.0
    neighbours: int = 200
    positives_only: bool = False  # co-occurrence of label-1 events only
    query_decay: float = 0.9  # weight of a history item per step back from the most recent

    def __post_init__(self) -> None:
        if self.window < 1 or self.neighbours < 1:
            raise ValueError("window and neighbours must be >= 1")
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 < self.query_decay <= 1.0:
            raise ValueError("alpha must be in [0, 1] and query_decay in (0, 1]")


class ItemCF:
    """Neighbour lists: ``ids`` (N, K) (0 = none) and ``sims`` (N, K) best first."""

    def __init__(self, config: ItemCFConfig, ids: I64, sims: F32) -> None:
        self.config = config
        self.ids = ids
        self.sims = sims

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def fit(cls, frame: pl.DataFrame, n_items: int, config: ItemCFConfig | None = None) -> ItemCF:
        """From encoded sample rows (``user_id``, ``item_id``, ``item``, ``timestamp``, ``label``)."""
        cfg = config or ItemCFConfig()
        if cfg.positives_only:
            frame = frame.filter(pl.col("label") == 1)
        ev = frame.select("user_id", "item_id", "item", "timestamp").sort(
            ["user_id", "timestamp", "item_id"])
        user = ev["user_id"].rank("dense").to_numpy().astype(np.int64)
        item = ev["item"].to_numpy().astype(np.int64)
        ts = ev["timestamp"].to_numpy().astype(np.float64)
        now = float(ts.max()) if len(ts) else 0.0
        recency = decay_weights(ts, now, cfg.half_life_days)
        counts = np.bincount(item, weights=recency, minlength=n_items)
        keys, weights = [], []
        for k in range(1, cfg.window + 1):
            a, b = item[:-k], item[k:]
            gap = ts[k:] - ts[:-k]
            ok = (user[:-k] == user[k:]) & (gap <= cfg.max_gap_days * SECONDS_PER_DAY) \
                & (a >= N_RESERVED) & (b >= N_RESERVED) & (a != b)
            if not ok.any():
                continue
            w = recency[k:][ok]
            if cfg.pair_tau_days > 0:
                w = w * np.exp(-gap[ok] / (cfg.pair_tau_days * SECONDS_PER_DAY))
            keys += [a[ok] * n_items + b[ok], b[ok] * n_items + a[ok]]
            weights += [w, w]
        if not keys:
            empty = np.zeros((n_items, 0))
            return cls(cfg, empty.astype(np.int64), empty.astype(np.float32))
        uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
        co = np.bincount(inv, weights=np.concatenate(weights))
        i, j = uniq // n_items, uniq % n_items
        s = cfg.smoothing
        sim = co / ((counts[i] + s) ** cfg.alpha * (counts[j] + s) ** (1.0 - cfg.alpha))
        order = np.lexsort((-sim, i))  # by item, then similarity descending
        i, j, sim = i[order], j[order], sim[order]
        start = np.searchsorted(i, i, side="left")
        rank = np.arange(len(i)) - start
        keep = rank < cfg.neighbours
        K = int(min(cfg.neighbours, rank.max() + 1))
        ids = np.zeros((n_items, K), dtype=np.int64)
        sims = np.zeros((n_items, K), dtype=np.float32)
        ids[i[keep], rank[keep]] = j[keep]
        sims[i[keep], rank[keep]] = sim[keep]
        return cls(cfg, ids, sims)

    def similar(self, items: npt.ArrayLike, k: int) -> tuple[F32, I64]:
        """(n,) item ids -> their k most similar items: scores (n, k), ids (n, k) (-1 = none)."""
        it = np.asarray(items, dtype=np.int64)
        ok = (it >= 0) & (it < self.size)
        ids = np.full((len(it), k), -1, dtype=np.int64)
        sims = np.full((len(it), k), -np.inf, dtype=np.float32)
        kk = min(k, self.ids.shape[1])
        got_ids = self.ids[np.where(ok, it, 0), :kk]
        got = (got_ids >= N_RESERVED) & ok[:, None]
        ids[:, :kk] = np.where(got, got_ids, -1)
        sims[:, :kk] = np.where(got, self.sims[np.where(ok, it, 0), :kk], -np.inf)
        return sims, ids

    def scores(self, hist_item: npt.ArrayLike, hist_mask: npt.ArrayLike) -> F32:
        """Right-aligned histories (Q, L) and their mask -> (Q, N) summed neighbour similarities,
        each history item weighted ``query_decay ** steps_back``."""
        hist = np.asarray(hist_item, dtype=np.int64)
        Q, L = hist.shape
        steps_back = np.arange(L - 1, -1, -1, dtype=np.float32)  # (L,)
        w = (np.float32(self.config.query_decay) ** steps_back) * np.asarray(hist_mask)  # (Q, L)
        nbr = self.ids[hist]  # (Q, L, K)
        val = self.sims[hist] * w[..., None].astype(np.float32)  # (Q, L, K)
        # the scatter-add of every neighbour's weight into its (query, item) cell
        cell = (np.arange(Q, dtype=np.int64)[:, None, None] * self.size + nbr).ravel()
        out = np.bincount(cell, weights=val.ravel(), minlength=Q * self.size).reshape(Q, self.size)
        out[:, :N_RESERVED] = 0.0  # padding neighbours land on id 0
        return out.astype(np.float32)

    def save(self, folder: str | Path) -> None:
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        np.savez(root / "item_cf.npz", ids=self.ids, sims=self.sims)
        (root / "item_cf.json").write_text(json.dumps({"config": asdict(self.config)}) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ItemCF:
        root = Path(folder)
        cfg = ItemCFConfig(**json.loads((root / "item_cf.json").read_text())["config"])
        with np.load(root / "item_cf.npz", allow_pickle=False) as z:
            return cls(cfg, z["ids"].astype(np.int64), z["sims"].astype(np.float32))
