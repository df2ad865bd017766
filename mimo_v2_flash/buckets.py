"""Static shapes for the kernel path: prefill buckets (batch x tokens) and decode buckets
(batch x context).

A compiled NKI kernel is specialized on its argument shapes and compile-time arguments, so a
device run must launch a small, fixed set of shapes. Every forward pass of `NkiOps` runs inside a
bucket: the token rows are padded to `batch * tokens`, attention gets `batch` sequences of
`tokens` new tokens against `keys` key slots (positions and lengths travel as runtime tensors, the
plan depends on the bucket only), and the expert kernel a fixed block count and block size.

    table = BucketTable.for_generation(batch=2, prompt_len=32, max_new_tokens=32)
    table.prefill(2, 32)   -> Bucket(prefill, batch 2, tokens 32, context 32)
    table.decode(2, 64)    -> Bucket(decode, batch 2, tokens 1, context 64)

Sizes are powers of two by default (`powers_of_two`) or any sorted lists given to `BucketTable`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import MiMoV2FlashConfig


@dataclass(frozen=True)
class Bucket:
    """One static shape: `batch` sequences of `tokens` new tokens each, attending over up to
    `context` positions per sequence (a prefill bucket's context is its tokens)."""
    kind: str          # "prefill" or "decode"
    batch: int
    tokens: int
    context: int

    @property
    def rows(self) -> int:
        """Token rows of one pass: what every per-token kernel is launched with."""
        return self.batch * self.tokens

    def attention_keys(self, window: int | None) -> int:
        """Key slots per sequence of an attention launch: the context on full layers; on sliding-
        window layers the window's ring plus the new tokens (the ring has `window` slots whatever
        the context)."""
        return self.context if window is None else int(window) + self.tokens

    def __str__(self) -> str:
        what = f"{self.tokens} tokens" if self.kind == "prefill" else f"context {self.context}"
        return f"{self.kind} {self.batch} x {what}"


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """1, 2, 4, ... from the power of two covering `low` up to the one covering `high`."""
    if low < 1 or high < low:
        raise ValueError(f"bucket sizes need 1 <= low <= high, got {low}, {high}")
    first = 1 << (low - 1).bit_length()
    sizes = [first]
    while sizes[-1] < high:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


class BucketTable:
    """The buckets a run may use: every (batch, prefill tokens) and every (batch, decode context)."""

    def __init__(self, batches, prefill_tokens, decode_contexts):
        self.batches = self._sizes("batch", batches)
        self.prefill_tokens = self._sizes("prefill tokens", prefill_tokens)
        self.decode_contexts = self._sizes("decode context", decode_contexts)

    @staticmethod
    def _sizes(what: str, sizes) -> tuple[int, ...]:
        sizes = tuple(sorted({int(s) for s in sizes}))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"bucket table: {what} sizes must be positive integers, got {sizes}")
        return sizes

    @classmethod
    def for_generation(cls, batch: int, prompt_len: int, max_new_tokens: int) -> "BucketTable":
        """The smallest power-of-two buckets covering one generation: a batch of `batch`, prompts
        of `prompt_len` tokens, decode up to `prompt_len + max_new_tokens` positions."""
        return cls(powers_of_two(batch, batch), powers_of_two(prompt_len, prompt_len),
                   powers_of_two(prompt_len + max(max_new_tokens, 1), prompt_len + max(max_new_tokens, 1)))

    def row_counts(self) -> tuple[int, ...]:
        """The token rows of every bucket (the static shapes of an expert-parallel exchange)."""
        return tuple(sorted({bucket.rows for bucket in self.buckets()}))

    def buckets(self) -> list[Bucket]:
        """Every bucket of the table (what a warmup compiles)."""
        return ([Bucket("prefill", b, t, t) for b in self.batches for t in self.prefill_tokens] +
                [Bucket("decode", b, 1, c) for b in self.batches for c in self.decode_contexts])

    @staticmethod
    def _smallest(what: str, sizes, needed: int) -> int:
        for size in sizes:
            if size >= needed:
                return size
        raise ValueError(f"no bucket holds {what} {needed}: the largest is {sizes[-1]}")

    def prefill(self, batch: int, tokens: int) -> Bucket:
        """The smallest prefill bucket holding `batch` fresh prompts of up to `tokens` tokens."""
        t = self._smallest("prefill tokens", self.prefill_tokens, tokens)
        return Bucket("prefill", self._smallest("batch", self.batches, batch), t, t)

    def decode(self, batch: int, context: int) -> Bucket:
        """The smallest decode bucket holding `batch` sequences reaching `context` positions."""
        return Bucket("decode", self._smallest("batch", self.batches, batch), 1,
                      self._smallest("decode context", self.decode_contexts, context))

    def check(self, config: MiMoV2FlashConfig) -> None:
        """Contexts must fit the model's positions."""
        largest = max(self.decode_contexts[-1], self.prefill_tokens[-1])
        if largest > config.max_position_embeddings:
            raise ValueError(f"bucket table: context {largest} exceeds max_position_embeddings="
                             f"{config.max_position_embeddings}")
