"""Self-speculative decoding with the MTP layers: draft k tokens, verify them in one pass.

One decode step of a sequence whose committed tokens are x_0 .. x_L (x_L not yet run through the
main model, which has cached positions 0 .. L-1):

1. Draft. MTP layer j (j = 0 .. k-1) runs at position L-1 on the token j+1 places ahead and the
   main model's hidden state at L-1: layer 0 reads x_L and proposes d_1, layer j reads d_j and
   proposes d_{j+1} (SGLang's multi-layer MTP for MiMo-V2: every layer reads the main model's
   hidden state before `model.norm`; docs/mtp.md). Layer j's own cache holds position i computed
   from (x_{i+j+1}, hidden_i) for every i whose token is committed; the few positions whose token
   is still a draft (L-j .. L-1) are run with the drafts and rolled back after the step.
2. Verify. The main model runs [x_L, d_1 .. d_k] at positions L .. L+k in one extended-query
   pass on its cache (the ragged prefill-on-history path): logits p_0 .. p_k.
3. Accept. Greedy: the longest prefix with d_{i+1} == argmax p_i, then argmax p_a (a correction
   or, when all k match, a bonus token): exactly plain greedy decoding. Sampling: draft token
   d_{i+1} ~ q_{i+1} is kept with probability min(1, p_i(d) / q_{i+1}(d)); the first rejected one
   is replaced by a sample of max(0, p_i - q_{i+1}) (renormalised); if all are kept a bonus token
   is sampled from p_k. Each emitted token then has exactly the target distribution (Leviathan et
   al. 2023, Chen et al. 2023).
4. Roll back. The verify pass wrote k+1 positions into every main layer's cache; those after the
   accepted ones are undone: full-attention layers drop them, sliding-window ring buffers get the
   slots they overwrote back (`CacheRollback`).

Sequences of a batch are independent (ragged): each drafts, accepts and rolls back on its own,
and the verify pass of all of them is one forward pass (one MoE dispatch per layer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .kv_cache import KVCache, LayerKVCache
from .layer import TokenBatch
from .model import sampling_probs
from .mtp import MtpLayers

SPECULATIVE_METHODS = ("mtp",)


class CacheRollback:
    """Undo the writes of one pass to one sequence of some layer caches, beyond a kept position.

    Made before the pass with the positions it will write (ascending, at most a window's worth):
    a sliding-window layer keeps a copy of the ring slots those positions will overwrite, a full
    layer remembers its length (it appends).
    """

    def __init__(self, layers: list[LayerKVCache], seq: int, positions: np.ndarray):
        self.layers, self.seq = layers, seq
        self.positions = np.asarray(positions, np.int64)
        self.saved = []
        for cache in layers:
            if cache.window is None:
                self.saved.append(int(cache.length[seq]))
                continue
            if len(self.positions) > cache.window:
                raise ValueError(f"a rollback covers at most a window ({cache.window}) of positions, "
                                 f"got {len(self.positions)}")
            slots = self.positions % cache.window
            self.saved.append((slots, cache.saved_slots(seq, slots)))

    def drop_from(self, position: int) -> None:
        """Forget the written positions >= `position`."""
        drop = self.positions >= position
        if not drop.any():
            return
        kept = int((~drop).sum())
        for cache, saved in zip(self.layers, self.saved):
            if cache.window is None:
                cache.truncate(self.seq, saved + kept)
            else:
                slots, (k, v, pos) = saved
                cache.restore_slots(self.seq, slots[drop], (k[drop], v[drop], pos[drop]))


@dataclass
class SpeculativeStats:
    """Acceptance statistics of a speculative generation (decode steps only, prefill excluded)."""
    draft_tokens: int
    acceptance: list[list[int]] = field(default_factory=list)   # per main pass: accepted + 1 per sequence
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0           # tokens produced by the decode passes (after stop / length cuts)
    main_passes: int = 0
    mtp_passes: int = 0

    def to_dict(self) -> dict:
        lengths = [n for step in self.acceptance for n in step]
        return {
            "draft_tokens": self.draft_tokens,
            "main_passes": self.main_passes,
            "mtp_passes": self.mtp_passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "draft_acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_acceptance_length": float(np.mean(lengths)) if lengths else None,
            "acceptance_length_per_step": [float(np.mean(step)) for step in self.acceptance],
            "tokens_per_main_pass": self.emitted / self.main_passes if self.main_passes else None,
        }


@dataclass
class _Sequence:
    slot: int
    tokens: list[int]                   # committed: prompt + generated; the last is not yet cached
    budget: int                         # tokens still to generate
    hidden: dict[int, np.ndarray]       # main-model hidden state (before model.norm) per position
    mtp_done: list[int]                 # per MTP layer: positions cached with committed tokens

    @property
    def last(self) -> int:              # L: position of the newest committed token
        return len(self.tokens) - 1


class MtpSpeculator:
    """Speculative decoding state of a batch: the main cache, the MTP caches, the sequences.

    `main_pass(token_lists, slots) -> (logits list, hidden list)` runs the main model on new
    tokens of those cache slots (default: `model.forward_ragged` on `self.cache`); the
    expert-parallel runtime passes its own, which also joins the collectives with no tokens.
    """

    def __init__(self, model, draft_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, rng: np.random.Generator | None = None, main_pass=None,
                 mtp: MtpLayers | None = None):
        self.model, self.config = model, model.config
        self.mtp = mtp or MtpLayers(model)
        if not 1 <= draft_tokens <= self.mtp.num_layers:
            raise ValueError(f"draft_tokens={draft_tokens}: must be between 1 and the number of MTP "
                             f"layers ({self.mtp.num_layers}); each draft token comes from its own layer")
        if draft_tokens + 1 > self.config.window_keys:
            raise ValueError(f"draft_tokens={draft_tokens}: a verify pass of {draft_tokens + 1} tokens must "
                             f"fit the sliding window ({self.config.window_keys} keys) to be rolled back")
        self.draft_tokens = draft_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = rng or np.random.default_rng(0)
        self.main_pass = main_pass or self._local_main_pass
        self.stats = SpeculativeStats(draft_tokens)
        self.cache: KVCache | None = None
        self.mtp_cache: KVCache | None = None
        self.sequences: list[_Sequence] = []

    def _local_main_pass(self, token_lists, slots):
        return self.model.forward_ragged(token_lists, self.cache, slots, return_hidden=True)

    # ---- choosing tokens ---------------------------------------------------------------------
    def _probs(self, logits: np.ndarray) -> np.ndarray:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p)

    def _choose(self, logits: np.ndarray) -> int:
        if self.temperature <= 0:
            return int(np.argmax(logits))
        probs = self._probs(logits)
        return int(self.rng.choice(len(probs), p=probs))

    def _accept(self, drafts: list[int], draft_probs: list, logits: np.ndarray) -> tuple[int, list[int]]:
        """(accepted draft count, emitted tokens) from the verify logits [k+1, vocab]."""
        if self.temperature <= 0:
            target = np.argmax(logits, axis=-1)
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == target[accepted]:
                accepted += 1
            return accepted, drafts[:accepted] + [int(target[accepted])]
        for i, (token, q) in enumerate(zip(drafts, draft_probs)):
            p = self._probs(logits[i])
            if self.rng.random() * q[token] < p[token]:      # keep with probability min(1, p/q)
                continue
            residual = np.maximum(p - q, 0.0)
            total = residual.sum()
            residual = residual / total if total > 0 else p
            return i, drafts[:i] + [int(self.rng.choice(len(residual), p=residual))]
        return len(drafts), drafts + [self._choose(logits[len(drafts)])]

    # ---- prefill -------------------------------------------------------------------------------
    def prefill(self, prompts, max_new_tokens: int) -> list[int]:
        """Run the prompts ([B, T], or B token arrays of any lengths; B may be 0) into cache slots
        0 .. B-1 and choose each one's first token; returns them."""
        batch = len(prompts)
        self.cache = self.model.new_cache(batch) if batch else None
        self.mtp_cache = self.mtp.new_cache(batch) if batch else None
        slots = list(range(batch))
        logits, hidden = self.main_pass(list(prompts), slots)
        first = []
        for slot in slots:
            token = self._choose(logits[slot][-1])
            first.append(token)
            self.sequences.append(_Sequence(
                slot, [int(t) for t in prompts[slot]] + [token], max_new_tokens - 1,
                dict(enumerate(hidden[slot])), [0] * self.mtp.num_layers))
        return first

    # ---- one decode step -----------------------------------------------------------------------
    def step(self, active: list[int]) -> dict[int, list[int]]:
        """One draft + verify step of the sequences in `active` (slots with budget left); returns
        the tokens each one emitted (1 .. draft_tokens + 1)."""
        seqs = [self.sequences[slot] for slot in active]
        plan = {s.slot: min(self.draft_tokens, s.budget - 1) for s in seqs}
        drafts, draft_probs = self._draft(seqs, plan)
        feeds = [[s.tokens[-1]] + drafts[s.slot] for s in seqs]
        rollbacks = {s.slot: CacheRollback(self.cache.layers, s.slot, np.arange(s.last, s.last + len(f)))
                     for s, f in zip(seqs, feeds)}
        logits, hidden = self.main_pass(feeds, [s.slot for s in seqs])
        self.stats.main_passes += bool(seqs)        # an idle rank's pass (expert parallel) is not one
        emitted, lengths = {}, []
        for s, rows, states in zip(seqs, logits, hidden):
            accepted, tokens = self._accept(drafts[s.slot], draft_probs[s.slot], rows)
            start = s.last
            rollbacks[s.slot].drop_from(start + accepted + 1)
            self.cache.seq_lens[s.slot] = start + accepted + 1
            for i in range(accepted + 1):
                s.hidden[start + i] = states[i]
            s.tokens += tokens
            s.budget -= len(tokens)
            self._forget_consumed_hidden(s)
            emitted[s.slot] = tokens
            lengths.append(accepted + 1)
            self.stats.drafted += len(drafts[s.slot])
            self.stats.accepted += accepted
        if lengths:
            self.stats.acceptance.append(lengths)
        return emitted

    def _forget_consumed_hidden(self, s: _Sequence) -> None:
        oldest = min(s.mtp_done[:self.draft_tokens])
        for position in [p for p in s.hidden if p < oldest]:
            del s.hidden[position]

    def _draft(self, seqs: list[_Sequence], plan: dict[int, int]):
        """Draft tokens (and their distributions when sampling) per slot, layer by layer."""
        drafts = {s.slot: [] for s in seqs}
        draft_probs = {s.slot: [] for s in seqs}
        window = self.mtp.config.window_keys
        for layer in range(max(plan.values(), default=0)):
            group = [s for s in seqs if plan[s.slot] > layer]
            # Rows whose token is committed stay in the cache; rows reading a draft token (layer j:
            # positions L-j .. L-1) are rolled back. Every sequence's last row is position L-1.
            committed = {s.slot: np.arange(s.mtp_done[layer], max(s.last - layer, s.mtp_done[layer]))
                         for s in group}
            pending = {s.slot: np.arange(max(s.last - layer, 0), s.last) for s in group}
            # A committed run reaching the ring slot of a pending row runs first, on its own, so the
            # rollback restores what it wrote.
            early = [s for s in group if len(pending[s.slot])
                     and len(committed[s.slot]) + len(pending[s.slot]) > window]
            if early:
                self._mtp_pass(layer, [(s, committed[s.slot], drafts[s.slot]) for s in early])
                for s in early:
                    committed[s.slot] = np.arange(0)
            rollbacks = [CacheRollback([self.mtp_cache.layers[layer]], s.slot, pending[s.slot])
                         for s in group if len(pending[s.slot])]
            segments = []
            for s in group:
                segments += [(s, rows, drafts[s.slot]) for rows in (committed[s.slot], pending[s.slot]) if len(rows)]
            last_rows = self._mtp_pass(layer, segments)
            for rollback in rollbacks:
                rollback.drop_from(rollback.positions[0])
            for s in group:
                s.mtp_done[layer] = max(s.mtp_done[layer], s.last - layer)
                row = last_rows[s.slot]
                if self.temperature <= 0:
                    drafts[s.slot].append(int(np.argmax(row)))
                else:
                    q = self._probs(row)
                    drafts[s.slot].append(int(self.rng.choice(len(q), p=q)))
                    draft_probs[s.slot].append(q)
        return drafts, draft_probs

    def _mtp_pass(self, layer: int, segments) -> dict[int, np.ndarray]:
        """Run MTP layer `layer` on rows (positions) of sequences; returns each sequence's logits
        at its last row. Position i reads token i+layer+1 (committed or drafted) and hidden_i."""
        seq_ids, starts, stops, positions, tokens, hidden = [], [], [], [], [], []
        offset = 0
        for s, rows, drafted in segments:
            known = s.tokens + drafted
            seq_ids.append(s.slot)
            starts.append(offset)
            offset += len(rows)
            stops.append(offset)
            positions.append(rows)
            tokens += [known[i + layer + 1] for i in rows]
            hidden += [s.hidden[i] for i in rows]
        batch = TokenBatch(seq_ids, starts, stops, np.concatenate(positions))
        logits, _ = self.mtp.forward(layer, np.array(tokens), np.stack(hidden), batch, self.mtp_cache)
        self.stats.mtp_passes += 1
        return {seq: logits[stop - 1] for seq, stop in zip(seq_ids, stops)}


def speculative_loop(speculator: MtpSpeculator, prompts: np.ndarray, max_new_tokens: int, stop: set,
                     keep_decoding=None):
    """Prefill + speculative decode steps; the speculative twin of `model.generation_loop` (same
    output layout: a sequence that emits a stop token is padded with it). Returns (tokens int64
    [B, T + max_new_tokens], prefill seconds, decode seconds)."""
    batch, prompt_len = prompts.shape
    out = np.zeros((batch, prompt_len + max_new_tokens), np.int64)
    out[:, :prompt_len] = prompts
    if max_new_tokens == 0:
        return out, 0.0, 0.0
    t0 = time.perf_counter()
    first = speculator.prefill(prompts, max_new_tokens)
    prefill_s = time.perf_counter() - t0
    produced = {slot: 0 for slot in range(batch)}
    active = []

    def emit(slot, tokens) -> None:
        for token in tokens:
            out[slot, prompt_len + produced[slot]] = token
            produced[slot] += 1
            if token in stop:
                out[slot, prompt_len + produced[slot]:] = token
                return
        if produced[slot] < max_new_tokens:
            active.append(slot)

    for slot, token in enumerate(first):
        emit(slot, [token])
    t1 = time.perf_counter()
    step = 0
    while (keep_decoding or _any_active)(step, active):
        stepping, active = active, []
        for slot, tokens in speculator.step(stepping).items():
            before = produced[slot]
            emit(slot, tokens)
            speculator.stats.emitted += produced[slot] - before
        step += 1
    return out, prefill_s, time.perf_counter() - t1


def _any_active(step: int, active: list) -> bool:
    return bool(active)


def generate_speculative(model, input_ids: np.ndarray, max_new_tokens: int, method: str, draft_tokens: int,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         seed: int = 0, stop_tokens=None):
    """`model.generate(..., speculative=method, draft_tokens=k)`: (tokens, timing + statistics)."""
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"speculative={method!r}: supported methods are {SPECULATIVE_METHODS}")
    stop = set(stop_tokens if stop_tokens is not None else model.config.stop_token_ids)
    speculator = MtpSpeculator(model, draft_tokens, temperature, top_k, top_p, np.random.default_rng(seed))
    out, prefill_s, decode_s = speculative_loop(speculator, input_ids, max_new_tokens, stop)
    timing = {"prefill_s": prefill_s, "decode_s": decode_s,
              "kv_cache_bytes": speculator.cache.nbytes + speculator.mtp_cache.nbytes if speculator.cache else 0,
              "kv_cache_dtype": str(speculator.cache.layers[0].k.dtype) if speculator.cache else "-",
              "speculative": speculator.stats.to_dict()}
    return out, timing
