"""Connector between the experts: learnable queries on the LM side, a small transformer projector on the DiT side.

    queries  Q [N, H_lm]                   appended after the (left-padded) prompt embeddings
    h        = LM(prompt ++ Q)[-N:]        [B, N, H_lm], the final-normed last hidden states of the queries
    c        = W_out( Enc_k( W_in h ) )    [B, N, D_cond], k pre-norm transformer encoder layers of width d
    pooled   = W_pool( mean_N Enc_k(W_in h) )   [B, D_pool], only for DiTs with a pooled input (SD3)

The queries are initialised like token embeddings (std 0.02). W_out is zero-free (default init): a zero init would
make every prompt condition the DiT identically at step 0, which breaks the conditional/unconditional contrast CFG
relies on. Cost: the N extra query positions in the LM forward plus O(k B N d^2) in the projector.
"""
from __future__ import annotations

import torch
from torch import nn


class QueryConnector(nn.Module):
    def __init__(self, lm_width: int, cond_width: int, *, num_queries: int, dim: int, layers: int, heads: int,
                 pooled_width: int | None = None):
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, lm_width) * 0.02)
        self.proj_in = nn.Linear(lm_width, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, cond_width)
        self.proj_pooled = nn.Linear(dim, pooled_width) if pooled_width else None

    def forward(self, query_hidden: torch.Tensor):
        """query_hidden [B, N, H_lm] -> (cond [B, N, D_cond], pooled [B, D_pool] or None)."""
        x = self.norm(self.encoder(self.proj_in(query_hidden)))
        pooled = self.proj_pooled(x.mean(1)) if self.proj_pooled is not None else None
        return self.proj_out(x), pooled
