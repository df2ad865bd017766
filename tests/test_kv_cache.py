"""The ragged KV cache (model layout) and the static one (the cached-attention kernel's layout) on
their shared contract: `update` returns the same keys, values and positions to attend over, and a
speculative pass rolled back (`CacheRollback`) leaves the cache as if the dropped positions were
never written; `store` (the write half, for a backend reading the cache in place) writes what
`update` writes, and a device-resident static cache is uploaded once and then moves only the
slots written. Exact comparisons (float32 storage), exact byte counts."""
import numpy as np
import pytest

from mimo_kernels.launch import TRANSFERS
from mimo_v2_flash.kv_cache import LayerKVCache
from mimo_v2_flash.speculative import CacheRollback
from mimo_v2_flash.static_kv_cache import EMPTY_POSITION, StaticLayerKVCache

HKV, D, DV = 2, 6, 4


def caches(window):
    return (LayerKVCache(2, HKV, D, DV, window, np.float32),
            StaticLayerKVCache(2, HKV, D, DV, window, context=64, dtype=np.float32, resident=True))


def kv(rng, n):
    return rng.standard_normal((n, HKV, D)).astype(np.float32), rng.standard_normal((n, HKV, DV)).astype(np.float32)


def attended(keys, values, positions):
    """The attended set independent of slot order (and of the static ring's empty slots)."""
    positions = np.asarray(positions)
    order = [i for i in np.argsort(positions, kind="stable") if positions[i] != EMPTY_POSITION]
    return np.asarray(keys)[order], np.asarray(values)[order], positions[order]


@pytest.mark.parametrize("window", [None, 8])
def test_static_cache_stores_the_kernel_layout_and_attends_like_the_ragged_one(window):
    rng = np.random.default_rng(0)
    ragged, static = caches(window)
    k, v = kv(rng, 20)
    for start, stop in [(0, 11), (11, 12), (12, 13), (13, 20)]:        # prompt, decode steps, a verify pass
        got = [attended(*c.update(1, np.arange(start, stop), k[start:stop], v[start:stop])) for c in (ragged, static)]
        for a, b in zip(*got):
            np.testing.assert_array_equal(a, b)
    slot = 19 if window is None else 19 % window
    np.testing.assert_array_equal(static.slot_kv(1, [slot])[0][0], k[19])   # keys [B, P, T, slots]
    np.testing.assert_array_equal(static.k[1, :, :, slot].T.reshape(HKV, D), k[19])
    np.testing.assert_array_equal(static.v[1, static.value_rows([slot])[0]], v[19])   # values [B, rows, Hkv, Dv]
    assert static.pos.dtype == np.float32 and static.pos[1, slot] == 19.0
    assert (static.pos[0] == EMPTY_POSITION).all()


@pytest.mark.parametrize("window", [None, 8])
def test_rollback_restores_both_caches(window):
    rng = np.random.default_rng(1)
    k, v = kv(rng, 16)
    for cache, clean in zip(caches(window), caches(window)):
        for c in (cache, clean):
            c.update(0, np.arange(10), k[:10], v[:10])
        clean.update(0, np.arange(10, 12), k[10:12], v[10:12])
        rollback = CacheRollback([cache], 0, np.arange(10, 15))
        cache.update(0, np.arange(10, 15), k[10:15], v[10:15])
        rollback.drop_from(12)                                             # keep positions 10, 11
        got = attended(*cache.update(0, np.array([12]), k[15:16], v[15:16]))
        want = attended(*clean.update(0, np.array([12]), k[15:16], v[15:16]))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("window", [None, 8])
def test_store_writes_what_update_writes_and_a_resident_cache_moves_only_the_new_slots(window):
    rng = np.random.default_rng(2)
    k, v = kv(rng, 12)
    mark = TRANSFERS.mark()
    resident = StaticLayerKVCache(2, HKV, D, DV, window, context=64, dtype=np.float32, resident=True)
    allocated = TRANSFERS.mark()
    assert (allocated.bytes["kv_cache"] - mark.bytes.get("kv_cache", 0)
            == resident.k.nbytes + resident.v.nbytes + resident.pos.nbytes)
    gathered = StaticLayerKVCache(2, HKV, D, DV, window, context=64, dtype=np.float32)
    for start, stop in [(0, 11), (11, 12)]:                               # a prompt (wraps a ring of 8), a step
        gathered.update(1, np.arange(start, stop), k[start:stop], v[start:stop])
        before = TRANSFERS.mark()
        resident.store(1, np.arange(start, stop), k[start:stop], v[start:stop])
        slots = min(stop - start, window or stop)                          # a ring keeps the last `window`
        assert TRANSFERS.since(before)["activations"] == slots * (HKV * (D + DV) + 1) * 4     # k, v, position
    for got, want in zip((resident.k, resident.v, resident.pos, resident.length),
                         (gathered.k, gathered.v, gathered.pos, gathered.length)):
        np.testing.assert_array_equal(got, want)
    assert TRANSFERS.bytes["kv_cache"] == allocated.bytes["kv_cache"]         # uploaded once, at allocation


@pytest.mark.parametrize("window", [None, 8])
def test_rollback_of_device_writes_reads_the_device_copies(window):
    """On a NeuronCore a resident cache's device copies are apart from its host buffers, and a step
    of the kernel backend (device tensors k, v) writes only the device copies: a rollback must save
    and restore those. Here the copies are made separate (on the CPU they are views of the host
    buffers), the writes and the rollback go through device tensors, and the keys attended after it
    equal the ragged cache's that never saw the dropped positions."""
    import torch
    from mimo_kernels.launch import RESIDENT
    rng = np.random.default_rng(3)
    k, v = kv(rng, 16)
    clean, cache = caches(window)
    for buffer in (cache.k, cache.v, cache.pos):          # device copies apart from the host, as on a device
        ref, _ = RESIDENT._entries[id(buffer)]
        RESIDENT._entries[id(buffer)] = (ref, RESIDENT.lookup(buffer).clone())
    on_device = lambda a: torch.from_numpy(a)            # noqa: E731
    cache.update(0, np.arange(10), on_device(k[:10]), on_device(v[:10]))
    clean.update(0, np.arange(12), k[:12], v[:12])
    rollback = CacheRollback([cache], 0, np.arange(10, 15))
    cache.update(0, np.arange(10, 15), on_device(k[10:15]), on_device(v[10:15]))
    rollback.drop_from(12)
    got = attended(*(a.numpy() if hasattr(a, "numpy") else a
                     for a in cache.update(0, np.array([12]), on_device(k[15:16]), on_device(v[15:16]))))
    want = attended(*clean.update(0, np.array([12]), k[15:16], v[15:16]))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
