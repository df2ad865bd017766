"""MiMoV2FlashModel: embedding, 48 decoder layers, final norm, untied lm_head; KV cache and generation.

```python
model = MiMoV2FlashModel.from_pretrained(path)        # Hub-layout checkpoint directory
logits = model.forward(input_ids)                     # int [B, T] -> float32 [B, T, vocab]
tokens = model.generate(input_ids, max_new_tokens=32) # greedy at temperature 0
```

Expert subset: a model may load only some routed experts (`expert_subset`). Its router then
chooses the top-8 among the loaded experts only (unloaded experts get -inf selection scores);
weights are renormalised over the chosen 8 as usual. With all experts loaded this is exactly
the real model; with a subset it is a smaller model of the same structure, not an approximation
of the full one.
"""

from __future__ import annotations

import time

import numpy as np

from .buckets import BucketTable
from .config import MiMoV2FlashConfig, load_config
from .kv_cache import KVCache
from .layer import CheckedOps, LocalExperts, ReferenceOps, TokenBatch, decoder_layer, host_values
from .memory_budget import check_reference_weights_fit
from .ops import DecoderOps
from .progress import progress_bar
from .weights import random_weights


def _make_ops(backend: str, config, weights, allowed, weight_dtype: str) -> DecoderOps:
    if backend == "reference":
        if weight_dtype != "bf16":
            raise ValueError(f"weight_dtype={weight_dtype!r} applies to backend='nki' only")
        return ReferenceOps(config, weights, allowed)
    if backend == "nki":
        try:
            import torch  # noqa: F401  (the kernel backend's activations are torch tensors)
        except ImportError:
            raise ImportError("backend='nki' keeps its activations as torch tensors on the launch device: "
                              "install the torch extra (pip install -e '.[torch]')") from None
        from .nki_ops import NkiOps   # kernels are imported only when asked for
        return NkiOps(config, weights, allowed, weight_dtype=weight_dtype)
    raise ValueError(f"unknown backend {backend!r}: expected 'reference' or 'nki'")


class MiMoV2FlashModel:
    def __init__(self, config: MiMoV2FlashConfig, weights, expert_subset=None,
                 backend: str = "reference", expert_executor=None, check_reference: bool = False,
                 weight_dtype: str = "bf16"):
        """`weights` maps Hub tensor names to arrays (Hub layout [out, in]).

        `expert_subset`: the routed experts the router may choose (None = all of them).
        `expert_executor`: runs routed experts (default: locally; `parallel` supplies the
        expert-parallel one, in which case this process may hold none of the experts).
        `weight_dtype`: how the NKI backend stores the projections the Hub keeps in FP8:
        "bf16" or "fp8" (Trainium e4m3 with 128x128 block scales).
        `check_reference`: also run every op on the NumPy reference with the same inputs and
        record the per-op relative difference in `self.ops.differences`.
        """
        self.config = config
        self.weights = weights
        self.expert_subset = None if expert_subset is None else sorted(int(e) for e in expert_subset)
        allowed = None
        if self.expert_subset is not None:
            bad = [e for e in self.expert_subset if not 0 <= e < config.n_routed_experts]
            if bad:
                raise ValueError(f"expert_subset holds expert {bad[0]} outside 0..{config.n_routed_experts - 1}")
            if len(self.expert_subset) < config.num_experts_per_tok:
                raise ValueError(f"expert_subset has {len(self.expert_subset)} experts; the router "
                                 f"needs at least num_experts_per_tok={config.num_experts_per_tok}")
            allowed = np.zeros(config.n_routed_experts, bool)
            allowed[self.expert_subset] = True
        self.backend = backend
        self.ops: DecoderOps = _make_ops(backend, config, weights, allowed, weight_dtype)
        if check_reference:
            self.ops = CheckedOps(self.ops, ReferenceOps(config, weights, allowed))
        self.expert_executor = expert_executor or LocalExperts(self.ops)
        self.buckets: BucketTable | None = None    # static shapes of the kernel path (see `warmup`)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def random(cls, config: MiMoV2FlashConfig | str = "tiny", seed: int = 0, expert_subset=None, **kwargs):
        """Seeded random weights (see `weights.random_weights`)."""
        if isinstance(config, str):
            config = load_config(config)
        check_reference_weights_fit(config, expert_subset, "random weights")
        weights = random_weights(config, seed, experts=expert_subset)
        return cls(config, weights, expert_subset=expert_subset, **kwargs)

    @classmethod
    def from_pretrained(cls, path, rank=None, expert_subset=None, **kwargs):
        """Load a Hub-layout checkpoint directory (`config.json`, index, shards; BF16/F32 or FP8
        blocks) or a directory written by `prepare_weights` (recognised by its manifest).

        Prepared directory: `rank` loads that rank's file set (its experts + replicated weights);
        None loads every rank's experts. Without an `expert_executor` the router chooses among
        the loaded experts only (a single-process run of one rank's files); with one (expert
        parallel) it may choose any expert the directory holds, and the executor runs them.
        """
        # Checkpoint code (ml_dtypes, safetensors) loads here, not with the model: ~0.5 s of import.
        from .checkpoint import PreparedCheckpoint, is_prepared_dir, load_hub_checkpoint
        if not is_prepared_dir(path):
            if rank is not None:
                raise ValueError(f"{path}: rank={rank} needs a prepare_weights directory, this is "
                                 "a Hub-layout checkpoint")
            check_reference_weights_fit(load_config(path), expert_subset, str(path))
            config, weights = load_hub_checkpoint(path, experts=expert_subset)
            return cls(config, weights, expert_subset=expert_subset, **kwargs)
        prepared = PreparedCheckpoint(path)
        if kwargs.get("backend") == "nki" and not kwargs.get("check_reference"):
            config, weights = prepared.load_kernel_layout(rank)     # no float32 Hub-layout copy
        else:
            check_reference_weights_fit(prepared.runnable_config(),
                                        prepared.experts if rank is None else prepared.experts_of(rank), str(path))
            config, weights = prepared.load(rank)
        held = prepared.experts if rank is None else prepared.experts_of(rank)
        if expert_subset is None:
            expert_subset = prepared.experts if kwargs.get("expert_executor") else held
        elif kwargs.get("expert_executor") is None and not set(expert_subset) <= set(held or expert_subset):
            raise ValueError(f"{path}: expert_subset holds experts not stored for rank {rank}")
        return cls(config, weights, expert_subset=expert_subset, **kwargs)

    def save_pretrained(self, path, dtype: str = "float32") -> None:
        """Write a Hub-layout checkpoint (config, index, per-layer shards) of these weights."""
        from .checkpoint import save_hub_checkpoint
        save_hub_checkpoint(path, self.config, self.weights, dtype=dtype)

    def new_cache(self, batch: int):
        """The ragged cache; with a bucket table (static shapes), a preallocated one sized for its
        largest decode context and the smallest bucket batch holding `batch` sequences. On the
        kernel backend it is bf16 (what the kernels read) and device-resident: uploaded once, here,
        then written in place and read by the decode steps' attention launches."""
        if self.buckets is None:
            return KVCache(self.config, batch)
        from .static_kv_cache import BF16, StaticKVCache      # ml_dtypes: loaded on first use
        kernels = self.backend == "nki"
        slots = next((b for b in self.buckets.batches if b >= batch), batch)
        return StaticKVCache(self.config, batch, self.buckets.decode_contexts[-1], BF16 if kernels else np.float32,
                             batch_slots=slots, resident=kernels)

    # ---- forward -----------------------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size == 0:
            raise ValueError(f"{what} is empty: at least one token is needed")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise ValueError(f"{what} holds token id {int(ids[bad][0])} outside the vocabulary "
                             f"0..{self.config.vocab_size - 1}")
        return ids.astype(np.int64)

    @staticmethod
    def _check_slots(sequences, cache, seq_indices) -> list[int]:
        """seq_indices as distinct ints, one per sequence, inside the cache's slots."""
        if seq_indices is None:
            return list(range(len(sequences)))
        seq_indices = list(seq_indices)
        if len(seq_indices) != len(sequences):
            raise ValueError(f"seq_indices has {len(seq_indices)} entries for {len(sequences)} sequences")
        limit = cache.batch if cache is not None else len(sequences)
        for i, slot in enumerate(seq_indices):
            if isinstance(slot, (bool, np.bool_)) or not isinstance(slot, (int, np.integer)):
                raise TypeError(f"seq_indices[{i}] must be an integer slot, got {slot!r}")
            if not 0 <= slot < limit:
                raise ValueError(f"seq_indices[{i}]={slot} outside the "
                                 f"{'cache slots' if cache is not None else 'sequences'} 0..{limit - 1}")
        if len(set(seq_indices)) != len(seq_indices):
            raise ValueError(f"seq_indices {seq_indices} names a slot twice (two sequences would "
                             "write one cache slot)")
        return [int(slot) for slot in seq_indices]

    def forward_ragged(self, sequences: list, cache: KVCache | None = None,
                       seq_indices: list[int] | None = None, return_hidden: bool = False,
                       on_device: bool = False):
        """New tokens for several sequences of different lengths -> logits [T_i, vocab] each.

        With a cache, sequence i continues cache slot `seq_indices[i]` (default i) from its
        current length; without one, each sequence starts at position 0. `return_hidden` also
        returns each sequence's last hidden states [T_i, H] before the final norm (what the MTP
        layers read, docs/mtp.md). Results are float32 NumPy (a kernel backend's read back:
        `layer.host_values`); `on_device=True` leaves a kernel backend's as device tensors (the
        generation loop samples them on the device).
        """
        seq_indices = self._check_slots(sequences, cache, seq_indices)
        ids, starts, stops, positions = [], [], [], []
        offset = 0
        for i, (seq, tokens) in enumerate(zip(seq_indices, sequences)):
            tokens = self._check_ids(np.asarray(tokens).reshape(-1), f"input_ids of sequence {i}")
            start = 0 if cache is None else int(cache.seq_lens[seq])
            if start + len(tokens) > self.config.max_position_embeddings:
                raise ValueError(f"sequence {i} would reach position {start + len(tokens)} beyond "
                                 f"max_position_embeddings={self.config.max_position_embeddings}")
            ids.append(tokens)
            positions.append(np.arange(start, start + len(tokens)))
            starts.append(offset)
            offset += len(tokens)
            stops.append(offset)
        batch = TokenBatch(seq_indices, starts, stops, np.concatenate(positions))
        kernel_ops = getattr(self.ops, "backend", self.ops)     # under CheckedOps, the kernel backend
        if self.buckets is not None and hasattr(kernel_ops, "bucket"):
            kernel_ops.bucket = self._pass_bucket([p[0] for p in positions], [len(t) for t in ids])
        try:
            x = self.ops.embed(np.concatenate(ids))
            for layer in range(self.config.num_hidden_layers):
                x = decoder_layer(self.ops, self.config, layer, x, batch, cache, self.expert_executor)
            logits = self.ops.logits(x)
        finally:
            if hasattr(kernel_ops, "bucket"):
                kernel_ops.bucket = None
        if cache is not None:
            for seq, start, stop in batch.segments():
                cache.seq_lens[seq] += stop - start
        if not on_device:
            logits = host_values(logits)
            x = host_values(x) if return_hidden else x
        rows = [logits[start:stop] for _, start, stop in batch.segments()]
        if return_hidden:
            return rows, [x[start:stop] for _, start, stop in batch.segments()]
        return rows

    def _pass_bucket(self, starts: list[int], counts: list[int]):
        """The bucket of a pass: prefill when every sequence starts at position 0, decode when each
        adds one token; None (ragged shapes) for anything else or when no bucket is large enough."""
        try:
            if not any(starts):
                return self.buckets.prefill(len(counts), max(counts))
            if all(c == 1 for c in counts):
                return self.buckets.decode(len(counts), max(starts) + 1)
        except ValueError:
            pass
        return None

    def warmup(self, buckets: BucketTable | None = None) -> int:
        """Compile ahead of time: one pass of dummy tokens through every bucket of `buckets`
        (default `self.buckets`, which this sets), so generation inside them launches no new kernel
        specialization. Cost records of the warmup are dropped. Returns the number of passes."""
        if buckets is not None:
            self.buckets = buckets
        if self.buckets is None:
            raise ValueError("warmup needs a BucketTable (model.buckets or the buckets argument)")
        self.buckets.check(self.config)
        for bucket in self.buckets.buckets():
            cache = self.new_cache(bucket.batch)
            if bucket.kind == "decode":      # a history reaching the bucket's context
                cache.seq_lens[:] = bucket.context - 1
            self.forward_ragged([np.zeros(bucket.tokens, np.int64)] * bucket.batch, cache)
        if hasattr(self.ops, "reset_costs"):
            self.ops.reset_costs()
        return len(self.buckets.buckets())

    def forward(self, input_ids, cache: KVCache | None = None) -> np.ndarray:
        """input_ids int [B, T] -> logits float32 [B, T, vocab] (continuing `cache` if given)."""
        input_ids = self._check_ids(input_ids, "input_ids")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
        if cache is not None and cache.batch != input_ids.shape[0]:
            raise ValueError(f"cache holds {cache.batch} sequences but input_ids has {input_ids.shape[0]}")
        return np.stack(self.forward_ragged(list(input_ids), cache))

    # ---- generation --------------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_tokens=None, return_timing: bool = False, progress: bool | None = None,
                 speculative: str | None = None, draft_tokens: int = 3):
        """Prefill, then decode one token at a time with the KV cache.

        `speculative="mtp"` drafts `draft_tokens` tokens per step with the MTP layers and
        verifies them in one pass (`speculative.generate_speculative`; same tokens when greedy,
        same distribution when sampling; timings then include acceptance statistics).

        Greedy at temperature 0; otherwise sample from softmax(logits / temperature) restricted to
        the `top_k` most likely tokens and the smallest set reaching probability `top_p`.
        A sequence that emits one of `stop_tokens` stops; its row is padded with that token.
        Returns int64 [B, T + max_new_tokens] (and timings if asked). `progress`: a bar over the
        steps once they take more than a few seconds (None: on a terminal, see progress.py).
        """
        input_ids = self._check_ids(input_ids, "input_ids")
        if input_ids.ndim == 1:
            input_ids = input_ids[None, :]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [tokens] or [batch, tokens], got shape {input_ids.shape}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        check_position_limit(self.config, input_ids.shape[1], max_new_tokens)
        check_sampling(temperature, top_k, top_p)
        if speculative is not None:
            from .speculative import generate_speculative   # imports this module
            out, timing = generate_speculative(self, input_ids, max_new_tokens, speculative, draft_tokens,
                                               temperature, top_k, top_p, seed, stop_tokens)
            return (out, timing) if return_timing else out
        stop = set(stop_tokens if stop_tokens is not None else self.config.stop_token_ids)
        rng = np.random.default_rng(seed)
        cache = self.new_cache(input_ids.shape[0])

        def last_logits(sequences, slots):
            return [l[-1] for l in self.forward_ragged(sequences, cache, slots, on_device=self.buckets is not None)]

        if self.buckets is None:
            choose = host_sampler(temperature, top_k, top_p, rng)
        else:                        # the static-shape (device) path samples on the device
            from .device_sampling import DeviceSampler
            choose = DeviceSampler(temperature, top_k, top_p, seed)
        out, prefill_s, decode_s = generation_loop(input_ids, max_new_tokens, last_logits, choose, stop,
                                                   progress=progress)
        if return_timing:
            return out, {"prefill_s": prefill_s, "decode_s": decode_s, "kv_cache_bytes": cache.nbytes,
                         "kv_cache_dtype": str(cache.layers[0].k.dtype)}
        return out


def generation_loop(prompts: np.ndarray, max_new_tokens: int, last_logits, choose, stop: set,
                    keep_decoding=None, progress: bool | None = False):
    """The prefill + decode loop shared by single-process and expert-parallel generation.

    `last_logits(token_lists, slots)` runs the model on new tokens of those cache slots and
    returns each one's last-position logits; `choose(rows)` picks a token per row (one read back
    per step on the device: `device_sampling.DeviceSampler`). A sequence that
    emits a token in `stop` is padded with it to the end and drops out. `keep_decoding(step,
    active)` decides whether another step runs (default: while a sequence is active; a
    distributed caller agrees across ranks there). `progress`: a bar over the steps (see
    progress.py; off by default, so that only callers that own the terminal show one). Returns
    (tokens int64 [B, T + new], prefill seconds, decode seconds).
    """
    batch, prompt_len = prompts.shape
    out = np.zeros((batch, prompt_len + max_new_tokens), np.int64)
    out[:, :prompt_len] = prompts
    bar = progress_bar(total=max_new_tokens, desc="generating", unit="token", enabled=progress)
    t0 = time.perf_counter()
    logits = last_logits(list(prompts), list(range(batch))) if max_new_tokens else []
    prefill_s = time.perf_counter() - t0
    active = list(range(batch))
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        bar.update()
        col = prompt_len + step
        still = []
        for seq, token in zip(active, choose(logits) if active else []):
            out[seq, col] = token
            if token in stop:
                out[seq, col + 1:] = token
            else:
                still.append(seq)
        active = still
        if step == max_new_tokens - 1 or not (keep_decoding or _any_active)(step, active):
            break
        logits = last_logits([[out[seq, col]] for seq in active], active)
    bar.close()
    return out, prefill_s, time.perf_counter() - t1


def _any_active(step: int, active: list) -> bool:
    return bool(active)


def check_position_limit(config, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, before any work, a generation whose last token would sit beyond the model's
    positions (the rotary tables and the KV cache end there)."""
    end = prompt_len + max_new_tokens
    if end > config.max_position_embeddings:
        raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} reaches position "
                         f"{end}, beyond max_position_embeddings={config.max_position_embeddings}; nothing "
                         "was generated")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Sampling settings inside their ranges, or a ValueError naming the one that is not."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not 0 <= temperature < np.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or
                              not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")


def host_sampler(temperature: float, top_k: int | None, top_p: float | None, rng: np.random.Generator):
    """`choose(rows) -> token ids` of `generation_loop` on the host: `sample` of each row."""
    return lambda rows: [sample(row, temperature, top_k, top_p, rng) for row in rows]


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
           rng: np.random.Generator) -> int:
    """One token from a logits vector; argmax (lowest id on ties) when temperature is 0."""
    if np.isnan(logits).any():     # argmax of NaNs is token 0, forever: say so instead
        raise FloatingPointError("the model produced NaN logits (non-finite weights or activations); "
                                 "check the checkpoint with prepare-weights --verify")
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return int(rng.choice(len(probs), p=probs))


def sampling_probs(logits: np.ndarray, temperature: float, top_k: int | None,
                   top_p: float | None) -> np.ndarray:
    """The float64 distribution `sample` draws from (temperature > 0)."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
        mask = np.zeros_like(probs, bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs
