"""Parallelism that knows nothing of OLMo: the mesh authority, TP layers, pipeline stages, FSDP wrapping."""

from megaolmo.parallel.layers import (
    ColumnParallelLinear,
    HeadParallelRMSNorm,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    tensor_parallel_layers,
)

__all__ = [
    "ColumnParallelLinear",
    "HeadParallelRMSNorm",
    "RowParallelLinear",
    "TensorParallel",
    "VocabParallelEmbedding",
    "tensor_parallel_layers",
]
