"""One Transformer encoder block as BST uses it (Chen et al. 2019, eqs. 2-6).

Notation: B batch, T tokens (L+1 in BST), D width, H heads.

    S' = LayerNorm(S + Dropout(MultiHead(S)))
    F  = LayerNorm(S' + Dropout(LeakyReLU(S' W1 + b1) W2 + b2))

Post-LayerNorm as in the paper. Keys at padding positions are masked out of every query's
attention; each sample must have at least one present key (BST's target token always is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TransformerBlock(nn.Module):
    """(B, T, D), keep (B, T) bool (True = present) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.0,
                 leaky_slope: float = 0.01) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.LeakyReLU(leaky_slope),
                                 nn.Linear(ffn_dim, dim))
        self.ln2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (B, H, T, D/H)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self._qkv(x)
        mask = keep[:, None, None, :]  # (B, 1, 1, T): which keys every query may attend to
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D/H)
        x = self.ln1(x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, D))))
        out: Tensor = self.ln2(x + self.drop(self.ffn(x)))  # (B, T, D)
        return out

    def last_parts(self, last: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What ``forward_last`` computes from the last tokens (N, D) alone: their queries
        scaled by 1/sqrt(D/H) (N, D), values (N, D) and attention scores on themselves
        (N, H), for a caller that computes them once per token and reuses them."""
        N, D = last.shape
        H = self.heads
        q, k, v = self.qkv(last).split(D, -1)  # each (N, D)
        q = q * (D // H) ** -0.5
        return q, v, (q * k).reshape(N, H, D // H).sum(-1)

    def forward_last(self, context: Tensor, keep: Tensor, last: Tensor,
                     parts: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """``forward(cat([context, last_n]), cat([keep, True]))[:, -1]`` for each of N last tokens
        that share one context: context (1, T-1, D), keep (1, T-1), last (N, D) -> (N, D);
        ``parts``: ``last_parts(last)`` when the caller has them already.

        Exact because a block's output at a position reads the other positions only through
        their keys and values: the context's are computed once (not N times) and only the last
        query row of the attention is evaluated, O(N T D) instead of O(N T D^2). The context's
        keys and values enter as block-diagonal (D, H*(T-1)) and (H*(T-1), D) matrices, so that
        every head's scores and weighted values are one plain matrix product each and padding
        is an added -inf: an exported graph of a few large kernels, no per-head transposes.
        """
        N, D = last.shape
        H = self.heads
        dh, Tc = D // H, context.shape[1]
        q, v, s_last = self.last_parts(last) if parts is None else parts
        kv = F.linear(context[0], self.qkv.weight[D:], self.qkv.bias[D:])  # (T-1, 2D)
        eye = torch.eye(H, dtype=last.dtype, device=last.device).reshape(H, 1, H, 1)
        # k_bd[h*dh + d, g*(T-1) + j] = k[j, h*dh + d] if g == h, else 0; v_bd likewise
        k_bd = (kv[:, :D].T.reshape(H, dh, 1, Tc) * eye).reshape(D, H * Tc)
        v_bd = (kv[:, D:].reshape(Tc, H, dh).transpose(0, 1).reshape(H, Tc, 1, dh) * eye
                ).reshape(H * Tc, D)
        bias = torch.zeros(1, Tc, dtype=last.dtype, device=last.device).masked_fill(
            ~keep, float("-inf")).repeat(1, H)  # (1, H*(T-1))
        s_ctx = q @ k_bd + bias  # (N, H*(T-1))
        w = torch.softmax(torch.cat([s_ctx.reshape(N, H, Tc), s_last[..., None]], -1),
                          -1)  # (N, H, T)
        a = w[..., :Tc].reshape(N, H * Tc) @ v_bd \
            + (w[..., Tc:] * v.reshape(N, H, dh)).reshape(N, D)  # (N, D)
        x = self.ln1(last + self.drop(self.proj(a)))
        out: Tensor = self.ln2(x + self.drop(self.ffn(x)))  # (N, D)
        return out

    def attention_weights(self, x: Tensor, keep: Tensor) -> Tensor:
        """(B, T, D), (B, T) -> (B, H, T, T) softmax weights, recomputed explicitly (not hot)."""
        q, k, _ = self._qkv(x)
        scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)  # (B, H, T, T)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return torch.softmax(scores, -1)
