"""`DecoderOps`: the interface `layer.decoder_layer`, the model and the MTP layers run on.

A backend holds the weights by Hub name and is addressed by (layer, role) only: `layer` is a
decoder layer index (an MTP layer index on the MTP block's backend, see mtp.py) and `role` one of
`weights.LAYER_ROLES` / `weights.MTP_ROLES` ("input", "o_proj", "eh_proj", ...), so the backend,
through `weights.layer_weight`, is the only place that turns them into tensor names.
`layer.ReferenceOps` (NumPy float32) and `nki_ops.NkiOps` (the NKI kernels) implement it;
`layer.CheckedOps` forwards it to a backend and to the reference.

Activations are arrays of flat token rows `[N, ...]`: float32 NumPy on the reference, device
tensors on a kernel backend (bf16 where its kernels produce bf16; read back only on request,
`layer.host_values`). The layer code uses only operations both kinds support. H = hidden size,
Hq / Hkv = query / KV heads, D / Dv = query-key / value head dims, k = experts per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from .config import MiMoV2FlashConfig
    from .layer import AttentionStep


@runtime_checkable
class DecoderOps(Protocol):
    config: MiMoV2FlashConfig

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows of token ids (int, any shape): float32 [*ids.shape, H]."""
        ...

    def rmsnorm(self, x: np.ndarray, layer: int, norm: str) -> np.ndarray:
        """RMSNorm of x [N, H] with layer `layer`'s norm weight `norm` ("input", "post_attention";
        MTP "enorm", "hnorm"): float32 [N, H]."""
        ...

    def add_rmsnorm(self, x: np.ndarray, delta: np.ndarray, layer: int,
                    norm: str) -> tuple[np.ndarray, np.ndarray]:
        """The residual add fused with the next norm: (x + delta, rmsnorm(x + delta, layer, norm)),
        both float32 [N, H]."""
        ...

    def linear(self, x: np.ndarray, layer: int, proj: str) -> np.ndarray:
        """x [N, in] @ W.T for layer `layer`'s projection `proj` (Hub layout W [out, in];
        "o_proj", MTP "eh_proj"): float32 [N, out]."""
        ...

    def norm_qkv_rope(self, x: np.ndarray, layer: int,
                      positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The attention's input side of x [N, H]: the "input" norm, the q, k and v projections and
        partial RoPE of q and k at positions [N] (int) with the layer's theta. Returns float32
        q [N, Hq, D], k [N, Hkv, D] (rotated) and v [N, Hkv*Dv] (one op so a kernel backend runs
        it as one launch)."""
        ...

    def linear_add_rmsnorm(self, x: np.ndarray, a: np.ndarray, layer: int, proj: str,
                           norm: str) -> tuple[np.ndarray, np.ndarray]:
        """A projection added to the residual and the next norm: h = x + linear(a, layer, proj),
        returns (h, rmsnorm(h, layer, norm)), float32 [N, H] (o_proj and the post-attention norm;
        one launch on kernels)."""
        ...

    def attention(self, step: AttentionStep, layer: int) -> np.ndarray:
        """Per-sequence attention of a pass's new tokens with layer `layer`'s window and sink (read
        by the backend): `step` holds the new q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] and the
        layer's cache; the backend writes the new keys into the cache and attends, either over
        `step.problems()` (per sequence q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] gathered) or
        over the cache's own buffers after `step.write_cache()`. Returns the outputs of all the
        step's rows, [N, Hq, Dv] in batch row order (the sequences' [T, Hq, Dv] one after another)."""
        ...

    def router(self, x: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Sigmoid top-k routing of x [N, H] among the loaded experts: (expert ids int [N, k],
        weights float32 [N, k])."""
        ...

    def experts(self, x: np.ndarray, layer: int, ids: np.ndarray, weights: np.ndarray,
                static_rows: int | None = None) -> np.ndarray:
        """Weighted sum of the routed experts' SwiGLU outputs: x [N, H], ids [N, k] (global ids,
        -1 = a slot computed elsewhere), weights [N, k] -> float32 [N, H]. `static_rows`: a
        static-shape backend runs at the fixed shape of that many rows (the expert-parallel
        receive side); a backend without static shapes ignores it."""
        ...

    def dense_mlp(self, x: np.ndarray, layer: int) -> np.ndarray:
        """The dense SwiGLU MLP of layer `layer` (layer 0, MTP layers): x [N, H] -> float32 [N, H]."""
        ...

    def logits(self, x: np.ndarray, layer: int | None = None) -> np.ndarray:
        """Final norm and lm_head: x [N, H] -> float32 [N, vocab]; the norm is `model.norm`, or
        with `layer` that MTP layer's own final_layernorm (the lm_head is shared)."""
        ...
