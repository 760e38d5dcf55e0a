"""Meta-training of small_fc_lopt in PyTorch, on lo_ops' own fused step."""

from .batched import META_NUMEL, BatchedSmallFCLOpt, pack_meta, split_meta

__all__ = ["META_NUMEL", "BatchedSmallFCLOpt", "pack_meta", "split_meta"]
