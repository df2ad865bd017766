"""The multi-token-prediction (MTP) layers: the draft model of self-speculative decoding.

MTP layer k (spec 3.7, docs/mtp.md for the sources) reads the embedding of a token and the main
model's last hidden state (before `model.norm`) one position earlier:

    x  = eh_proj(concat(enorm(embed(token)), hnorm(hidden)))        reference.mtp_combine
    h  = x + SWA_attn(input_layernorm(x));  h2 = h + SwiGLU(pre_mlp_layernorm(h))
    logits = lm_head(final_layernorm(h2))                            reference.mtp_logits

The block in the middle is exactly a sliding-window decoder layer with a dense MLP. So the MTP
layers run through the ordinary `layer.decoder_layer` on their own ops backend, built over a
"block config" (n SWA layers, all dense) and the MTP tensors renamed to `model.layers.k.*`
(`weights.mtp_block_names`: pre_mlp_layernorm plays post_attention_layernorm); the
same code then serves the reference and the NKI kernels, and each MTP layer has its own
sliding-window KV cache (a `KVCache` of the block config).
"""

from __future__ import annotations

import numpy as np

from .config import MiMoV2FlashConfig
from .kv_cache import KVCache
from .layer import TokenBatch, decoder_layer, host_values
from .weights import EMBED, FINAL_NORM, LM_HEAD, mtp_block_names, mtp_tensors


class MtpUnavailable(ValueError):
    """Speculative decoding was asked for but the model has no (complete) MTP layers."""


def missing_mtp(config: MiMoV2FlashConfig, weights) -> str | None:
    """Why this model cannot draft with MTP layers, or None when it can."""
    if config.mtp_num_layers == 0:
        return "the config has mtp_num_layers=0"
    missing = [spec.name for spec in mtp_tensors(config) if spec.name not in weights]
    if missing:
        return (f"the weights hold no MTP layers ({missing[0]!r} and {len(missing) - 1} more MTP "
                "tensors are missing; the checkpoint has no model_mtp.safetensors, or it was loaded "
                "from files prepared without them)")
    return None


def block_config(config: MiMoV2FlashConfig) -> MiMoV2FlashConfig:
    """The MTP layers as a stack of sliding-window, dense-MLP decoder layers."""
    n = config.mtp_num_layers
    return config.replace(num_hidden_layers=n, hybrid_layer_pattern=[1] * n, moe_layer_freq=[0] * n)


def block_weights(config: MiMoV2FlashConfig, weights) -> dict[str, np.ndarray]:
    """The MTP tensors under their names in the block (`weights.mtp_block_names`: MTP layer k's
    under decoder layer k's; the same arrays, not copies), plus the shared embedding and lm_head."""
    out = {name: weights[name] for name in (EMBED, LM_HEAD, FINAL_NORM)}
    names = mtp_block_names(config)
    for spec in mtp_tensors(config):
        out[names[spec.name]] = weights[spec.name]
    return out


class MtpLayers:
    """A model's MTP layers on the model's backend (reference or NKI kernels)."""

    def __init__(self, model):
        reason = missing_mtp(model.config, model.weights)
        if reason is not None:
            raise MtpUnavailable(f"speculative='mtp' needs the MTP layers, but {reason}")
        from .model import _make_ops       # the model module imports this one lazily
        self.config = block_config(model.config)
        self.weights = block_weights(model.config, model.weights)
        self.ops = _make_ops(model.backend, self.config, self.weights, None,
                             getattr(model.ops, "weight_dtype", "bf16"))

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def new_cache(self, batch: int) -> KVCache:
        """One sliding-window cache per MTP layer (positions are those of the main model)."""
        return KVCache(self.config, batch)

    def combine(self, index: int, tokens: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """`eh_proj(concat(enorm(embed(tokens)), hnorm(hidden)))` through the ops."""
        both = np.concatenate(host_values((self.ops.rmsnorm(self.ops.embed(tokens), index, "enorm"),
                                           self.ops.rmsnorm(hidden, index, "hnorm"))), axis=-1)
        return self.ops.linear(both, index, "eh_proj")

    def forward(self, index: int, tokens: np.ndarray, hidden: np.ndarray, batch: TokenBatch,
                cache: KVCache | None):
        """MTP layer `index` on flat rows: `tokens` [N] at the positions of `batch`, `hidden` [N, H]
        the main model's hidden states at those positions. Returns (draft logits [N, vocab],
        the layer's output [N, H] before its final_layernorm)."""
        x = self.combine(index, np.asarray(tokens, np.int64), hidden)
        h = decoder_layer(self.ops, self.config, index, x, batch, cache, expert_executor=None)
        return host_values((self.ops.logits(h, index), h))     # the speculative loop is NumPy
