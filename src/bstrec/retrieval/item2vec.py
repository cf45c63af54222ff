"""item2vec: skip-gram with negative sampling over users' sessions, a match source.

Each user's behaviours, in the P1 order (timestamp, item id), are cut into sessions wherever two
consecutive behaviours are more than ``session_gap_minutes`` apart: what one sits down and does
in one go is about one intent, and items of one intent should be neighbours. Inside a session,
skip-gram with negative sampling (SGNS, word2vec) learns item vectors from (centre, context)
pairs at most ``window`` steps apart (the window shrinks at random per centre, as word2vec
does, so closer pairs count more), each pair against ``negatives`` items drawn from the
unigram distribution raised to ``ns_exponent``; frequent items are subsampled with word2vec's
``subsample`` rule. Two backends train the same objective: ``gensim`` (Word2Vec, C code, an
optional dependency) and ``torch`` (ours: Adam on mini-batches of pairs, gradients by hand).

The item vectors (the input embeddings, L2-normalised) go into a ``VectorIndex`` (index.py),
the same ANN code the two-tower uses: ``similar(ids, k)`` answers "similar items" and
``search(hist_item, hist_mask, seen, k)`` is the candidate source.

Notation: N catalog size (ids 0, 1 reserved), D vector width, Q queries, L history length,
P (centre, context) pairs, K negatives per pair.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import polars as pl
import torch

from bstrec.features.spec import N_RESERVED
from bstrec.retrieval.index import IndexConfig, VectorIndex, build_index, load_index
from bstrec.retrieval.topk import drop_excluded

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Backend = Literal["gensim", "torch"]
# the starting learning rate when ``lr`` is not given: word2vec's alpha for gensim (decayed
# linearly to 1e-4 of it), an Adam step size for torch (Adam's steps are per-coordinate
# normalised, so the two numbers do not mean the same thing). These and the epochs are the
# cells of bench_retrieval.py's grid that did well on both MovieLens protocols' valid queries
# (results/retrieval_*.json, "item2vec"): word2vec's own alpha of 0.025, made for text corpora
# many times larger, left gensim at half of torch's recall on both.
DEFAULT_LR: dict[str, float] = {"gensim": 0.1, "torch": 0.03}
DEFAULT_EPOCHS: dict[str, int] = {"gensim": 40, "torch": 10}
META = "item2vec.json"
ARRAYS = "item2vec.npz"
INDEX = "index"


@dataclass(frozen=True)
class Item2VecConfig:
    """(``bstrec.config.from_dict`` fills it; unknown keys are errors)."""

    backend: Backend = "torch"
    session_gap_minutes: float = 30.0  # a longer pause between two behaviours ends a session
    dim: int = 64
    window: int = 5  # largest step distance of a (centre, context) pair inside a session
    negatives: int = 5
    ns_exponent: float = 0.75  # negatives ~ count ** ns_exponent
    subsample: float = 1e-3  # word2vec's frequent-item downsampling threshold; 0 = none
    min_count: int = 1  # items seen fewer times in train get no vector (never proposed)
    epochs: int | None = None  # None: DEFAULT_EPOCHS of the backend
    lr: float | None = None  # None: DEFAULT_LR of the backend
    batch_size: int = 4096  # torch: pairs per step (gensim reads whole sessions)
    positives_only: bool = False  # sessions of label-1 behaviours only
    query_items: int = 10  # the user's most recent behaviours that form the query vector
    query_decay: float = 0.8  # weight of a query behaviour per step back from the most recent
    threads: int = 1  # gensim workers / torch intra-op threads
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in ("gensim", "torch"):
            raise ValueError(f"backend must be gensim|torch, got {self.backend!r}")
        for name in ("dim", "window", "negatives", "min_count", "epochs", "batch_size",
                     "query_items", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.session_gap_minutes <= 0:
            raise ValueError("session_gap_minutes must be > 0")
        if self.subsample < 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError("subsample must be >= 0 and lr > 0")
        if not 0.0 < self.query_decay <= 1.0:
            raise ValueError("query_decay must be in (0, 1]")

    @property
    def start_lr(self) -> float:
        return DEFAULT_LR[self.backend] if self.lr is None else self.lr

    @property
    def n_epochs(self) -> int:
        return DEFAULT_EPOCHS[self.backend] if self.epochs is None else self.epochs


# --- sessions -------------------------------------------------------------------------------

def split_sessions(user: npt.ArrayLike, timestamp: npt.ArrayLike, gap_s: float) -> I64:
    """Behaviours sorted by (user, time) -> session offsets (S+1,): session s holds rows
    ``offsets[s]:offsets[s+1]``. A session ends where the user changes or the next behaviour
    comes more than ``gap_s`` seconds after the previous one."""
    u = np.asarray(user)
    ts = np.asarray(timestamp, dtype=np.float64)
    if u.shape != ts.shape or u.ndim != 1:
        raise ValueError(f"user and timestamp must be (n,) alike, got {u.shape} and {ts.shape}")
    if len(u) and ((u[1:] == u[:-1]) & (ts[1:] < ts[:-1])).any():
        raise ValueError("behaviours must be sorted by (user, timestamp)")
    cut = (u[1:] != u[:-1]) | (ts[1:] - ts[:-1] > gap_s)
    starts = np.flatnonzero(np.r_[True, cut]) if len(u) else np.zeros(0, dtype=np.int64)
    out: I64 = np.r_[starts, len(u)].astype(np.int64)
    return out


def sessions_from_frame(frame: pl.DataFrame, config: Item2VecConfig) -> tuple[I64, I64]:
    """Encoded sample rows (``user_id``, ``item_id``, ``item``, ``timestamp``, ``label``) ->
    (items (n,), session offsets (S+1,)) in the P1 order; unknown items (OOV) are dropped
    after the cut, so that they neither join nor split sessions."""
    if config.positives_only:
        frame = frame.filter(pl.col("label") == 1)
    ev = frame.select("user_id", "item_id", "item", "timestamp").sort(
        ["user_id", "timestamp", "item_id"])
    user = ev["user_id"].rank("dense").to_numpy().astype(np.int64)
    offsets = split_sessions(user, ev["timestamp"].to_numpy(), config.session_gap_minutes * 60)
    items = ev["item"].to_numpy().astype(np.int64)
    keep = items >= N_RESERVED
    cum = np.r_[0, np.cumsum(keep)].astype(np.int64)
    return items[keep], cum[offsets]


# --- SGNS training --------------------------------------------------------------------------

def _keep_probability(counts: npt.NDArray[np.float64], sample: float) -> npt.NDArray[np.float64]:
    """word2vec's (and gensim's) subsampling: an occurrence of an item of frequency f is kept
    with probability (sqrt(f / t) + 1) * t / f, t = ``sample`` x all occurrences."""
    if sample <= 0:
        return np.ones_like(counts)
    t = sample * counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (np.sqrt(counts / t) + 1.0) * t / counts
    return np.where(counts > 0, np.minimum(p, 1.0), 0.0)


def skipgram_pairs(items: I64, offsets: I64, window: int, rng: np.random.Generator,
                   keep: npt.NDArray[np.float64] | None = None) -> tuple[I64, I64]:
    """One epoch's (centre, context) pairs (P,), (P,): both directions, inside sessions only,
    each centre's window drawn uniformly from 1..``window``; ``keep`` (N,) subsamples items
    first (dropped occurrences leave the session, as in word2vec)."""
    sess = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    it = items
    if keep is not None:
        mask = rng.random(len(it)) < keep[it]
        it, sess = it[mask], sess[mask]
    reach = rng.integers(1, window + 1, size=len(it))  # each centre's shrunk window
    centres, contexts = [], []
    for k in range(1, window + 1):
        same = sess[k:] == sess[:-k]
        a, b = it[:-k], it[k:]
        fwd = same & (reach[:-k] >= k)  # a is the centre, b k steps after it
        bwd = same & (reach[k:] >= k)  # b is the centre, a k steps before it
        centres += [a[fwd], b[bwd]]
        contexts += [b[fwd], a[bwd]]
    if not centres:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(centres), np.concatenate(contexts)


def _sgns_step(w_in: torch.Tensor, w_out: torch.Tensor, centre: torch.Tensor,
               context: torch.Tensor, negative: torch.Tensor) -> float:
    """Write the gradients of the mean SGNS loss of a batch into ``w_in.grad`` and
    ``w_out.grad`` (N, D); return the loss. centre, context (B,), negative (B, K):

        loss = -mean_b [log s(u_c . v_o) + sum_k log s(-u_c . v_nk)],  s = sigmoid
    """
    B = len(centre)
    u, vo, vn = w_in[centre], w_out[context], w_out[negative]  # (B, D), (B, D), (B, K, D)
    pos = (u * vo).sum(-1)  # (B,)
    neg = torch.bmm(vn, u.unsqueeze(-1)).squeeze(-1)  # (B, K)
    g_pos = (torch.sigmoid(pos) - 1.0) / B  # d loss / d pos
    g_neg = torch.sigmoid(neg) / B  # d loss / d neg
    g_u = g_pos[:, None] * vo + torch.bmm(g_neg.unsqueeze(1), vn).squeeze(1)  # (B, D)
    assert w_in.grad is not None and w_out.grad is not None
    w_in.grad.zero_().index_add_(0, centre, g_u)
    w_out.grad.zero_().index_add_(0, context, g_pos[:, None] * u)
    w_out.grad.index_add_(0, negative.reshape(-1),
                          (g_neg.unsqueeze(-1) * u.unsqueeze(1)).reshape(-1, u.shape[1]))
    loss = -(torch.nn.functional.logsigmoid(pos)
             + torch.nn.functional.logsigmoid(-neg).sum(-1)).mean()
    return float(loss)


def _train_torch(items: I64, offsets: I64, n_items: int, cfg: Item2VecConfig
                 ) -> tuple[F32, dict[str, Any]]:
    """(N, D) input vectors by our own SGNS; the loss of every epoch (mean per pair)."""
    counts = np.bincount(items, minlength=n_items).astype(np.float64)
    counts[counts < cfg.min_count] = 0.0
    valid = counts > 0
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.from_numpy(counts ** cfg.ns_exponent)  # (N,) unnormalised
    keep = _keep_probability(counts, cfg.subsample)
    D = cfg.dim
    # word2vec's initialisation: small random inputs, zero outputs
    w_in = torch.empty(n_items, D).uniform_(-0.5 / D, 0.5 / D, generator=gen)
    w_out = torch.zeros(n_items, D)
    # Adam on dense (N, D) tables, the gradients written by hand: autograd's embedding
    # backward (dense or sparse, with SparseAdam's coalescing) took most of the time (profiled
    # on ML-100k), while one index_add_ per table is all the SGNS gradient needs. A catalog of
    # millions of items would want sparse rows instead: the (N, D) step costs O(N) per batch.
    w_in.grad, w_out.grad = torch.zeros_like(w_in), torch.zeros_like(w_out)
    opt = torch.optim.Adam([w_in, w_out], lr=cfg.start_lr)
    losses: list[float] = []
    pairs_total = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        for _ in range(cfg.n_epochs):
            c, o = skipgram_pairs(items, offsets, cfg.window, rng, keep)
            ok = valid[c] & valid[o]
            c, o = c[ok], o[ok]
            perm = rng.permutation(len(c))
            c_t, o_t = torch.from_numpy(c[perm]), torch.from_numpy(o[perm])
            total, n = 0.0, 0
            for lo in range(0, len(c_t), cfg.batch_size):
                cb, ob = c_t[lo:lo + cfg.batch_size], o_t[lo:lo + cfg.batch_size]  # (B,)
                neg = torch.multinomial(noise, len(cb) * cfg.negatives, replacement=True,
                                        generator=gen).view(len(cb), cfg.negatives)  # (B, K)
                with torch.no_grad():
                    loss = _sgns_step(w_in, w_out, cb, ob, neg)
                opt.step()
                total += loss * len(cb)
                n += len(cb)
            losses.append(total / max(n, 1))
            pairs_total += n
    finally:
        torch.set_num_threads(threads)
    vecs = w_in.numpy().astype(np.float32)
    vecs[~valid] = 0.0
    return vecs, {"epoch_loss": [round(v, 5) for v in losses], "pairs": pairs_total}


def _train_gensim(items: I64, offsets: I64, n_items: int, cfg: Item2VecConfig
                  ) -> tuple[F32, dict[str, Any]]:
    """(N, D) input vectors by gensim's Word2Vec (skip-gram, negative sampling). One-item
    sessions give no pair but count towards min_count and subsampling, as in the torch backend."""
    try:
        # imported by name: gensim is optional and ships no type information
        Word2Vec = importlib.import_module("gensim.models").Word2Vec
    except ImportError as exc:
        raise ImportError("backend 'gensim' needs gensim (pip install gensim); the 'torch' "
                          "backend needs nothing more") from exc
    sessions = [[str(i) for i in items[lo:hi]] for lo, hi in
                zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    model = Word2Vec(sessions, vector_size=cfg.dim, window=cfg.window, negative=cfg.negatives,
                     ns_exponent=cfg.ns_exponent, sample=cfg.subsample, min_count=cfg.min_count,
                     epochs=cfg.n_epochs, alpha=cfg.start_lr, min_alpha=cfg.start_lr * 1e-4,
                     sg=1, hs=0, workers=cfg.threads, seed=cfg.seed)
    vecs = np.zeros((n_items, cfg.dim), dtype=np.float32)
    keys = model.wv.index_to_key
    vecs[np.array([int(k) for k in keys], dtype=np.int64)] = model.wv.vectors[:len(keys)]
    return vecs, {"epoch_loss": None, "pairs": None}


# --- the source -----------------------------------------------------------------------------

def _normalise(v: F32) -> F32:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    out: F32 = np.where(n > 0, v / np.maximum(n, 1e-12), 0.0).astype(np.float32)
    return out


class Item2Vec:
    """Item vectors ``vectors`` (N, D), L2-normalised by ``fit`` (zero rows: no vector), and
    their ``index`` (every item with a vector, under its item id)."""

    def __init__(self, config: Item2VecConfig, vectors: F32, index: VectorIndex | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.config = config
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.info = info or {}
        self.index = index if index is not None else self.build_index()

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def has_vector(self) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = np.asarray(self.vectors.any(axis=1))
        out[:N_RESERVED] = False
        return out

    def build_index(self, config: IndexConfig | None = None) -> VectorIndex:
        """An index (default exact) of the items that have a vector."""
        ids = np.flatnonzero(self.has_vector).astype(np.int64)
        return build_index(ids, self.vectors[ids].reshape(len(ids), -1),
                           config or IndexConfig(kind="exact"))

    @classmethod
    def fit(cls, frame: pl.DataFrame, n_items: int, config: Item2VecConfig | None = None,
            index_config: IndexConfig | None = None) -> Item2Vec:
        """From encoded sample rows (``user_id``, ``item_id``, ``item``, ``timestamp``,
        ``label``) of the train split; ``n_items`` = N."""
        cfg = config or Item2VecConfig()
        # the backend's defaults written out, so that the saved model says what trained it
        cfg = replace(cfg, lr=cfg.start_lr, epochs=cfg.n_epochs)
        items, offsets = sessions_from_frame(frame, cfg)
        if len(items) and int(items.max()) >= n_items:
            raise ValueError(f"item ids reach {int(items.max())}, beyond n_items={n_items}")
        t0 = time.perf_counter()
        train = _train_gensim if cfg.backend == "gensim" else _train_torch
        vecs, info = train(items, offsets, n_items, cfg)
        lengths = np.diff(offsets)
        info.update(seconds=round(time.perf_counter() - t0, 3), sessions=len(lengths),
                    events=len(items),
                    mean_session_length=round(float(lengths.mean()) if len(lengths) else 0.0, 3))
        model = cls(cfg, _normalise(vecs), info=info)
        if index_config is not None:
            model.index = model.build_index(index_config)
        return model

    def query_vectors(self, hist_item: npt.ArrayLike, hist_mask: npt.ArrayLike
                      ) -> tuple[F32, npt.NDArray[np.bool_]]:
        """Right-aligned histories (Q, L) and mask -> (Q, D) query vectors and (Q,) whether
        the row has one (some recent behaviour with a vector).

        The query is the decayed mean of the ``query_items`` most recent behaviours' vectors
        (weight ``query_decay ** steps_back``): the vectors know sessions, not users, and the
        session a request belongs to is the one the user is in now, i.e. their latest
        behaviours; older ones only dilute that intent, which is why the mean is truncated
        and decayed rather than taken over the whole history (a user vector would need a
        model of users, which the two-tower already is)."""
        hist = np.asarray(hist_item, dtype=np.int64)
        mask = np.asarray(hist_mask).astype(bool)
        L = hist.shape[1]
        m = min(self.config.query_items, L)
        hist, mask = hist[:, L - m:], mask[:, L - m:]  # (Q, m) the most recent
        steps_back = np.arange(m - 1, -1, -1, dtype=np.float32)
        w = (np.float32(self.config.query_decay) ** steps_back) * mask  # (Q, m)
        safe = np.where((hist >= 0) & (hist < self.size), hist, 0)
        v = self.vectors[safe]  # (Q, m, D); padding and unknown items are zero rows
        w = w * v.any(-1)
        q = np.einsum("qm,qmd->qd", w, v)
        return _normalise(q.astype(np.float32)), w.sum(1) > 0

    def search(self, hist_item: npt.ArrayLike, hist_mask: npt.ArrayLike,
               seen: npt.NDArray[np.bool_], k: int) -> I64:
        """(Q, L) histories, (Q, N) seen mask -> (Q, k) ids from the index, seen items
        dropped, -1 where none (rows without a query vector get none)."""
        q, ok = self.query_vectors(hist_item, hist_mask)
        out = np.full((len(q), k), -1, dtype=np.int64)
        rows = np.flatnonzero(ok)
        if not len(rows) or not len(self.index):
            return out
        n_seen = int(seen[rows].sum(1).max())
        scores, ids = self.index.search(q[rows], min(k + n_seen, len(self.index)))
        got = drop_excluded(ids, scores, seen[rows], k)[1]
        out[rows, :got.shape[1]] = got
        return out

    def similar(self, items: npt.ArrayLike, k: int) -> tuple[F32, I64]:
        """(n,) item ids -> their k nearest items by cosine, the item itself excluded:
        scores (n, k), ids (n, k) (-1 / -inf = none; an item without a vector has none)."""
        it = np.asarray(items, dtype=np.int64)
        ok = (it >= 0) & (it < self.size)
        ok[ok] &= self.has_vector[it[ok]]
        scores = np.full((len(it), k), -np.inf, dtype=np.float32)
        ids = np.full((len(it), k), -1, dtype=np.int64)
        rows = np.flatnonzero(ok)
        if len(rows) and len(self.index):
            s, i = self.index.search(self.vectors[it[rows]], min(k + 1, len(self.index)))
            own = np.zeros((len(rows), self.size), dtype=bool)
            own[np.arange(len(rows)), it[rows]] = True
            s, i = drop_excluded(i, s, own, k)
            scores[rows, :s.shape[1]], ids[rows, :i.shape[1]] = s, i
        return scores, ids

    def save(self, folder: str | Path) -> None:
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        np.savez(root / ARRAYS, vectors=self.vectors)
        self.index.save(root / INDEX)
        (root / META).write_text(json.dumps({"config": asdict(self.config), "info": self.info},
                                            indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Item2Vec:
        root = Path(folder)
        if not (root / META).exists():
            raise FileNotFoundError(f"{root / META} not found: is {root} an item2vec folder?")
        meta = json.loads((root / META).read_text())
        cfg = Item2VecConfig(**meta["config"])
        with np.load(root / ARRAYS, allow_pickle=False) as z:
            vectors = z["vectors"].astype(np.float32)
        index = load_index(root / INDEX) if (root / INDEX).exists() else None
        if index is not None and index.dim != vectors.shape[1]:
            raise ValueError(f"{root}: index width {index.dim} != vector width "
                             f"{vectors.shape[1]}")
        return cls(cfg, vectors, index, meta.get("info"))
