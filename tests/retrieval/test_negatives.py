"""Negative samplers: never the positive, inside the catalog, distributed as they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bstrec.features.spec import N_RESERVED
from bstrec.retrieval.negatives import (
    HardSampler,
    NegativeSampler,
    PopularitySampler,
    UniformSampler,
    build_sampler,
    in_batch_log_q,
    item_counts,
)

N = 12  # 10 catalog items: ids 2..11


def _positives(n: int = 4000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(N_RESERVED, N, (n,), generator=g)


def _counts() -> np.ndarray:
    c = np.zeros(N)
    c[N_RESERVED:] = [1000, 300, 100, 50, 20, 10, 5, 2, 1, 0]
    return c


@pytest.mark.parametrize("sampler", [
    UniformSampler(N, 8),
    PopularitySampler(_counts(), 8),
    HardSampler(N, 8, pool=9),
])
def test_negatives_never_include_the_positive(sampler: NegativeSampler) -> None:
    pos = _positives()
    scores = torch.randn(len(pos), N)
    scores[torch.arange(len(pos)), pos] = 100.0  # the model loves the positive most
    neg = sampler.sample(pos, torch.Generator().manual_seed(1), scores)
    assert neg.shape == (len(pos), 8)
    assert not (neg == pos.unsqueeze(1)).any()
    assert int(neg.min()) >= N_RESERVED and int(neg.max()) < N


def test_popularity_sampler_never_draws_a_dominant_positive() -> None:
    counts = np.zeros(N)
    counts[N_RESERVED] = 1e9  # nearly every draw is item 2
    counts[N_RESERVED + 1:] = 1
    s = PopularitySampler(counts, 16, power=1.0)
    pos = torch.full((500,), N_RESERVED)
    neg = s.sample(pos, torch.Generator().manual_seed(0))
    assert not (neg == N_RESERVED).any()


def test_uniform_sampler_is_uniform_over_the_rest_of_the_catalog() -> None:
    s = UniformSampler(N, 50)
    pos = torch.full((2000,), 5)
    neg = s.sample(pos, torch.Generator().manual_seed(0)).numpy().ravel()
    freq = np.bincount(neg, minlength=N)[N_RESERVED:] / neg.size
    expected = np.full(N - N_RESERVED, 1 / (N - N_RESERVED - 1))
    expected[5 - N_RESERVED] = 0.0
    assert np.abs(freq - expected).max() < 0.01
    assert torch.allclose(s.log_q(torch.tensor([3])), torch.tensor([np.log(50 / 9)]).float())


def test_popularity_sampler_follows_counts_to_the_power() -> None:
    c = _counts()
    s = PopularitySampler(c, 100, power=0.75)
    pos = torch.full((2000,), N - 1)  # the rarest item: its exclusion barely moves the rest
    neg = s.sample(pos, torch.Generator().manual_seed(0)).numpy().ravel()
    freq = np.bincount(neg, minlength=N)[N_RESERVED:N - 1] / neg.size
    w = (c[N_RESERVED:N - 1] + 1) ** 0.75
    assert np.abs(freq - w / w.sum()).max() < 0.01
    # log_q = log(M * p): what the loss subtracts for a popular item exceeds a rare one's
    lq = s.log_q(torch.tensor([N_RESERVED, N - 2]))
    assert lq[0] > lq[1]
    assert torch.isclose(lq[0], torch.log(s.probs[N_RESERVED] * 100).float())


def test_hard_sampler_draws_among_the_top_scored_and_skips_masked() -> None:
    B = 300
    pos = torch.full((B,), 2)
    scores = torch.arange(N, dtype=torch.float32).repeat(B, 1)  # higher id = higher score
    scores[:, 11] = -torch.inf  # e.g. already in the user's history
    neg = HardSampler(N, 2, pool=3).sample(pos, torch.Generator().manual_seed(0), scores)
    assert set(neg.unique().tolist()) <= {8, 9, 10}
    assert set(neg.unique().tolist()) == {8, 9, 10}  # uniform inside the pool
    assert (neg[:, 0] != neg[:, 1]).all()  # without replacement
    assert (HardSampler(N, 2).log_q(neg) == 0).all()
    with pytest.raises(ValueError, match="scores"):
        HardSampler(N, 2).sample(pos, torch.Generator())


def test_in_batch_log_q_and_builder() -> None:
    c = item_counts(np.array([2, 2, 2, 3, 0, 1]), 5)
    assert c.tolist() == [0, 0, 3, 1, 0]  # reserved ids never count
    lq = in_batch_log_q(c, 10)
    p = (c + 1) / (c + 1).sum()
    assert torch.allclose(lq, torch.from_numpy(np.log(10 * p)).float())
    assert isinstance(build_sampler("uniform", c, 2), UniformSampler)
    assert isinstance(build_sampler("hard", c, 2, pool=3), HardSampler)
    with pytest.raises(ValueError, match="unknown negative sampler"):
        build_sampler("nope", c, 2)
