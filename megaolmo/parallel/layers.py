"""Tensor-parallel building blocks: column- and row-parallel linears and a vocab-parallel embedding.

A TP linear is communication around a local GEMM (DESIGN.md, principle 5). With
a tensor-parallel degree of 1 there is nothing to communicate, and each layer
is exactly its local op, so a model written against these classes runs on one
device with no process group at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def local_linear(in_features: int, out_features: int) -> nn.Linear:
    """The local GEMM of a TP linear: a bias-free `nn.Linear` over this rank's shard."""
    return nn.Linear(in_features, out_features, bias=False)


class ColumnParallelLinear(nn.Module):
    """`y = x @ W.T` with W split along its output features: each rank produces a slice of y."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.linear = local_linear(in_features, out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class RowParallelLinear(nn.Module):
    """`y = x @ W.T` with W split along its input features: partial sums of y are reduced across ranks."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.linear = local_linear(in_features, out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows (the vocabulary) are split across ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def vocab_parallel_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits against a (vocab-sharded) embedding matrix, for a head tied to the input embedding."""
    return F.linear(hidden, weight)
