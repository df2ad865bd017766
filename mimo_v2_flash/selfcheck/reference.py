"""Self-checks of the NumPy reference path: independent formulations and cache consistency."""

from __future__ import annotations

import numpy as np

from .. import reference as ref
from ..model import MiMoV2FlashModel
from . import CheckResult


def attention_loop_float64(q, k, v, q_pos, k_pos, scale, window, sink):
    """Per-query, per-head float64 loop with an explicit sink column (an independent oracle)."""
    t_len, hq, _ = q.shape
    group = hq // k.shape[1]
    out = np.zeros((t_len, hq, v.shape[2]))
    for t in range(t_len):
        keys = [j for j in range(len(k_pos)) if k_pos[j] <= q_pos[t]
                and (window is None or k_pos[j] > q_pos[t] - window)]
        for h in range(hq):
            g = h // group
            logits = [float(q[t, h] @ k[j, g]) * scale for j in keys]
            column = logits + ([float(sink[h])] if sink is not None else [])
            m = max(column)
            e = np.exp(np.array(column) - m)
            p = e / e.sum()
            out[t, h] = sum(p[i] * v[j, g] for i, j in enumerate(keys))
    return out


def checks(quick: bool):
    rng = np.random.default_rng(0)
    t_len, hq, hkv, d, dv, window = 40, 8, 2, 192, 128, 16
    q = rng.standard_normal((t_len, hq, d))
    k = rng.standard_normal((t_len, hkv, d))
    v = rng.standard_normal((t_len, hkv, dv))
    sink = 2.0 * rng.standard_normal(hq)
    pos = np.arange(t_len)
    got = ref.attention(q, k, v, pos, pos, d ** -0.5, window, sink)
    want = attention_loop_float64(q, k, v, pos, pos, d ** -0.5, window, sink)
    err = float(np.abs(got - want).max())
    yield CheckResult("reference", "attention vs float64 loop", f"T={t_len} Hq={hq} Hkv={hkv} W={window}",
                      err, 1e-9, err < 1e-9)

    model = MiMoV2FlashModel.random("tiny", seed=0)
    ids = rng.integers(0, model.config.vocab_size, (2, 40))
    full = model.forward(ids)
    cache = model.new_cache(2)
    steps = [model.forward(ids[:, :8], cache)] + [model.forward(ids[:, t:t + 1], cache) for t in range(8, 40)]
    err = float(np.abs(np.concatenate(steps, axis=1) - full).max())
    yield CheckResult("reference", "KV-cache decode = forward", "tiny B=2 T=40 window 16 (wraps)",
                      err, 1e-4, err < 1e-4)
