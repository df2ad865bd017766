"""Flash attention kernels of MiMo-V2-Flash and their host launchers.

    flash.py    device helpers shared by both kernels (online softmax, QK / mask / PV matmuls,
                P transposes, row-tile batches, head-dim contraction splits)
    host.py     host-side input checks and layout conversions
    plan.py     host-side plan of a cached-attention launch (units, tiles, key ranges, masks)
    prefill.py  the prefill kernel (one fresh sequence, causal / sliding window) + launcher
    decode.py   the cached-attention kernel (ragged decode / prefill on a history) + launchers
    batch.py    attention_batch: the NKI backend's attention, one of the two kernels per problem
"""
from .batch import PREFILL_MIN_TOKENS, attention_batch
from .decode import EMPTY_POSITION, attention_decode, attention_decode_cache, attention_decode_kernel
from .prefill import attention_prefill, attention_prefill_kernel

__all__ = ["PREFILL_MIN_TOKENS", "EMPTY_POSITION", "attention_batch", "attention_decode", "attention_decode_cache",
           "attention_decode_kernel", "attention_prefill", "attention_prefill_kernel"]
