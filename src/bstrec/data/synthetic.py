"""P4 ``synthetic-order``: a seeded shop log in which the order of behaviour is information.

The catalog
    ``n_lines`` product lines (phones, tablets, ...), each holding device *families*
    (``n_families`` in all, spread round-robin over the lines). A family has
    ``devices_per_family`` devices and ``accessories_per_family`` accessories; an accessory fits
    every device of its family. ``n_fillers`` filler items (books, groceries, ...) belong to no
    family. Item table columns: ``item_id`` (1..I), ``category`` (a device's line, e.g. "phones";
    an accessory's line plus "_accessories", e.g. "phones_accessories"; a filler's kind of goods,
    e.g. "books"), ``kind`` ("device" / "accessory" / "filler") and ``family`` (e.g. "phones_3",
    "none" for fillers). The family is NOT the category: matching an accessory to its device needs
    the item ids (or the ``family`` attribute of the target), which is what attention over item
    embeddings learns and mean pooling hardly does.

The behaviour
    Every user (``segment``: budget / mainstream / enthusiast; ``region``: north / south / east /
    west) browses in sessions (geometric lengths, mean ``mean_session_length``). A session opens
    with a *view* of a device of its focus family; the focus family is drawn from the user's
    product-line interests (a Dirichlet draw tilted towards the region's line, drifting from a
    start mix to an end mix over the user's sessions, ``interest_drift``), then by family
    popularity; with ``repeat_family_prob`` the user comes back to the previous session's family.
    The rest of the session is accessory *impressions* (share ``accessory_share``; the shop shows
    an accessory, the user buys it or not) and filler *views*. An impression's family is the
    session's focus family, the previous session's, the NEXT session's (an accessory seen before
    its device) or a random one, with weights ``accessory_family_weights``. Item choice follows a
    Zipf law of exponent ``zipf_exponent`` (families, accessories within a family, fillers).

    Events: ``action`` "view" (devices, fillers: the user opened the item) or "impression"
    (accessories: the shop showed it); ``value`` 1.0 if the user bought it, 0.0 if not.
    Timestamps are unix seconds from ``start_timestamp`` (2024-01-01 UTC), strictly increasing per
    user: gaps within a session are seconds to minutes (log-normal), gaps between sessions hours to
    days (log-normal, rescaled so that a user's sessions fill 60-100% of the ``period_days`` left
    after their first event, which falls in the first ``start_spread_days``), and every gap is
    stretched in proportion to ``1 + gap_drift * t / period`` at elapsed time ``t``: the same
    activity takes ``1 + gap_drift`` times longer at the end of the period than at its start.

The label (the ground truth, ``oracle_probabilities``)
    An event's history is what P1 gives it: the user's previous ``history_length`` (20) events,
    oldest first, whatever their value. Its purchase probability is
    ``noise_rate / 2 + (1 - noise_rate) * sigmoid(logit)`` with ``logit`` the sum of

    (a) a base per kind plus the item's quality, which grows with its popularity
        (a model without the sequence learns it from the item id);
    (b) ``line_affinity_weight`` x the share of the history in the target's product line
        (the history as a whole: mean pooling learns it);
    (c) for an accessory: ``device_present_weight`` when a device of its family is anywhere in the
        history (target-aware attention learns it);
    (d) for an accessory: ``device_recent_weight`` instead when that device is the MOST RECENT
        device of the history. An accessory after its device sells, not an accessory whose device
        was followed by another family's device, and an accessory seen before its device does not
        make the device count: the same set of history items, in another order, gives another label;
    (e) the user's segment, weakly (``segment_effect``).

    ``noise_rate`` of outcomes are coin flips, so no model reaches AUC 1. A model blind to order
    (WDL, WDL+Seq, DIN) cannot tell (d) from (c); a model with time-difference positions (BST) can,
    because the most recent device opens the current session (seconds to minutes ago) while older
    ones opened earlier sessions (hours to days ago).

About a third of all samples are accessories whose device is in the history together with
another family's device: there, the order decides. tests/data/test_synthetic.py checks that the
oracle on ordered histories beats the same oracle on shuffled histories and the order-blind rule;
the rankers' figures on it are protocol P4 (`benchmarks/results/rank_synthetic-order.json`).

The large-catalogue implicit mode (``synthetic-implicit``, ``generate_implicit``)
    A P5 log for what P4 lacks: a catalogue the size of a real shop's (``ImplicitConfig``),
    long-tailed popularity, actions instead of labels (every event a positive; P5 draws the
    negatives as of each event's time) and a signal carried by categories in the order of the
    user's last behaviours. tests/data/test_synthetic_implicit.py checks the tail, the P5
    negatives and that the generator's rule ranks those samples far above popularity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from bstrec.data.schema import Dataset
from bstrec.data.taobao import PRICE_FILE

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

NAME = "synthetic-order"
PAD = 0  # item ids start at 1, so 0 marks an empty history slot in oracle inputs
DEVICE, ACCESSORY, FILLER = 0, 1, 2
KINDS = ("device", "accessory", "filler")
SEGMENTS = ("budget", "mainstream", "enthusiast")
SEGMENT_PROBS = (0.3, 0.5, 0.2)
SEGMENT_SIGN = (-1.0, 0.0, 1.0)
REGIONS = ("north", "south", "east", "west")
LINE_NAMES = ("phones", "tablets", "laptops", "cameras", "headphones", "watches", "consoles",
              "speakers")
FILLER_NAMES = ("books", "groceries", "toys", "clothing", "home", "beauty", "sports", "garden")
# Sources of an accessory impression's family, in the order of accessory_family_weights.
SRC_CURRENT, SRC_PREVIOUS, SRC_NEXT, SRC_RANDOM = 0, 1, 2, 3


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the P4 generator. Defaults give ~3,000 users and ~200k events."""

    seed: int = 0
    n_users: int = 3000
    events_per_user: tuple[int, int] = (20, 110)  # inclusive range, uniform per user
    # Catalog.
    n_lines: int = 8
    n_families: int = 32
    devices_per_family: int = 1
    accessories_per_family: int = 8
    n_fillers: int = 400
    n_filler_categories: int = 8
    zipf_exponent: float = 1.1  # popularity skew of families, accessories and fillers
    # Sessions.
    mean_session_length: float = 5.0
    accessory_share: float = 0.6  # of the events after a session's opening device view
    # Family of an accessory impression: (current session's, previous session's, next session's,
    # random). The previous and next ones make order matter: same items, other order.
    accessory_family_weights: tuple[float, float, float, float] = (0.40, 0.35, 0.15, 0.10)
    repeat_family_prob: float = 0.1
    line_concentration: float = 0.5  # Dirichlet concentration of a user's line interests
    region_line_bias: float = 1.0  # extra concentration on the region's favourite line
    interest_drift: float = 1.0  # weight of the end interests at the user's last session
    # Label (logit terms; see the module docstring).
    history_length: int = 20  # the window the label reads: P1's history
    base_logit_device: float = -2.0
    base_logit_accessory: float = -3.2
    base_logit_filler: float = -1.8
    quality_popularity: float = 0.8  # quality = this x z-score of log popularity (within kind)
    quality_noise: float = 0.3
    line_affinity_weight: float = 2.5
    device_present_weight: float = 0.5
    device_recent_weight: float = 4.8
    segment_effect: float = 0.3
    noise_rate: float = 0.04  # share of outcomes that are coin flips
    # Time.
    start_timestamp: int = 1704067200  # 2024-01-01T00:00:00Z
    period_days: float = 90.0
    start_spread_days: float = 14.0  # users' first events fall in the first days
    within_gap_median_s: float = 40.0
    within_gap_sigma: float = 0.9
    session_gap_sigma: float = 1.0
    gap_drift: float = 0.5  # gaps at the end of the period are (1 + gap_drift) x longer

    def __post_init__(self) -> None:
        lo, hi = self.events_per_user
        checks = {
            "n_users >= 1": self.n_users >= 1,
            "1 <= events_per_user[0] <= events_per_user[1]": 1 <= lo <= hi,
            "n_lines >= 1": self.n_lines >= 1,
            "n_families >= n_lines": self.n_families >= self.n_lines,
            "devices_per_family >= 1": self.devices_per_family >= 1,
            "accessories_per_family >= 1": self.accessories_per_family >= 1,
            "n_fillers >= n_filler_categories >= 1":
                self.n_fillers >= self.n_filler_categories >= 1,
            "mean_session_length >= 1": self.mean_session_length >= 1.0,
            "0 <= accessory_share <= 1": 0.0 <= self.accessory_share <= 1.0,
            "accessory_family_weights >= 0 with a positive sum":
                min(self.accessory_family_weights) >= 0 and sum(self.accessory_family_weights) > 0,
            "0 <= repeat_family_prob < 1": 0.0 <= self.repeat_family_prob < 1.0,
            "line_concentration > 0": self.line_concentration > 0,
            "0 <= interest_drift <= 1": 0.0 <= self.interest_drift <= 1.0,
            "history_length >= 1": self.history_length >= 1,
            "0 <= noise_rate <= 1": 0.0 <= self.noise_rate <= 1.0,
            "period_days > start_spread_days >= 0": self.period_days > self.start_spread_days >= 0,
            "within_gap_median_s >= 1": self.within_gap_median_s >= 1.0,
            "gap_drift >= 0": self.gap_drift >= 0.0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"SyntheticConfig: invalid values, need {failed}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SyntheticConfig:
        """Build from a mapping (e.g. YAML); unknown keys are errors, lists become tuples."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"SyntheticConfig: unknown keys {unknown}; "
                             f"valid keys are {sorted(fields)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)


@dataclass(frozen=True)
class World:
    """The hidden structure behind one seed: what the oracle needs besides the history.

    Arrays are indexed by ``item_id - 1`` (items) and ``user_id - 1`` (users).
    """

    config: SyntheticConfig
    kind: IntArray  # (I,) DEVICE / ACCESSORY / FILLER
    family: IntArray  # (I,) family index, -1 for fillers
    line: IntArray  # (I,) line index, -1 for fillers
    quality: FloatArray  # (I,) logit offset
    popularity: FloatArray  # (I,) sampling weight within the item's group (family or fillers)
    family_popularity: FloatArray  # (F,) sampling weight of each family
    family_line: IntArray  # (F,)
    filler_category: IntArray  # (I,) filler category index, -1 for devices and accessories
    segment: IntArray  # (U,) index into SEGMENTS
    region: IntArray  # (U,) index into REGIONS

    @property
    def n_items(self) -> int:
        return int(self.kind.shape[0])


def _line_name(i: int) -> str:
    return LINE_NAMES[i] if i < len(LINE_NAMES) else f"line_{i}"


def _filler_name(i: int) -> str:
    return FILLER_NAMES[i] if i < len(FILLER_NAMES) else f"goods_{i}"


def _zipf(n: int, s: float, rng: np.random.Generator) -> FloatArray:
    """Zipf weights 1/rank^s, summing to 1, with ranks in random order (no bias from the id)."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return rng.permutation(w / w.sum())


def _zscore(x: FloatArray, w: FloatArray) -> FloatArray:
    """z-score under weights ``w``: weighted by how often items are shown, the mean is 0, so the
    base logits keep their meaning for the average event."""
    mean = float(np.average(x, weights=w))
    sd = float(np.sqrt(np.average((x - mean) ** 2, weights=w)))
    return (x - mean) / sd if sd > 0 else np.zeros_like(x)


def build_world(config: SyntheticConfig = SyntheticConfig()) -> World:
    """The catalog and user profiles for ``config.seed`` (the same for ``generate``)."""
    c = config
    # A stream of its own, so that changing how events are drawn never changes the catalog.
    rng = np.random.default_rng([c.seed, 0])
    n_dev = c.n_families * c.devices_per_family
    n_acc = c.n_families * c.accessories_per_family
    fam_pop = _zipf(c.n_families, c.zipf_exponent, rng)
    fam_line = np.arange(c.n_families, dtype=np.int64) % c.n_lines
    dev_fam = np.repeat(np.arange(c.n_families, dtype=np.int64), c.devices_per_family)
    acc_fam = np.repeat(np.arange(c.n_families, dtype=np.int64), c.accessories_per_family)
    dev_pop = np.concatenate([_zipf(c.devices_per_family, c.zipf_exponent, rng)
                              for _ in range(c.n_families)])
    acc_pop = np.concatenate([_zipf(c.accessories_per_family, c.zipf_exponent, rng)
                              for _ in range(c.n_families)])
    fil_pop = _zipf(c.n_fillers, c.zipf_exponent, rng)
    kind = np.concatenate([np.full(n_dev, DEVICE), np.full(n_acc, ACCESSORY),
                           np.full(c.n_fillers, FILLER)]).astype(np.int64)
    family = np.concatenate([dev_fam, acc_fam, np.full(c.n_fillers, -1, dtype=np.int64)])
    line = np.where(family >= 0, fam_line[np.maximum(family, 0)], -1)
    popularity = np.concatenate([dev_pop, acc_pop, fil_pop])
    # Expected share of the log each item gets (up to a factor per kind): popular items sell
    # better, so a model without the sequence has the item id to learn from.
    expected = np.concatenate([fam_pop[dev_fam] * dev_pop, fam_pop[acc_fam] * acc_pop, fil_pop])
    log_exp = np.log(expected)
    quality = np.empty_like(log_exp)
    for k in (DEVICE, ACCESSORY, FILLER):
        m = kind == k
        quality[m] = c.quality_popularity * _zscore(log_exp[m], expected[m])
    quality += c.quality_noise * rng.standard_normal(quality.shape[0])
    filler_category = np.full(kind.shape[0], -1, dtype=np.int64)
    filler_category[kind == FILLER] = rng.integers(0, c.n_filler_categories, c.n_fillers)
    segment = rng.choice(len(SEGMENTS), size=c.n_users, p=SEGMENT_PROBS).astype(np.int64)
    region = rng.integers(0, len(REGIONS), c.n_users).astype(np.int64)
    return World(config=c, kind=kind, family=family, line=line, quality=quality,
                 popularity=popularity, family_popularity=fam_pop, family_line=fam_line,
                 filler_category=filler_category, segment=segment, region=region)


def _oracle_inputs(history: npt.ArrayLike, targets: npt.ArrayLike, n_items: int
                   ) -> tuple[IntArray, IntArray]:
    """An oracle's (N, L) history (PAD = 0 in empty slots) and (N,) targets, checked."""
    hist = np.asarray(history, dtype=np.int64)
    tgt = np.asarray(targets, dtype=np.int64)
    if hist.ndim != 2 or tgt.ndim != 1 or hist.shape[0] != tgt.shape[0]:
        raise ValueError(f"need history (N, L) and targets (N,), got {hist.shape} and {tgt.shape}")
    if tgt.size and (tgt.min() < 1 or tgt.max() > n_items):
        raise ValueError("target item id out of range")
    if hist.size and (hist.min() < 0 or hist.max() > n_items):
        raise ValueError("history item id out of range")
    return hist, tgt


def oracle_probabilities(world: World, history: npt.ArrayLike, targets: npt.ArrayLike,
                         user_ids: npt.ArrayLike | None = None) -> FloatArray:
    """True P(value = 1) for each (history, target): the rule of the module docstring.

    history: (N, L) item ids, oldest first along L, ``PAD`` (0) in empty slots (anywhere);
    targets: (N,) item ids; user_ids: (N,) user ids for the segment term (None: no segment term).
    Returns (N,) probabilities. Only the last ``config.history_length`` columns are what the
    generator used; pass exactly P1's history to reproduce its labels.
    """
    c = world.config
    hist, tgt = _oracle_inputs(history, targets, world.n_items)
    valid = hist != PAD  # (N, L)
    h = np.maximum(hist - 1, 0)  # (N, L) item index; pads are masked by `valid`
    t = tgt - 1  # (N,)
    t_kind, t_fam, t_line = world.kind[t], world.family[t], world.line[t]

    logit = np.select([t_kind == DEVICE, t_kind == ACCESSORY],
                      [c.base_logit_device, c.base_logit_accessory], c.base_logit_filler)
    logit = logit + world.quality[t]

    # (b) share of the history in the target's line; fillers have no line (-1 never matches).
    n_valid = valid.sum(axis=1)
    same_line = valid & (world.line[h] == t_line[:, None]) & (t_line[:, None] >= 0)
    logit += c.line_affinity_weight * same_line.sum(axis=1) / np.maximum(n_valid, 1)

    # (c) + (d): accessories and the devices of the history.
    is_dev = valid & (world.kind[h] == DEVICE)  # (N, L)
    fam_dev = is_dev & (world.family[h] == t_fam[:, None])  # devices of the target's family
    present = fam_dev.any(axis=1)
    # The most recent device is the last device column: flip, take the first True.
    last_dev_col = hist.shape[1] - 1 - np.argmax(is_dev[:, ::-1], axis=1)
    has_dev = is_dev.any(axis=1)
    rows = np.arange(hist.shape[0])
    recent = has_dev & fam_dev[rows, last_dev_col] if hist.shape[1] else np.zeros_like(present)
    is_acc = t_kind == ACCESSORY
    logit += np.where(is_acc & recent, c.device_recent_weight,
                      np.where(is_acc & present, c.device_present_weight, 0.0))

    if user_ids is not None:
        u = np.asarray(user_ids, dtype=np.int64) - 1
        sign = np.asarray(SEGMENT_SIGN)[world.segment[u]]
        logit += c.segment_effect * sign * (t_kind != FILLER)

    p: FloatArray = c.noise_rate / 2 + (1 - c.noise_rate) / (1 + np.exp(-logit))
    return p


def oracle_probability(world: World, history_items: npt.ArrayLike, target: int,
                       user_id: int | None = None) -> float:
    """``oracle_probabilities`` for one history (1-D item ids, oldest first)."""
    hist = np.asarray(history_items, dtype=np.int64).reshape(1, -1)
    users = None if user_id is None else [user_id]
    return float(oracle_probabilities(world, hist, [target], users)[0])


def history_matrix(user_index: IntArray, item_ids: IntArray, length: int) -> IntArray:
    """P1 histories of a log sorted by user then time: (N, length) item ids, oldest first,
    right-aligned, ``PAD`` where the user has fewer earlier events. user_index: (N,)."""
    n = item_ids.shape[0]
    first = np.zeros(n, dtype=np.int64)
    if n:
        starts = np.flatnonzero(np.r_[True, user_index[1:] != user_index[:-1]])
        first = np.repeat(starts, np.diff(np.r_[starts, n]))
    cols = np.arange(n)[:, None] - length + np.arange(length)[None, :]  # (N, L) row indices
    ok = cols >= first[:, None]
    out: IntArray = np.where(ok, item_ids[np.maximum(cols, 0)], PAD)
    return out


def _sample_rows(cdf: FloatArray, rng: np.random.Generator) -> IntArray:
    """One categorical draw per row of a (N, K) matrix of cumulative probabilities."""
    u = rng.random((cdf.shape[0], 1)) * cdf[:, -1:]
    out: IntArray = np.minimum((u >= cdf).sum(axis=1), cdf.shape[1] - 1).astype(np.int64)
    return out


def _sample_within(groups: IntArray, weights: FloatArray, group_of: IntArray,
                   rng: np.random.Generator) -> IntArray:
    """For each requested group, an index into ``weights`` drawn among that group's entries.

    ``group_of`` (M,) is sorted and gives each weight's group; ``groups`` (N,) the requests.
    Cumulative weights offset by the group index make one searchsorted serve every group.
    """
    n_groups = int(group_of.max()) + 1
    totals = np.bincount(group_of, weights=weights, minlength=n_groups)
    within = np.cumsum(weights) - np.repeat(np.cumsum(totals) - totals, np.bincount(group_of))
    key = group_of + within / totals[group_of]  # in (g, g + 1]
    last = np.r_[group_of[1:] != group_of[:-1], True]
    key[last] = group_of[last] + 1.0  # exact group ends: rounding must not spill into the next
    u = groups + (1.0 - rng.random(groups.shape[0]))  # in (g, g + 1]
    idx: IntArray = np.minimum(np.searchsorted(key, u, side="left"), weights.shape[0] - 1)
    return idx


def generate(config: SyntheticConfig = SyntheticConfig()) -> Dataset:
    """The P4 log for ``config`` as a canonical ``Dataset``; the same seed gives the same frames."""
    c = config
    world = build_world(c)
    rng = np.random.default_rng([c.seed, 1])
    n_dev = c.n_families * c.devices_per_family
    n_acc = c.n_families * c.accessories_per_family

    # --- events per user and sessions (events are laid out user by user, in time order)
    lo, hi = c.events_per_user
    n_ev = rng.integers(lo, hi + 1, c.n_users)
    n = int(n_ev.sum())
    ev_user = np.repeat(np.arange(c.n_users, dtype=np.int64), n_ev)  # user index
    user_first = np.cumsum(n_ev) - n_ev
    local = np.arange(n) - np.repeat(user_first, n_ev)
    is_start = (rng.random(n) < 1.0 / c.mean_session_length) | (local == 0)
    ev_sess = np.cumsum(is_start) - 1
    n_sess = int(is_start.sum())
    s_user = ev_user[is_start]
    sess_per_user = np.bincount(s_user, minlength=c.n_users)
    s_rank = np.arange(n_sess) - np.repeat(np.cumsum(sess_per_user) - sess_per_user,
                                           sess_per_user)

    # --- focus family of each session: drifting line interests, then family popularity
    alpha = np.full((c.n_users, c.n_lines), c.line_concentration)
    alpha[np.arange(c.n_users), world.region % c.n_lines] += c.region_line_bias
    pi_start = rng.gamma(alpha)
    pi_end = rng.gamma(alpha)
    pi_start /= pi_start.sum(axis=1, keepdims=True)
    pi_end /= pi_end.sum(axis=1, keepdims=True)
    progress = (s_rank / np.maximum(sess_per_user[s_user] - 1, 1))[:, None]
    mix = c.interest_drift * progress
    pi = (1 - mix) * pi_start[s_user] + mix * pi_end[s_user]  # (S, n_lines)
    s_line = _sample_rows(np.cumsum(pi, axis=1), rng)
    fams_by_line = np.argsort(world.family_line, kind="stable")
    cand = fams_by_line[_sample_within(s_line, world.family_popularity[fams_by_line],
                                       world.family_line[fams_by_line], rng)]
    # Coming back to the previous family: carry the last fresh draw forward. A user's first
    # session is always fresh, so the carry never crosses users.
    repeat = (rng.random(n_sess) < c.repeat_family_prob) & (s_rank > 0)
    fresh = np.where(repeat, 0, np.arange(n_sess))
    s_fam = cand[np.maximum.accumulate(fresh)]
    same_user_prev = s_rank > 0
    same_user_next = np.r_[s_rank[1:] > 0, False]
    s_prev = np.where(same_user_prev, np.roll(s_fam, 1), -1)
    s_next = np.where(same_user_next, np.roll(s_fam, -1), -1)

    # --- items: a device opens each session; then accessory impressions and filler views
    fam_of_ev = s_fam[ev_sess]
    dev_item = _sample_within(fam_of_ev, world.popularity[:n_dev], world.family[:n_dev], rng)
    is_acc = ~is_start & (rng.random(n) < c.accessory_share)
    w = np.asarray(c.accessory_family_weights, dtype=np.float64)
    src = rng.choice(4, size=n, p=w / w.sum())
    rand_fam = rng.choice(c.n_families, size=n, p=world.family_popularity)
    acc_fam = np.select([src == SRC_CURRENT, src == SRC_PREVIOUS, src == SRC_NEXT],
                        [fam_of_ev, s_prev[ev_sess], s_next[ev_sess]], rand_fam)
    acc_fam = np.where(acc_fam < 0, rand_fam, acc_fam)  # no previous / next session
    acc_item = n_dev + _sample_within(acc_fam, world.popularity[n_dev:n_dev + n_acc],
                                      world.family[n_dev:n_dev + n_acc], rng)
    fil_w = world.popularity[n_dev + n_acc:]
    fil_item = n_dev + n_acc + np.minimum(
        np.searchsorted(np.cumsum(fil_w), rng.random(n) * fil_w.sum()), c.n_fillers - 1)
    item_idx = np.where(is_start, dev_item, np.where(is_acc, acc_item, fil_item))
    item_id = item_idx + 1

    # --- time: gaps in "activity seconds" tau, then a warp that stretches gaps as time goes on
    day = 86400.0
    period = c.period_days * day
    tau = _activity_seconds(c, rng, is_start, ev_user, n_ev)
    # Real time t = g(tau) with g' proportional to 1 + d t / period and g(period) = period: the
    # same activity takes (1 + d) times longer at the end of the period than at its start.
    d = c.gap_drift
    real = tau if d == 0 else period / d * np.expm1(np.log1p(d) * tau / period)
    ts = c.start_timestamp + np.floor(real).astype(np.int64)
    # Strictly increasing per user, so that P1's (timestamp, item id) order is the drawn order.
    ts = _strictly_increasing(ts, ev_user)

    # --- outcomes from the oracle on exactly P1's history
    hist = history_matrix(ev_user, item_id, c.history_length)
    p = oracle_probabilities(world, hist, item_id, ev_user + 1)
    value = (rng.random(n) < p).astype(np.float64)

    events = pl.DataFrame({
        "user_id": ev_user + 1,
        "item_id": item_id,
        "timestamp": ts,
        "action": np.where(world.kind[item_idx] == ACCESSORY, "impression", "view"),
        "value": value,
        "event_id": None,
    }, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64,
               "action": pl.String, "value": pl.Float64, "event_id": pl.String})
    return Dataset(
        name=NAME, events=events, items=items_frame(world), users=users_frame(world),
        feedback="explicit", user_features=("segment", "region"),
        item_features=("kind", "family"),
        meta={"protocol": "P4", "generator": "bstrec.data.synthetic",
              "config": dataclasses.asdict(c)},
    )


def _activity_seconds(c: SyntheticConfig | ImplicitConfig, rng: np.random.Generator,
                      is_start: npt.NDArray[np.bool_], ev_user: IntArray, n_ev: IntArray
                      ) -> FloatArray:
    """(n,) seconds since the period's start of each event, users' events contiguous and in
    order: log-normal gaps within a session; between sessions log-normal shapes, rescaled so
    that each user's sessions fill 60-100% of what is left of the period after their start (a
    bounded span, whatever the draws)."""
    n = int(n_ev.sum())
    user_first = np.cumsum(n_ev) - n_ev
    local = np.arange(n) - np.repeat(user_first, n_ev)
    day = 86400.0
    period = c.period_days * day
    within = np.exp(np.log(c.within_gap_median_s) + c.within_gap_sigma * rng.standard_normal(n))
    start = rng.random(c.n_users) * c.start_spread_days * day
    span = (period - start) * rng.uniform(0.6, 1.0, c.n_users)
    between = np.exp(c.session_gap_sigma * rng.standard_normal(n)) * (is_start & (local > 0))
    between_sum = np.bincount(ev_user, weights=between, minlength=c.n_users)
    between *= (span / np.maximum(between_sum, 1e-12))[ev_user]
    gap = np.where(is_start, between, np.maximum(within, 1.0))
    gap[user_first] = start
    tau: FloatArray = np.cumsum(gap)
    tau -= np.repeat(tau[user_first] - gap[user_first], n_ev)  # restart the clock per user
    return tau


def _strictly_increasing(ts: IntArray, user: IntArray) -> IntArray:
    """Bump equal or decreasing timestamps within a user by whole seconds (rare: rounding)."""
    i = np.arange(ts.shape[0], dtype=np.int64)
    # ts - i is non-decreasing iff ts is strictly increasing; a running max fixes it. The user
    # offset keeps the running max from leaking from one user into the next.
    offset = user * (1 << 40)
    fixed: IntArray = np.maximum.accumulate(ts - i + offset) - offset + i
    return fixed


def items_frame(world: World) -> pl.DataFrame:
    c = world.config
    fam_names = [f"{_line_name(int(world.family_line[f]))}_{f}" for f in range(c.n_families)]
    category, family = [], []
    for k, f, ln, fc in zip(world.kind.tolist(), world.family.tolist(), world.line.tolist(),
                            world.filler_category.tolist(), strict=True):
        if k == FILLER:
            category.append(_filler_name(fc))
            family.append("none")
        else:
            category.append(_line_name(ln) + ("" if k == DEVICE else "_accessories"))
            family.append(fam_names[f])
    return pl.DataFrame({
        "item_id": np.arange(1, world.n_items + 1, dtype=np.int64),
        "category": category,
        "kind": [KINDS[k] for k in world.kind.tolist()],
        "family": family,
    }, schema={"item_id": pl.Int64, "category": pl.String, "kind": pl.String,
               "family": pl.String})


def users_frame(world: World) -> pl.DataFrame:
    return pl.DataFrame({
        "user_id": np.arange(1, world.config.n_users + 1, dtype=np.int64),
        "segment": [SEGMENTS[s] for s in world.segment.tolist()],
        "region": [REGIONS[r] for r in world.region.tolist()],
    }, schema={"user_id": pl.Int64, "segment": pl.String, "region": pl.String})


# --- Large-catalogue implicit mode (P5 ``synthetic-implicit``) -----------------------------------

IMPLICIT_NAME = "synthetic-implicit"
ACTIONS = ("pv", "cart", "fav", "buy")
# Sources of the next event's category, in the order of category_source_weights.
CAT_SUCCESSOR, CAT_SAME, CAT_RECENT, CAT_POPULAR = 0, 1, 2, 3


@dataclass(frozen=True)
class ImplicitConfig:
    """Every knob of the large-catalogue implicit generator (see ``generate_implicit``).

    The defaults give a catalogue the size of the Taobao logs issue 23 trained on, and a log
    that generates and builds in seconds; ``n_users`` scales the log, not the catalogue.
    """

    seed: int = 0
    n_users: int = 10_000
    events_per_user: tuple[int, int] = (20, 80)  # inclusive range, uniform per user
    n_items: int = 50_000
    n_categories: int = 500
    category_zipf: float = 0.9  # popularity skew of categories
    item_zipf: float = 0.8  # popularity skew of items within a category
    successors: int = 3  # categories that follow each category (drawn by popularity)
    # Where the next event's category comes from: (a successor of the last event's category,
    # the last event's category, one of the last recent_window events' categories, the
    # catalogue's category popularity).
    category_source_weights: tuple[float, float, float, float] = (0.5, 0.2, 0.1, 0.2)
    recent_window: int = 5
    repeat_prob: float = 0.1  # the next event is the last event's item again
    # Actions of a first touch and of a repeat (pv, cart, fav, buy): carts and buys follow views.
    action_probs: tuple[float, float, float, float] = (0.92, 0.03, 0.03, 0.02)
    repeat_action_probs: tuple[float, float, float, float] = (0.2, 0.35, 0.15, 0.3)
    # Time: sessions of geometric length, seconds-to-minutes gaps within, hours-to-days between,
    # each user's sessions spread over 60-100% of what is left of the period after their start.
    mean_session_length: float = 6.0
    start_timestamp: int = 1704067200  # 2024-01-01T00:00:00Z
    period_days: float = 60.0
    start_spread_days: float = 10.0
    within_gap_median_s: float = 60.0
    within_gap_sigma: float = 0.9
    session_gap_sigma: float = 1.0

    def __post_init__(self) -> None:
        lo, hi = self.events_per_user
        checks = {
            "n_users >= 1": self.n_users >= 1,
            "1 <= events_per_user[0] <= events_per_user[1]": 1 <= lo <= hi,
            "n_items >= n_categories >= 1": self.n_items >= self.n_categories >= 1,
            "category_zipf >= 0 and item_zipf >= 0":
                self.category_zipf >= 0 and self.item_zipf >= 0,
            "successors >= 1": self.successors >= 1,
            "category_source_weights >= 0 with a positive sum":
                min(self.category_source_weights) >= 0 and sum(self.category_source_weights) > 0,
            "recent_window >= 1": self.recent_window >= 1,
            "0 <= repeat_prob < 1": 0.0 <= self.repeat_prob < 1.0,
            "action_probs >= 0 with a positive sum":
                min(self.action_probs) >= 0 and sum(self.action_probs) > 0,
            "repeat_action_probs >= 0 with a positive sum":
                min(self.repeat_action_probs) >= 0 and sum(self.repeat_action_probs) > 0,
            "mean_session_length >= 1": self.mean_session_length >= 1.0,
            "period_days > start_spread_days >= 0": self.period_days > self.start_spread_days >= 0,
            "within_gap_median_s >= 1": self.within_gap_median_s >= 1.0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"ImplicitConfig: invalid values, need {failed}")


@dataclass(frozen=True)
class ImplicitWorld:
    """The hidden structure of one seed of the implicit generator.

    Items are laid out category by category: ``item_category`` is sorted, and arrays are indexed
    by ``item_id - 1``.
    """

    config: ImplicitConfig
    item_category: IntArray  # (I,) category index, sorted
    item_popularity: FloatArray  # (I,) P(item | its category)
    category_popularity: FloatArray  # (C,) P(category) of a fresh draw
    successor: IntArray  # (C, S) the categories that follow each category

    @property
    def n_items(self) -> int:
        return int(self.item_category.shape[0])

    def category_weights(self) -> FloatArray:
        """(4,) the category sources' probabilities, normalised."""
        w = np.asarray(self.config.category_source_weights, dtype=np.float64)
        out: FloatArray = w / w.sum()
        return out


def build_implicit_world(config: ImplicitConfig = ImplicitConfig()) -> ImplicitWorld:
    """The catalogue and the category transitions for ``config.seed``."""
    c = config
    rng = np.random.default_rng([c.seed, 0, 1])
    item_category = (np.arange(c.n_items, dtype=np.int64) * c.n_categories) // c.n_items
    sizes = np.bincount(item_category, minlength=c.n_categories)
    item_popularity = np.concatenate([_zipf(int(n), c.item_zipf, rng) for n in sizes])
    category_popularity = _zipf(c.n_categories, c.category_zipf, rng)
    # Popular categories are also the common successors, so the chain keeps the long tail.
    successor = rng.choice(c.n_categories, size=(c.n_categories, c.successors),
                           p=category_popularity).astype(np.int64)
    return ImplicitWorld(config=c, item_category=item_category, item_popularity=item_popularity,
                         category_popularity=category_popularity, successor=successor)


def implicit_oracle_log_probabilities(world: ImplicitWorld, history: npt.ArrayLike,
                                      targets: npt.ArrayLike) -> FloatArray:
    """log P(next event's item = target | history) under the generator's rule.

    history: (N, L) item ids, oldest first, ``PAD`` (0) in empty slots on the left (as
    ``history_matrix`` and P5 give them); targets: (N,) item ids. Returns (N,). With uniform
    negatives (P5's default) this ranks positives above negatives as well as anything can.
    """
    c = world.config
    hist, tgt = _oracle_inputs(history, targets, world.n_items)
    n = tgt.shape[0]
    w = world.category_weights()
    t_cat = world.item_category[tgt - 1]  # (N,)
    p_cat = w[CAT_POPULAR] * world.category_popularity[t_cat]  # (N,)
    if hist.shape[1]:
        last = hist[:, -1]  # (N,)
        has = last != PAD
        last_cat = world.item_category[np.maximum(last, 1) - 1]
        succ_share = (world.successor[last_cat] == t_cat[:, None]).mean(axis=1)
        recent = hist[:, -c.recent_window:]  # (N, W)
        valid = recent != PAD
        same = valid & (world.item_category[np.maximum(recent, 1) - 1] == t_cat[:, None])
        recent_share = same.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
        p_hist = (w[CAT_SUCCESSOR] * succ_share + w[CAT_SAME] * (last_cat == t_cat)
                  + w[CAT_RECENT] * recent_share)
        p_cat = np.where(has, p_cat + p_hist, world.category_popularity[t_cat])
        p_item = world.item_popularity[tgt - 1] * p_cat
        p = np.where(has, (1 - c.repeat_prob) * p_item + c.repeat_prob * (last == tgt), p_item)
    else:
        p = world.category_popularity[t_cat] * world.item_popularity[tgt - 1]
    out: FloatArray = np.log(np.maximum(p, 1e-300)).reshape(n)
    return out


def generate_implicit(config: ImplicitConfig = ImplicitConfig()) -> Dataset:
    """A seeded implicit log over a large long-tailed catalogue whose categories carry the signal.

    Each user's first event draws a category by its popularity. Every later event draws its
    category from the user's last events, in order (``category_source_weights``): a successor
    of the last event's category (a fixed, sparse map: cases after phones, films after
    cameras), the last event's category again, one of the last ``recent_window`` events'
    categories, or the catalogue's popularity; then an item of that category by its (Zipf)
    popularity. With ``repeat_prob`` the event is the last event's item again, mostly as a cart,
    fav or buy. ``implicit_oracle_log_probabilities`` is the rule; tests/data/test_synthetic.py
    checks that it ranks P5 samples far better than popularity does. Every event is a positive;
    ``bstrec.data.samples.build_samples`` adds P5's sampled negatives.
    """
    c = config
    world = build_implicit_world(c)
    events = _implicit_events(world, np.random.default_rng([c.seed, 1, 1]), c.n_users)
    items_table = pl.DataFrame({
        "item_id": np.arange(1, world.n_items + 1, dtype=np.int64),
        "category": [f"cat_{k}" for k in world.item_category.tolist()],
    }, schema={"item_id": pl.Int64, "category": pl.String})
    users_table = pl.DataFrame({"user_id": np.arange(1, c.n_users + 1, dtype=np.int64)},
                               schema={"user_id": pl.Int64})
    return Dataset(
        name=IMPLICIT_NAME, events=events, items=items_table, users=users_table,
        feedback="implicit",
        meta={"protocol": "P5", "generator": "bstrec.data.synthetic.generate_implicit",
              "config": dataclasses.asdict(c)},
    )


def _next_categories(world: ImplicitWorld, k: int, recent: IntArray, cat_cdf: FloatArray,
                     weights: FloatArray, rng: np.random.Generator) -> tuple[IntArray, BoolArray]:
    """The categories of the ``k``-th events of the users whose ring buffers of recent
    categories are ``recent`` (m, recent_window), and which of them repeat the last event."""
    c = world.config
    m = recent.shape[0]
    popular = np.minimum(np.searchsorted(cat_cdf, rng.random(m) * cat_cdf[-1]),
                         c.n_categories - 1)
    if k == 0:
        return popular, np.zeros(m, dtype=bool)
    last_cat = recent[:, (k - 1) % c.recent_window]
    src = rng.choice(4, size=m, p=weights)
    succ = world.successor[last_cat, rng.integers(0, c.successors, m)]
    back = rng.integers(0, min(k, c.recent_window), m)
    old = recent[np.arange(m), (k - 1 - back) % c.recent_window]
    cat = np.select([src == CAT_SUCCESSOR, src == CAT_SAME, src == CAT_RECENT],
                    [succ, last_cat, old], popular)
    repeat: BoolArray = np.less(rng.random(m), c.repeat_prob)
    return np.where(repeat, last_cat, cat), repeat


def _implicit_events(world: ImplicitWorld, rng: np.random.Generator, n_users: int,
                     first_user: int = 1) -> pl.DataFrame:
    """The events of ``n_users`` users (ids from ``first_user``) of ``generate_implicit``."""
    c = world.config
    lo, hi = c.events_per_user
    n_ev = rng.integers(lo, hi + 1, n_users)
    w = world.category_weights()
    cat_cdf = np.cumsum(world.category_popularity)
    fresh_p = np.asarray(c.action_probs, dtype=np.float64)
    repeat_p = np.asarray(c.repeat_action_probs, dtype=np.float64)

    # Step through event positions, all users at once: each step reads the previous ones.
    items = np.zeros((n_users, hi), dtype=np.int64)  # item index
    actions = np.zeros((n_users, hi), dtype=np.int64)
    recent = np.zeros((n_users, c.recent_window), dtype=np.int64)  # ring buffer of categories
    for k in range(hi):
        users = np.flatnonzero(n_ev > k)
        m = users.shape[0]
        cat, repeat = _next_categories(world, k, recent[users], cat_cdf, w, rng)
        item = _sample_within(cat, world.item_popularity, world.item_category, rng)
        if k > 0:
            item = np.where(repeat, items[users, k - 1], item)
        act_fresh = rng.choice(len(ACTIONS), size=m, p=fresh_p / fresh_p.sum())
        act_repeat = rng.choice(len(ACTIONS), size=m, p=repeat_p / repeat_p.sum())
        items[users, k] = item
        actions[users, k] = np.where(repeat, act_repeat, act_fresh)
        recent[users, k % c.recent_window] = cat

    filled = np.arange(hi)[None, :] < n_ev[:, None]  # (U, hi), row-major = user by user, in order
    item_idx = items[filled]
    action = actions[filled]
    ev_user = np.repeat(np.arange(n_users, dtype=np.int64), n_ev)
    n = int(n_ev.sum())
    user_first = np.cumsum(n_ev) - n_ev
    local = np.arange(n) - np.repeat(user_first, n_ev)

    # --- time, as in P4 without the drift
    is_start = (rng.random(n) < 1.0 / c.mean_session_length) | (local == 0)
    # the users of this call: a chunk of write_implicit_log's users, or all of them
    tau = _activity_seconds(dataclasses.replace(c, n_users=n_users), rng, is_start, ev_user,
                            n_ev)
    ts = _strictly_increasing(c.start_timestamp + np.floor(tau).astype(np.int64), ev_user)

    return pl.DataFrame({
        "user_id": ev_user + first_user,
        "item_id": item_idx + 1,
        "timestamp": ts,
        "action": np.asarray(ACTIONS)[action],
        "value": None,
        "event_id": None,
    }, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64,
               "action": pl.String, "value": pl.Float64, "event_id": pl.String})


def write_implicit_log(config: ImplicitConfig, path: str | Path,
                       users_per_chunk: int = 100_000) -> int:
    """Write a ``generate_implicit``-like log of ``config.n_users`` users to one Parquet file,
    chunk by chunk (memory bounded by a chunk, whatever the size): columns ``user_id``,
    ``item_id``, ``timestamp``, ``action``, ``category`` (read it as ``--dataset parquet``).
    Chunk k draws from its own seeded stream: the same world and rules as ``generate_implicit``
    but not its events. Returns the number of events."""
    import pyarrow.parquet as pq

    if users_per_chunk < 1:
        raise ValueError(f"users_per_chunk must be >= 1, got {users_per_chunk}")
    world = build_implicit_world(config)
    categories = pl.Series([f"cat_{k}" for k in range(config.n_categories)])
    total = 0
    writer: pq.ParquetWriter | None = None
    try:
        for k, start in enumerate(range(0, config.n_users, users_per_chunk)):
            n = min(users_per_chunk, config.n_users - start)
            rng = np.random.default_rng([config.seed, 1, 2, k])
            chunk = (_implicit_events(world, rng, n, first_user=start + 1)
                     .select("user_id", "item_id", "timestamp", "action"))
            cats = world.item_category[chunk["item_id"].to_numpy() - 1]
            chunk = chunk.with_columns(categories.gather(cats).alias("category"))
            table = chunk.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(str(path), table.schema)
            writer.write_table(table)
            total += chunk.height
    finally:
        if writer is not None:
            writer.close()
    return total


# --- Taobao-format mode (P5 ``synthetic-taobao``: pv, cart, fav, buy with item prices) ------------

TAOBAO_NAME = "synthetic-taobao"


@dataclass(frozen=True)
class TaobaoConfig:
    """Every knob of the Taobao-format generator (see ``generate_taobao``).

    Clicks follow ``generate_implicit``'s category chain (its knobs below); each view may then
    be followed by a fav, a cart and a buy of the same item. A buy's probability reads the
    view's P5 history (the user's last ``history_length`` events, any action) and the price:
    ``sigmoid(base_buy_logit + quality - price_weight * ln(price / price_median)
    + revisit_weight * [item in the history] + sequel_weight * [item's category follows the
    last event's category])`` (``taobao_buy_probabilities``). Prices do not move clicks, so
    engagement and revenue rank differently.
    """

    seed: int = 0
    n_users: int = 1000
    views_per_user: tuple[int, int] = (30, 90)  # inclusive range, uniform per user
    n_items: int = 5000
    n_categories: int = 100
    category_zipf: float = 0.9
    item_zipf: float = 0.8
    successors: int = 3
    category_source_weights: tuple[float, float, float, float] = (0.5, 0.2, 0.1, 0.2)
    recent_window: int = 5
    repeat_prob: float = 0.15  # the next view is the last event's item again
    # Prices: log-normal per category (its level), times a log-normal spread within it.
    price_median: float = 30.0
    category_price_sigma: float = 0.8
    item_price_sigma: float = 0.5
    # Purchase of a view (logit terms, see the class docstring).
    history_length: int = 20
    base_buy_logit: float = -3.5
    quality_sigma: float = 0.5  # per-item logit offset: learnable from the item id
    price_weight: float = 0.8
    revisit_weight: float = 1.5
    sequel_weight: float = 1.5
    # Carts and favourites of a view: more likely when it is bought (they come before the buy).
    cart_prob: float = 0.03
    cart_prob_bought: float = 0.6
    fav_prob: float = 0.03
    fav_prob_bought: float = 0.2
    # Time, as ``ImplicitConfig``.
    mean_session_length: float = 6.0
    start_timestamp: int = 1511539200  # 2017-11-25T00:00:00Z, the Taobao log's first day
    period_days: float = 30.0
    start_spread_days: float = 5.0
    within_gap_median_s: float = 60.0
    within_gap_sigma: float = 0.9
    session_gap_sigma: float = 1.0

    def __post_init__(self) -> None:
        lo, hi = self.views_per_user
        probs = (self.cart_prob, self.cart_prob_bought, self.fav_prob, self.fav_prob_bought)
        checks = {
            "1 <= views_per_user[0] <= views_per_user[1]": 1 <= lo <= hi,
            "price_median > 0": self.price_median > 0,
            "category_price_sigma >= 0 and item_price_sigma >= 0":
                self.category_price_sigma >= 0 and self.item_price_sigma >= 0,
            "history_length >= 1": self.history_length >= 1,
            "quality_sigma >= 0": self.quality_sigma >= 0,
            "cart and fav probabilities in [0, 1]": all(0.0 <= p <= 1.0 for p in probs),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"TaobaoConfig: invalid values, need {failed}")
        self.implicit()  # the catalogue, chain and time knobs are checked there

    def implicit(self) -> ImplicitConfig:
        """The ``ImplicitConfig`` of the catalogue, the category chain and the time."""
        return ImplicitConfig(
            seed=self.seed, n_users=self.n_users, events_per_user=self.views_per_user,
            n_items=self.n_items, n_categories=self.n_categories,
            category_zipf=self.category_zipf, item_zipf=self.item_zipf,
            successors=self.successors, category_source_weights=self.category_source_weights,
            recent_window=self.recent_window, repeat_prob=self.repeat_prob,
            mean_session_length=self.mean_session_length, start_timestamp=self.start_timestamp,
            period_days=self.period_days, start_spread_days=self.start_spread_days,
            within_gap_median_s=self.within_gap_median_s,
            within_gap_sigma=self.within_gap_sigma, session_gap_sigma=self.session_gap_sigma)


@dataclass(frozen=True)
class TaobaoWorld:
    """The hidden structure of one seed of the Taobao-format generator (arrays by item_id - 1)."""

    config: TaobaoConfig
    chain: ImplicitWorld  # catalogue, popularity and category successors
    price: FloatArray  # (I,) in currency units, rounded to cents
    quality: FloatArray  # (I,) purchase logit offset

    @property
    def n_items(self) -> int:
        return self.chain.n_items


def build_taobao_world(config: TaobaoConfig = TaobaoConfig()) -> TaobaoWorld:
    """The catalogue, category chain, prices and item qualities for ``config.seed``."""
    c = config
    chain = build_implicit_world(c.implicit())
    rng = np.random.default_rng([c.seed, 0, 3])
    level = c.category_price_sigma * rng.standard_normal(c.n_categories)
    log_price = (np.log(c.price_median) + level[chain.item_category]
                 + c.item_price_sigma * rng.standard_normal(c.n_items))
    price = np.maximum(np.round(np.exp(log_price), 2), 0.01)
    quality = c.quality_sigma * rng.standard_normal(c.n_items)
    return TaobaoWorld(config=c, chain=chain, price=price, quality=quality)


def taobao_buy_probabilities(world: TaobaoWorld, history: npt.ArrayLike,
                             targets: npt.ArrayLike) -> FloatArray:
    """P(a view of ``targets`` is bought | its history), the generator's rule.

    history: (N, L) item ids of the view's P5 history (every action), oldest first, ``PAD`` on
    the left (``history_matrix``); only the last ``history_length`` columns are read.
    targets: (N,) item ids. Returns (N,). The sequel term reads the ORDER: the same items with
    another event last give another probability.
    """
    c = world.config
    hist, tgt = _oracle_inputs(history, targets, world.n_items)
    hist = hist[:, -c.history_length:] if hist.shape[1] else hist
    t = tgt - 1
    logit = (c.base_buy_logit + world.quality[t]
             - c.price_weight * np.log(world.price[t] / c.price_median))
    if hist.shape[1]:
        revisit = (hist == tgt[:, None]).any(axis=1)
        last = hist[:, -1]
        last_cat = world.chain.item_category[np.maximum(last, 1) - 1]
        t_cat = world.chain.item_category[t]
        sequel = (last != PAD) & (world.chain.successor[last_cat] == t_cat[:, None]).any(axis=1)
        logit = logit + c.revisit_weight * revisit + c.sequel_weight * sequel
    out: FloatArray = 1.0 / (1.0 + np.exp(-logit))
    return out


def generate_taobao(config: TaobaoConfig = TaobaoConfig()) -> Dataset:
    """A seeded log in the Taobao UserBehavior format: actions pv, fav, cart, buy; items with
    a ``category`` and a ``price``.

    Views (pv) follow ``generate_implicit``'s rule (a category from the user's last events in
    order, then an item by popularity; ``repeat_prob`` repeats the last item). Each view is
    bought with ``taobao_buy_probabilities`` on its P5 history, and followed, within the
    session, by a fav and a cart (likelier when bought) and the buy, in that order. Every
    event is a P5 positive; the conversion of a view is a later buy of its item
    (``bstrec.data.samples.with_conversion_labels``). ``write_taobao_log`` writes it as
    UserBehavior.csv for ``bstrec.data.taobao.load_taobao``.
    """
    c = config
    world = build_taobao_world(c)
    events = _taobao_events(world, np.random.default_rng([c.seed, 1, 3]))
    items_table = pl.DataFrame({
        "item_id": np.arange(1, world.n_items + 1, dtype=np.int64),
        "category": [str(k + 1) for k in world.chain.item_category.tolist()],
        "price": world.price,
    }, schema={"item_id": pl.Int64, "category": pl.String, "price": pl.Float64})
    users_table = pl.DataFrame({"user_id": np.arange(1, c.n_users + 1, dtype=np.int64)},
                               schema={"user_id": pl.Int64})
    return Dataset(
        name=TAOBAO_NAME, events=events, items=items_table, users=users_table,
        feedback="implicit",
        meta={"protocol": "P5", "generator": "bstrec.data.synthetic.generate_taobao",
              "config": dataclasses.asdict(c)},
    )


def _taobao_events(world: TaobaoWorld, rng: np.random.Generator) -> pl.DataFrame:
    """The events of ``generate_taobao``: views stepped through all users at once, each
    followed by its fav, cart and buy, the history kept as it grows."""
    c, w = world.config, world.chain
    n_users = c.n_users
    lo, hi = c.views_per_user
    n_views = rng.integers(lo, hi + 1, n_users)
    weights = w.category_weights()
    cat_cdf = np.cumsum(w.category_popularity)
    H = c.history_length
    hist = np.zeros((n_users, H), dtype=np.int64)  # item ids, most recent last, PAD on the left
    recent = np.zeros((n_users, c.recent_window), dtype=np.int64)  # categories of the views
    # per (user, view): item id and the flags of what follows it
    items = np.zeros((n_users, hi), dtype=np.int64)
    acts = np.zeros((n_users, hi, len(ACTIONS)), dtype=bool)  # pv, cart, fav, buy

    def push(users: IntArray, item: IntArray) -> None:
        hist[users, :-1] = hist[users, 1:]
        hist[users, -1] = item

    for k in range(hi):
        users = np.flatnonzero(n_views > k)
        m = users.shape[0]
        cat, repeat = _next_categories(w, k, recent[users], cat_cdf, weights, rng)
        item = _sample_within(cat, w.item_popularity, w.item_category, rng) + 1
        if k > 0:
            item = np.where(repeat, items[users, k - 1], item)
        bought = rng.random(m) < taobao_buy_probabilities(world, hist[users], item)
        fav = rng.random(m) < np.where(bought, c.fav_prob_bought, c.fav_prob)
        cart = rng.random(m) < np.where(bought, c.cart_prob_bought, c.cart_prob)
        items[users, k] = item
        acts[users, k] = np.stack([np.ones(m, dtype=bool), cart, fav, bought], axis=1)
        recent[users, k % c.recent_window] = cat
        # the events as they will be ordered: pv, fav, cart, buy
        push(users, item)
        for flag in (fav, cart, bought):
            push(users[flag], item[flag])

    # Expand views into events: (user, view, action) in the order pv, fav, cart, buy.
    order = [ACTIONS.index(a) for a in ("pv", "fav", "cart", "buy")]
    filled = np.arange(hi)[None, :, None] < n_views[:, None, None]
    present = acts[:, :, order] & filled  # (U, hi, 4), row-major = user, view, action order
    u_idx, v_idx, a_idx = np.nonzero(present)
    action = np.asarray(order)[a_idx]
    item_id = items[u_idx, v_idx]
    n_ev = np.bincount(u_idx, minlength=n_users).astype(np.int64)
    # a session starts only at a view; a view's fav, cart and buy follow it seconds later
    is_start = (rng.random(u_idx.shape[0]) < 1.0 / c.mean_session_length) & (action == 0)
    user_first = np.cumsum(n_ev) - n_ev
    is_start[user_first[n_ev > 0]] = True
    tau = _activity_seconds(c.implicit(), rng, is_start, u_idx.astype(np.int64), n_ev)
    ts = _strictly_increasing(c.start_timestamp + np.floor(tau).astype(np.int64),
                              u_idx.astype(np.int64))
    return pl.DataFrame({
        "user_id": u_idx.astype(np.int64) + 1,
        "item_id": item_id,
        "timestamp": ts,
        "action": np.asarray(ACTIONS)[action],
        "value": None,
        "event_id": None,
    }, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64,
               "action": pl.String, "value": pl.Float64, "event_id": pl.String})


def write_taobao_log(config: TaobaoConfig, root: str | Path) -> Path:
    """Write ``generate_taobao(config)`` in the Taobao UserBehavior format into folder ``root``:
    ``UserBehavior.csv`` (no header: user_id, item_id, category_id, behavior_type, timestamp)
    and ``item_prices.csv`` (``item_id,price``), which ``load_taobao`` reads. Returns ``root``."""
    ds = generate_taobao(config)
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    (ds.events.join(ds.items.select("item_id", pl.col("category").cast(pl.Int64)
                                    .alias("category_id")), on="item_id", how="left",
                    maintain_order="left")
     .select("user_id", "item_id", "category_id", "action", "timestamp")
     .write_csv(out / "UserBehavior.csv", include_header=False))
    ds.items.select("item_id", "price").write_csv(out / PRICE_FILE)
    return out
