"""One decode step of a MoE decoder layer through the kernels (`NkiOps`, mimo_v2_flash/nki_ops.py;
tests/test_nki_layer.py), per layer kind and weight dtype.

The step runs on one rank of a 32-way expert-parallel layout, for decode batches B (each sequence
one new token on a history of `DECODE_CONTEXT` keys): data-parallel attention over the rank's B
sequences and the MoE with the rank's 8 local experts. With only those 8 allowed and top-8 routing
every token visits all 8, i.e. B rows per local expert and 8B rows in all, which is what a rank
receives when 32 ranks of B tokens route uniformly over 256 experts. The all-to-all dispatch and
combine are not included (see docs/expert_parallel.md). Rows carry each op's estimate (`ops`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from mimo_v2_flash.config import MiMoV2FlashConfig
from mimo_v2_flash.kv_cache import KVCache
from mimo_v2_flash.layer import LocalExperts, TokenBatch, decoder_layer
from mimo_v2_flash.nki_ops import NkiOps
from mimo_v2_flash.placement import ExpertPlacement
from mimo_v2_flash.selfcheck.decoder_layer import LAYER_KINDS, expert_mask, layer_config
from mimo_v2_flash.weights import random_weights

BF16 = np.dtype(ml_dtypes.bfloat16)
EP_WORLD_SIZE, EP_RANK = 32, 5      # the benchmarked rank: experts 40..47 of a contiguous layout
DECODE_CONTEXT = 4096               # keys of history per sequence
MAX_DECODE_BATCH = 64               # larger token counts of the kernel benchmark are prefill sizes


def history_cache(config: MiMoV2FlashConfig, sequences: int, context: int, seed=0) -> KVCache:
    """A bf16 KV cache holding `context` random keys and values per sequence (positions 0..context-1).

    Filled in two parts, the first just over half: a full layer's capacity then doubles to more
    than `context`, so the decode step's key fits without copying the whole cache."""
    cache = KVCache(config, sequences, dtype=BF16)
    rng = np.random.default_rng(seed)
    for layer, layer_cache in enumerate(cache.layers):
        _, kv_heads, d, dv = config.attention_shape(layer)
        for seq in range(sequences):
            for part in np.split(np.arange(context), [context // 2 + 1]):
                layer_cache.update(seq, part, rng.standard_normal((len(part), kv_heads, d), np.float32),
                                   rng.standard_normal((len(part), kv_heads, dv), np.float32))
    cache.seq_lens[:] = context
    return cache


def decode_step_cost(ops: NkiOps, batch: int, context: int, seed=0) -> dict:
    """`cost_summary()` of one decode step of layer 0: `batch` sequences, one new token each."""
    config = ops.config
    cache = history_cache(config, batch, context, seed)
    x = np.random.default_rng(seed).standard_normal((batch, config.hidden_size)).astype(np.float32)
    tokens = TokenBatch(list(range(batch)), list(range(batch)), list(range(1, batch + 1)),
                        np.full(batch, context))
    ops.reset_costs()
    decoder_layer(ops, config, 0, x, tokens, cache, LocalExperts(ops))
    return ops.cost_summary()


def bench(token_counts, context=DECODE_CONTEXT):
    """Per layer kind and weight dtype, one decode step per decode batch B in `token_counts`
    (B <= MAX_DECODE_BATCH) on one rank of 32-way expert parallelism (module doc)."""
    batches = [b for b in token_counts if b <= MAX_DECODE_BATCH]
    experts = ExpertPlacement.contiguous(256, EP_WORLD_SIZE).experts_of(EP_RANK)
    for kind in LAYER_KINDS:
        config = layer_config(kind)
        weights = random_weights(config, seed=0, experts=experts)
        for dtype in ("bf16", "fp8"):
            ops = NkiOps(config, weights, expert_mask(config, experts), weight_dtype=dtype)
            for batch in batches:
                cost = decode_step_cost(ops, batch, context)
                step_us = cost["total"]["estimated_us"]
                yield dict(kernel=f"decoder_layer_{kind}_{dtype}",
                           shapes=f"decode ctx={context}, 8 experts: {step_us / batch:.1f} us/token",
                           tokens=batch, estimated_us=step_us, roofline_us=cost["total"]["roofline_us"],
                           per_token_us=step_us / batch, goal=None,
                           ops={op: c["estimated_us"] for op, c in cost["ops"].items()})

