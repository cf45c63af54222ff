"""Sampled softmax: the logQ correction, masking of accidental hits and of the positive."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bstrec.retrieval.loss import sampled_softmax_loss

B, D = 6, 8


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    v = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    return u, v, torch.arange(10, 10 + B)


def test_logq_correction_subtracts_log_q_from_every_logit() -> None:
    u, v, ids = _data()
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05]) * B)
    T = 0.1
    got = sampled_softmax_loss(u, v, ids, temperature=T, log_q=log_q)
    by_hand = F.cross_entropy(u @ v.T / T - log_q.unsqueeze(0), torch.arange(B))
    plain = sampled_softmax_loss(u, v, ids, temperature=T)
    assert torch.isclose(got, by_hand)
    assert torch.isclose(plain, F.cross_entropy(u @ v.T / T, torch.arange(B)))
    assert not torch.isclose(got, plain)


def test_uniform_log_q_leaves_the_loss_unchanged() -> None:
    # a constant shift of every logit cancels in the softmax: logQ only matters when Q is skewed
    u, v, ids = _data(1)
    same = torch.full((B,), torch.log(torch.tensor(0.3)).item())
    assert torch.isclose(sampled_softmax_loss(u, v, ids, log_q=same),
                         sampled_softmax_loss(u, v, ids))


def test_logq_lowers_the_penalty_of_popular_negatives() -> None:
    # with an item sampled often, its logit is lowered: it pushes the other rows' losses less
    u, v, _ = _data(2)
    v[1] = u[0]  # row 0's user looks like item 1: a strong in-batch negative for row 0
    base = torch.zeros(B)
    popular_1 = base.clone()
    popular_1[1] = 3.0
    loss_rows = []
    for lq in (base, popular_1):
        logits = u @ v.T - lq.unsqueeze(0)
        loss_rows.append(F.cross_entropy(logits, torch.arange(B), reduction="none"))
    assert loss_rows[1][0] < loss_rows[0][0]


def test_temperature_scales_the_logits() -> None:
    u, v, ids = _data(3)
    assert torch.isclose(sampled_softmax_loss(u, v, ids, temperature=0.5),
                         F.cross_entropy(u @ v.T / 0.5, torch.arange(B)))


def test_duplicate_positives_in_a_batch_are_not_negatives() -> None:
    u, v, ids = _data(4)
    ids = ids.clone()
    ids[3] = ids[0]  # rows 0 and 3 hold the same item
    got = sampled_softmax_loss(u, v, ids)
    logits = u @ v.T
    logits[0, 3] = logits[3, 0] = float("-inf")
    assert torch.isclose(got, F.cross_entropy(logits, torch.arange(B)))


def test_extra_negatives_with_their_own_correction_and_the_positive_masked() -> None:
    u, v, ids = _data(5)
    g = torch.Generator().manual_seed(0)
    neg = F.normalize(torch.randn(B, 3, D, generator=g), dim=-1)
    neg_ids = torch.randint(100, 200, (B, 3), generator=g)
    neg_ids[2, 1] = ids[2]  # a negative equal to the positive must not count
    nlq = torch.rand(B, 3, generator=g)
    got = sampled_softmax_loss(u, v, ids, temperature=0.2, neg=neg, neg_ids=neg_ids,
                               neg_log_q=nlq)
    nl = torch.einsum("bd,bmd->bm", u, neg) / 0.2 - nlq
    nl[2, 1] = float("-inf")
    by_hand = F.cross_entropy(torch.cat([u @ v.T / 0.2, nl], 1), torch.arange(B))
    assert torch.isclose(got, by_hand)
