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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from bstrec.data.schema import Dataset

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

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


def oracle_probabilities(world: World, history: npt.ArrayLike, targets: npt.ArrayLike,
                         user_ids: npt.ArrayLike | None = None) -> FloatArray:
    """True P(value = 1) for each (history, target): the rule of the module docstring.

    history: (N, L) item ids, oldest first along L, ``PAD`` (0) in empty slots (anywhere);
    targets: (N,) item ids; user_ids: (N,) user ids for the segment term (None: no segment term).
    Returns (N,) probabilities. Only the last ``config.history_length`` columns are what the
    generator used; pass exactly P1's history to reproduce its labels.
    """
    c = world.config
    hist = np.asarray(history, dtype=np.int64)
    tgt = np.asarray(targets, dtype=np.int64)
    if hist.ndim != 2 or tgt.ndim != 1 or hist.shape[0] != tgt.shape[0]:
        raise ValueError(f"need history (N, L) and targets (N,), got {hist.shape} and {tgt.shape}")
    if tgt.size and (tgt.min() < 1 or tgt.max() > world.n_items):
        raise ValueError("target item id out of range")
    if hist.size and (hist.min() < 0 or hist.max() > world.n_items):
        raise ValueError("history item id out of range")
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
    within = np.exp(np.log(c.within_gap_median_s) + c.within_gap_sigma * rng.standard_normal(n))
    # Between sessions: log-normal shapes, rescaled so that each user's sessions fill 60-100% of
    # what is left of the period after their start (a bounded span, whatever the draws).
    start = rng.random(c.n_users) * c.start_spread_days * day
    span = (period - start) * rng.uniform(0.6, 1.0, c.n_users)
    between = np.exp(c.session_gap_sigma * rng.standard_normal(n)) * (is_start & (local > 0))
    between_sum = np.bincount(ev_user, weights=between, minlength=c.n_users)
    between *= (span / np.maximum(between_sum, 1e-12))[ev_user]
    gap = np.where(is_start, between, np.maximum(within, 1.0))
    gap[user_first] = start
    tau = np.cumsum(gap)
    tau -= np.repeat(tau[user_first] - gap[user_first], n_ev)  # restart the clock per user
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
