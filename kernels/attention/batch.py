"""`attention_batch`: the NKI backend's attention over a batch of problems, choosing the prefill
kernel (long fresh prompts) or the cached-attention kernel (everything else) per problem."""
from __future__ import annotations

import numpy as np

from mimo_kernels.launch import on_device, pad_rows
from .decode import attention_decode
from .prefill import attention_prefill

PREFILL_MIN_TOKENS = 128          # shorter fresh prompts join the cached-attention launch


def is_fresh_prefill(problem) -> bool:
    """True when the keys are exactly the queries' tokens at consecutive positions (no history)."""
    qp, kp = np.asarray(problem.q_positions), np.asarray(problem.k_positions)
    return len(qp) == len(kp) and np.array_equal(qp, kp) and bool(np.all(np.diff(qp) == 1))


def attention_batch(problems, scale: float, window=None, sink=None, prefill_min_tokens: int = PREFILL_MIN_TOKENS,
                    lnc: int | None = None, shape=None):
    """`ReferenceOps.attention` for the NKI backend: problems -> (outputs, cost reports).

    A fresh sequence of at least `prefill_min_tokens` tokens runs the prefill kernel (it skips the
    key blocks outside the causal window; one launch per sequence); every other problem (decode
    steps, prefill on a history, short prompts) shares one launch of the cached-attention kernel.
    With a static `shape=(batch, tokens, keys)` the choice follows the bucket's `tokens`, a
    fresh prompt is padded to `tokens` (the padding comes after it, so the causal mask hides it)
    and the cached-attention launch has that shape (`attention_decode`).
    Outputs are [T, Hq, Dv] float32 device tensors in problem order."""
    outputs, reports = [None] * len(problems), []
    long_enough = (lambda p: len(p.q_positions) >= prefill_min_tokens) if shape is None else \
        (lambda p: shape[1] >= prefill_min_tokens)
    cached = [i for i, p in enumerate(problems) if not (is_fresh_prefill(p) and long_enough(p))]
    for i in sorted(set(range(len(problems))) - set(cached)):
        p = problems[i]
        q, k, v = (p.q, p.k, p.v) if shape is None else (pad_tokens(a, shape[1]) for a in (p.q, p.k, p.v))
        out, rep = attention_prefill(q, k, v, scale, window, sink, lnc=lnc)
        outputs[i] = out[:p.q.shape[0]]
        reports.append(rep)
    if cached:
        outs, rep = attention_decode([problems[i] for i in cached], scale, window, sink, lnc=lnc, shape=shape)
        for i, o in zip(cached, outs):
            outputs[i] = o
        reports.append(rep)
    return outputs, reports


def pad_tokens(a, tokens: int):
    """[T, ...] (host array or device tensor) -> [tokens, ...] float32 device tensor with zero rows
    after the T given ones."""
    if a.shape[0] > tokens:
        raise ValueError(f"attention: {a.shape[0]} tokens exceed the bucket's {tokens}")
    return pad_rows(on_device(a, np.float32), tokens)
