"""Cached attention kernel (kernels/attention/decode.py: decode and prefill on a history, ragged
batches, full layers and sliding-window ring buffers) against the NumPy reference
(mimo_v2_flash.reference.attention), on the CPU simulator.

The problems are built the way the decoder layer builds them: `LayerKVCache.update` returns the
cached keys in cache order (a wrapped ring buffer for SWA layers) followed by the new ones.

Error measure: max |kernel - reference| / max |reference| per sequence, the reference (fp32) fed
exactly the bf16 values the kernel reads (Q * scale, K, V rounded to bf16, scale 1), so the measure
is the kernel's own arithmetic: probabilities held in bf16 for the PV matmul and the bf16 output
(observed 3e-3 .. 6e-3), within `TOL`. Shapes: the full MiMo attention (64 query heads over 4 KV
heads for full layers; over 8 KV heads, 128-key window and sinks for SWA layers; dims 192 / 128).
"""
import numpy as np
import pytest

from mimo_kernels.attention import (EMPTY_POSITION, attention_batch, attention_decode, attention_decode_cache,
                                   attention_decode_kernel)
from mimo_kernels.attention.host import BF16
from mimo_kernels.attention.plan import head_row_tiling, tiled_rows, untiled_rows, value_rows
from mimo_kernels.backend import simulate
from mimo_kernels.launch import to_host
from mimo_v2_flash.layer import AttentionInput
from mimo_v2_flash.selfcheck.kernels_attention import (FULL, HEAD_DIM, HEADS, SCALE, SWA, V_DIM, cached_error,
                                                       cached_problem, random_sink)
from mimo_v2_flash.static_kv_cache import StaticLayerKVCache

TOL = 1e-2          # relative error per sequence (module doc)


def check(problems, window, sink, outs):
    for i, (p, out) in enumerate(zip(problems, outs)):
        assert out.shape == (len(p.q), p.q.shape[1], p.v.shape[2])
        err = cached_error([p], window, sink, [out])
        assert err < TOL, f"sequence {i} (T={len(p.q)}, S={len(p.k)}): error {err:.3e} >= {TOL}"


def run(specs, hq, hkv, window, sink=None, seed=0, lnc=1):
    rng = np.random.default_rng(seed)
    problems = [cached_problem(rng, h, n, hq, hkv, window) for h, n in specs]
    outs, report = to_host(attention_decode(problems, SCALE, window, sink, lnc=lnc))
    check(problems, window, sink, outs)
    return problems, outs, report


@pytest.mark.parametrize("layer", ["full", "swa"])
def test_decode_caches_shorter_equal_longer_than_window(layer):
    """Histories around the 128-key window: 0, 30, 127 (cache + new key = the window), 128
    (the ring is full), 129, 300 and 1000 (the ring wrapped several times)."""
    shape = FULL if layer == "full" else SWA
    sink = None if layer == "full" else random_sink(64)
    problems, _, _ = run([(h, 1) for h in (0, 30, 127, 128, 129, 300, 1000)], **shape, sink=sink)
    if layer == "swa":
        wrapped = problems[-1].k_positions
        assert len(wrapped) == 129 and not np.all(np.diff(wrapped[:-1]) > 0)   # ring order, wrapped


@pytest.mark.parametrize("layer", ["full", "swa"])
def test_issue_prefill_batch_on_histories(layer):
    """4 requests adding 64, 128, 256 and 256 tokens to histories of 100, 0, 37 and 300 tokens."""
    shape = FULL if layer == "full" else SWA
    run([(100, 64), (0, 128), (37, 256), (300, 256)], **shape,
        sink=None if layer == "full" else random_sink(64))


@pytest.mark.parametrize("layer", ["full", "swa"])
def test_issue_decode_batch_of_16(layer):
    """16 requests with histories 50 x4, 100 x4, 200 x4 and 400 x4 (the 128-key window crossed
    and not), one new token each, in one launch."""
    shape = FULL if layer == "full" else SWA
    run([(h, 1) for h in [50] * 4 + [100] * 4 + [200] * 4 + [400] * 4], **shape,
        sink=None if layer == "full" else random_sink(64))


def test_sinks_large_and_very_negative():
    """Even heads: sink +15 (takes almost all the probability); odd heads: -40 (no effect)."""
    sink = np.where(np.arange(64) % 2 == 0, 15.0, -40.0).astype(np.float32)
    rng = np.random.default_rng(4)
    problems = [cached_problem(rng, h, n, **SWA) for h, n in [(200, 1), (50, 1), (130, 20)]]
    outs, _ = to_host(attention_decode(problems, SCALE, 128, sink))
    for p, out in zip(problems, outs):
        for h in range(64):
            g = slice(h // 8, h // 8 + 1)
            one_head = AttentionInput(p.q[:, h:h + 1], p.k[:, g], p.v[:, g], p.q_positions, p.k_positions)
            err = cached_error([one_head], 128, sink[h:h + 1], [out[:, h:h + 1]])
            assert err < TOL, f"head {h} (sink {sink[h]}): error {err:.3e}"


def test_odd_shapes_and_sglang_window():
    """G = 3 heads per KV head, a 129-key window, tiny windows, a long prefill on a history."""
    run([(5, 1), (40, 7), (0, 3)], hq=12, hkv=4, window=129, sink=random_sink(12))
    run([(10, 3), (40, 20), (16, 5), (0, 7)], hq=8, hkv=4, window=16, sink=random_sink(8))
    run([(2100, 30), (7, 2)], hq=16, hkv=2, window=None)         # two key chunks, 32-token split


def test_batched_tiles_mask_the_keys_past_their_own():
    """Split tiles of 8 tokens share a batch; the last key, invisible to the earlier tiles, has a
    logit of ~2000 for every query. A tile whose row max took it in would underflow every exp()."""
    rng = np.random.default_rng(6)
    p = cached_problem(rng, 0, 32, **FULL)
    u = rng.standard_normal(p.q.shape[2]).astype(np.float32)
    q = (u + 0.1 * p.q).astype(np.float32)
    k = p.k.copy()
    k[-1] = 2000.0 / SCALE * u / float(u @ u)
    problem = AttentionInput(q, k, p.v, p.q_positions, p.k_positions)
    outs, _ = to_host(attention_decode([problem], SCALE, None, None))
    check([problem], None, None, outs)


def test_lnc2_splits_tiles_between_cores():
    _, out1, rep1 = run([(h, 1) for h in (300, 300, 500, 500)], **FULL, seed=5)
    _, out2, rep2 = run([(h, 1) for h in (300, 300, 500, 500)], **FULL, seed=5, lnc=2)
    for a, b in zip(out1, out2):
        np.testing.assert_array_equal(a, b)
    assert rep2.num_programs == 2 and rep2.estimated_time_s < 0.75 * rep1.estimated_time_s


def test_attention_batch_routes_fresh_prompts_to_the_prefill_kernel():
    """The NKI backend entry: a fresh 200-token prompt runs the prefill kernel, a decode step and
    a short prompt share one cached-attention launch; all equal the reference."""
    rng = np.random.default_rng(6)
    problems = [cached_problem(rng, 0, 200, **SWA), cached_problem(rng, 90, 1, **SWA),
                cached_problem(rng, 0, 5, **SWA)]
    sink = random_sink(64)
    outs, reports = to_host(attention_batch(problems, SCALE, 128, sink))
    assert [r.kernel for r in reports] == ["attention_prefill_kernel", "attention_decode_kernel"]
    check(problems, 128, sink, outs)


def test_misuse_is_rejected_with_clear_errors():
    rng = np.random.default_rng(7)
    good = cached_problem(rng, 10, 1, **FULL)
    other = cached_problem(rng, 10, 1, hq=64, hkv=8, window=None)
    with pytest.raises(ValueError, match="unlike problem 0"):
        attention_decode([good, other], SCALE)
    blind = AttentionInput(good.q, good.k, good.v, np.array([5]), np.arange(6, 17))
    with pytest.raises(ValueError, match="sees no key"):
        attention_decode([blind], SCALE)
    short = AttentionInput(good.q, good.k, good.v, np.array([10, 11]), good.k_positions)
    with pytest.raises(ValueError, match="2 query positions for 1 queries"):
        attention_decode([short], SCALE)
    # the kernel itself: a plan whose runs do not add up to the tile's rows
    q_t = np.zeros((128, 1, 6, 16), BF16)           # 4 KV heads x 192 rows in 128-partition tiles
    k_t = np.zeros((1, 128, 6, 8), BF16)
    v = np.zeros((1, 8, 4, 128), BF16)
    kpos = np.full((1, 8), EMPTY_POSITION, np.float32)
    qpos = np.zeros((1, 1), np.float32)
    packed_run = ((0, 1, 0, 4, 0, 1),)                  # 1 sequence x 4 KV heads x 16 heads = 64 rows
    bad_plan = (16, ((packed_run, ((32, 0, 1, 0, 8, ((),)),)),))   # a tile of 32 rows
    with pytest.raises(AssertionError, match="different row count than 32"):
        simulate(attention_decode_kernel)(q_t, k_t, v, kpos, qpos, np.zeros((1, 1, 128), BF16), None,
                                          bad_plan, None)


def test_units_of_a_decode_batch_share_their_dma():
    """Packed units of equal shape load K^T and V with one DMA each for the group, consecutive
    groups share their Q^T load and (but for the last group) their store, masks (padding of the
    shorter sequence of a unit) still per unit; LNC=2 splits the groups."""
    specs = [(40, 1), (30, 1)] * 3 + [(300, 1)] * 4
    _, out1, rep1 = run(specs, **SWA, sink=random_sink(64), seed=8)
    # units (2 sequences each, by key count): 128, 128 | 41, 41+31 (masked) | 31 keys: 3 groups of K
    # and V, one Q^T load, a store for the first two groups and one for the last; the sink rows and the
    # mask one-hot once; query and key positions of the masked unit's 2 sequences
    assert rep1.engines["DMA"].instructions == 3 * 2 + 1 + 2 + 2 + 2 * 2
    _, out2, rep2 = run(specs, **SWA, sink=random_sink(64), seed=8, lnc=2)
    for a, b in zip(out1, out2):
        np.testing.assert_array_equal(a, b)
    assert rep2.estimated_time_s < 0.8 * rep1.estimated_time_s     # groups of 2, 2 and 1 units


def filled_static_layer(rng, lengths, hkv, window, context):
    """A StaticLayerKVCache (kernel layout, bf16) after each sequence's prompt and one decode step;
    returns the cache, the decode step's queries [B, 1, Hq, D], positions [B, 1] and the problems
    the layer code would build from `update`."""
    cache = StaticLayerKVCache(len(lengths), hkv, HEAD_DIM, V_DIM, window, context)
    q = rng.standard_normal((len(lengths), 1, HEADS, HEAD_DIM)).astype(np.float32)
    problems = []
    for b, n in enumerate(lengths):
        k = rng.standard_normal((n + 1, hkv, HEAD_DIM)).astype(np.float32)
        v = (0.707 * rng.standard_normal((n + 1, hkv, V_DIM))).astype(np.float32)
        cache.update(b, np.arange(n), k[:n], v[:n])
        keys, values, key_pos = cache.update(b, np.array([n]), k[n:], v[n:])
        problems.append(AttentionInput(q[b], keys, values, np.array([n]), key_pos))
    return cache, q, np.array([[n] for n in lengths], np.float32), problems


def test_decode_reads_the_static_cache_buffers_in_place():
    """attention_decode_cache launches on StaticKVCache's own buffers (kernel layout, no copy). Full
    layer, cache sized for 512 positions, a bucket of 256 keys: the same kernel launch as the
    bucketed `attention_decode(shape=...)` on the keys `update` returned (bit for bit) and the
    reference within TOL. SWA layer with sinks: the ring after the write (every key a decode query
    sees) against the reference within TOL."""
    rng = np.random.default_rng(11)
    cache, q, qpos, problems = filled_static_layer(rng, [200, 37], FULL["hkv"], None, 512)
    assert cache.k.shape == (2, 128, 4 * HEAD_DIM // 128, 512) and cache.k.dtype == BF16
    out, _ = to_host(attention_decode_cache(q, cache.k, cache.v, cache.pos, qpos, SCALE, keys=256))
    bucketed, _ = to_host(attention_decode(problems, SCALE, shape=(2, 1, 256)))
    for b in range(2):
        np.testing.assert_array_equal(out[b], bucketed[b])
    check(problems, None, None, list(out))
    sink = random_sink(64)
    cache, q, qpos, problems = filled_static_layer(rng, [300, 5], SWA["hkv"], SWA["window"], 512)
    assert cache.k.shape == (2, 128, 8 * HEAD_DIM // 128, SWA["window"])
    out, _ = to_host(attention_decode_cache(q, cache.k, cache.v, cache.pos, qpos, SCALE, SWA["window"], sink))
    check(problems, SWA["window"], sink, list(out))
    with pytest.raises(ValueError, match="S >= keys = 600"):
        attention_decode_cache(q, cache.k, cache.v, cache.pos, qpos, SCALE, SWA["window"], sink, keys=600)


@pytest.mark.parametrize("n_slots", [128, 300, 2048, 4352])
def test_value_rows_transpose_each_blocks_whole_tiles(n_slots):
    """`value_rows` is a permutation of the slots; in each block of 2048 slots with m whole 128-key
    tiles, slot block + 128 j + p sits in row block + m p + j (partition p's keys of the block are
    consecutive rows), and the slots past the whole tiles keep their row."""
    rows = value_rows(np.arange(n_slots), n_slots)
    assert sorted(rows) == list(range(n_slots))
    for base in range(0, n_slots, 2048):
        m = min(2048, n_slots - base) // 128
        for j, p in [(0, 0), (m - 1, 0), (0, 127), (m - 1, 127), (m // 2, 5)]:
            assert rows[base + 128 * j + p] == base + m * p + j
        tail = np.arange(base + 128 * m, min(n_slots, base + 2048))
        np.testing.assert_array_equal(rows[tail], tail)


def test_static_cache_over_several_value_blocks_with_ragged_lengths(lnc1_and_lnc2):
    """A full layer's static cache of 4352 slots (value blocks of 2048, 2048 and 256 slots) holding
    sequences of 3000, 141 and 2101 keys, read up to a bucket of 3001 keys (the last chunk ends
    inside a block, part of a 128-key tile): `update` gives the keys and values back in position
    order, and the kernel on the cache's buffers equals the reference within TOL, at LNC=1 and
    LNC=2 bit for bit."""
    rng = np.random.default_rng(13)
    cache, q, qpos, problems = filled_static_layer(rng, [2999, 140, 2100], FULL["hkv"], None, 4352)
    for b, p in enumerate(problems):
        np.testing.assert_array_equal(p.k_positions, np.arange(len(p.k)))
        keys, values = cache.slot_kv(b, slice(0, len(p.k)))
        np.testing.assert_array_equal(keys, p.k)
        np.testing.assert_array_equal(values, p.v)
    rep1, rep2 = lnc1_and_lnc2(lambda: attention_decode_cache(q, cache.k, cache.v, cache.pos, qpos, SCALE,
                                                              keys=3001))
    out, _ = to_host(attention_decode_cache(q, cache.k, cache.v, cache.pos, qpos, SCALE, keys=3001))
    check(problems, None, None, list(out))
    assert rep2.estimated_time_s < 0.8 * rep1.estimated_time_s


def test_row_tiles_of_the_kv_heads():
    """`head_row_tiling`: 4 heads of 192 rows in 6 tiles of 128 partitions (pieces 128 + 64 and
    64 + 128, each starting where TensorE accepts its size), one head in 2 x 96; `tiled_rows` puts
    row h D + d at [p, t] with t P + p = h D + d and `untiled_rows` inverts it."""
    tiling = head_row_tiling(4, 192)
    assert (tiling.parts, tiling.tiles) == (128, 6)
    assert tiling.pieces[0] == ((0, 0, 128), (1, 0, 64)) and tiling.pieces[1] == ((1, 64, 128), (2, 0, 128))
    assert head_row_tiling(1, 192)[:2] == (96, 2)
    x = np.arange(2 * 4 * 192 * 3).reshape(2, 4, 192, 3)
    tiled = tiled_rows(x, 4)
    assert tiled.shape == (2, 128, 6, 3)
    assert (tiled[1, 70, 2, :] == x[1, (2 * 128 + 70) // 192, (2 * 128 + 70) % 192, :]).all()
    np.testing.assert_array_equal(untiled_rows(tiled, 4), x)
