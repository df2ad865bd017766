"""Self-checks and benchmark hook of the decoder layer built from the NKI kernels (`NkiOps`,
mimo_v2_flash/nki_ops.py) against the reference layer (`ReferenceOps`).

Checks:

* one MoE decoder layer at the full MiMo shapes (hidden 4096, 64 heads, 4 KV heads of dims 192/128
  for a full-attention layer, 8 KV heads and a sink for a sliding-window layer) with 8 loaded
  experts spread over the id range (the router chooses among them): a prefill of 4 tokens, then one
  decode step on the KV cache. Each backend keeps its own cache, so the decode step also sees the
  kernel path's own (bf16) keys. Error measures, both <= 2e-2: the layer output,
  `max |nki - ref| / max |ref|`, and the layer's update `out - x` measured the same way (the
  residual x alone would hide an error in the update). The per-op differences on identical inputs
  (`CheckedOps`) go into the note; each must be <= 2e-2 and routing must pick the same experts.
* the 4-layer "tiny" model: the same greedy tokens on both backends for an 8-token prompt and 4
  new tokens, and prefill logits within 2e-2 (relative to max |logit|). Longer runs can differ by a
  routing flip: a token whose 8th and 9th expert scores are closer than the bf16 rounding of its
  hidden state picks another expert, a discrete change no tolerance covers.
* FP8 weights (tiny model, every layer on the reference input): `NkiOps(weight_dtype="fp8")` on the
  float32 weights against the reference on the same weights quantised and dequantised
  (`fp8.quantize_blocks`, Trainium e4m3), so only the kernels' bf16 arithmetic differs: <= 2e-2.

Estimated times are the simulator's cost model of Trainium2 (not measurements); rooflines are the
sum of the launched kernels' own rooflines (each: max of FLOPs / peak and the bytes it moves /
HBM bandwidth of one NeuronCore-v3).

The layer configs and comparisons are shared with tests/test_nki_layer.py, and `layer_config`,
`expert_mask` with benchmarks/kernels/bench_decoder_layer.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import fp8
from ..config import FULL_ATTENTION, SLIDING_WINDOW_ATTENTION, MiMoV2FlashConfig, load_config
from ..kv_cache import KVCache
from ..layer import CheckedOps, LocalExperts, ReferenceOps, TokenBatch, decoder_layer, host_values
from ..model import MiMoV2FlashModel
from ..nki_ops import NkiOps
from ..weights import HUB_FP8, is_projection, model_tensors, random_weights
from . import CheckResult, relative_error

TOPIC = "decoder_layer"
LAYER_KINDS = ("full", "swa")
CHECK_EXPERTS = (3, 40, 77, 100, 150, 201, 230, 255)    # loaded experts of the full-shape checks
LAYER_STEPS = (4, 1)                # new tokens per step: a prefill, then one decode step
LAYER_TOL = 2e-2                    # layer output and update, relative to the reference's max
OP_TOL = 2e-2                       # each op on identical inputs, relative to the reference's max
TINY_PROMPT, TINY_NEW_TOKENS = 8, 4
SMALL_VOCAB = 256                   # a one-layer check never reads embedding or lm_head


# ----------------------------------------------------------------------- problems (shared with tests)

def layer_config(kind: str) -> MiMoV2FlashConfig:
    """The full MiMo shapes cut to one MoE decoder layer of `kind` ("full" or "swa")."""
    if kind not in LAYER_KINDS:
        raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {kind!r}")
    attention = SLIDING_WINDOW_ATTENTION if kind == "swa" else FULL_ATTENTION
    return load_config("full").replace(num_hidden_layers=1, vocab_size=SMALL_VOCAB,
                                       hybrid_layer_pattern=[attention], moe_layer_freq=[1])


def expert_mask(config: MiMoV2FlashConfig, experts) -> np.ndarray:
    """[n_routed_experts] bool, True for the loaded experts (the router's `allowed`)."""
    mask = np.zeros(config.n_routed_experts, bool)
    mask[list(experts)] = True
    return mask


@dataclass
class LayerStep:
    """One step of the layer comparison (see the module doc for the measures)."""
    tokens: int
    error: float
    update_error: float
    differences: dict        # per op on identical inputs (CheckedOps)
    cost: dict               # NkiOps.cost_summary() of this step
    wall_s: float            # wall time of the checked kernel path (first step: + weight conversion)


def compare_layer(kind: str, experts=CHECK_EXPERTS, steps=LAYER_STEPS, seed=0) -> list[LayerStep]:
    """Layer 0 of `layer_config(kind)` through the kernels and the reference, one sequence:
    `steps[0]` prefill tokens, then a step per further entry, each backend on its own KV cache."""
    config = layer_config(kind)
    weights = random_weights(config, seed, experts=experts)
    allowed = expert_mask(config, experts)
    reference = ReferenceOps(config, weights, allowed)
    kernels = NkiOps(config, weights, allowed)
    caches = {"nki": KVCache(config, 1), "reference": KVCache(config, 1)}
    rng = np.random.default_rng(seed + 1)
    results, position = [], 0
    for tokens in steps:
        x = rng.standard_normal((tokens, config.hidden_size)).astype(np.float32)
        batch = TokenBatch([0], [0], [tokens], np.arange(position, position + tokens))
        checked = CheckedOps(kernels, reference)
        kernels.reset_costs()
        started = time.perf_counter()
        got = host_values(decoder_layer(checked, config, 0, x, batch, caches["nki"], LocalExperts(checked)))
        wall = time.perf_counter() - started
        want = decoder_layer(reference, config, 0, x, batch, caches["reference"], LocalExperts(reference))
        results.append(LayerStep(tokens, relative_error(got, want), relative_error(got - x, want - x),
                                 dict(checked.differences), kernels.cost_summary(), wall))
        position += tokens
    return results


@dataclass
class TinyComparison:
    tokens_reference: np.ndarray
    tokens_nki: np.ndarray
    logits_error: float      # prefill logits, relative to max |reference logit|
    differences: dict        # per op on identical inputs over the whole run
    cost: dict               # NkiOps.cost_summary() of the generation: "prefill", "decode"


def compare_tiny_model(prompt_tokens=TINY_PROMPT, new_tokens=TINY_NEW_TOKENS, batch=1, seed=0) -> TinyComparison:
    """The "tiny" preset on both backends: prefill logits, then greedy generation."""
    reference = MiMoV2FlashModel.random("tiny", seed=seed)
    kernels = MiMoV2FlashModel.random("tiny", seed=seed, backend="nki", check_reference=True)
    prompt = np.random.default_rng(seed).integers(0, reference.config.vocab_size, (batch, prompt_tokens))
    error = relative_error(kernels.forward(prompt), reference.forward(prompt))
    kernels.ops.reset_costs()
    got = kernels.generate(prompt, max_new_tokens=new_tokens)
    cost = {"prefill": kernels.ops.cost_summary(slice(0, 1)), "decode": kernels.ops.cost_summary(slice(1, None))}
    return TinyComparison(reference.generate(prompt, max_new_tokens=new_tokens), got, error,
                          dict(kernels.ops.differences), cost)


def fp8_round_trip(config: MiMoV2FlashConfig, weights: dict) -> dict:
    """`weights` with every tensor the Hub stores as FP8 quantised to Trainium e4m3 in the kernel
    layout [in, out] (128x128 blocks) and dequantised back: the values the FP8 kernels multiply."""
    out = dict(weights)
    for spec in model_tensors(config):
        if spec.name in weights and spec.hub_dtype == HUB_FP8 and is_projection(spec):
            q, scale = fp8.quantize_blocks(weights[spec.name].T, fp8.TRAINIUM_E4M3)
            out[spec.name] = fp8.dequantize(q, scale).T
    return out


def compare_fp8_layers(tokens=TINY_PROMPT, seed=0) -> list[float]:
    """Per layer of the tiny model (then the logits), the FP8-weight kernel path against the
    reference on the round-tripped weights, both on the reference's input to that layer."""
    config = load_config("tiny")
    weights = random_weights(config, seed)
    kernels = NkiOps(config, weights, weight_dtype="fp8")
    reference = ReferenceOps(config, fp8_round_trip(config, weights))
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, tokens)
    batch = TokenBatch([0], [0], [tokens], np.arange(tokens))
    x = reference.embed(ids)
    errors = []
    for layer in range(config.num_hidden_layers):
        want = decoder_layer(reference, config, layer, x, batch, None, LocalExperts(reference))
        got = host_values(decoder_layer(kernels, config, layer, x, batch, None, LocalExperts(kernels)))
        errors.append(relative_error(got - x, want - x))
        x = want
    errors.append(relative_error(host_values(kernels.logits(x)), reference.logits(x)))
    return errors


# ----------------------------------------------------------------------- checks

def _format_differences(differences: dict) -> str:
    return ", ".join(f"{op} {d:.1e}" for op, d in differences.items())


def _ops_ok(differences: dict) -> bool:
    return all(d == 0.0 if op == "router" else d <= OP_TOL for op, d in differences.items())


def _layer_checks(kind: str):
    for i, step in enumerate(compare_layer(kind)):
        phase = "prefill" if i == 0 else "decode"
        error = max(step.error, step.update_error)
        yield CheckResult(TOPIC, f"layer {kind} {phase}", f"T={step.tokens} H=4096 64 heads 8 experts",
                          error, LAYER_TOL, error <= LAYER_TOL and _ops_ok(step.differences),
                          step.cost["total"]["estimated_us"], step.cost["total"]["roofline_us"],
                          note=f"output {step.error:.1e}, update {step.update_error:.1e}; per op: "
                               f"{_format_differences(step.differences)}; ran in {step.wall_s:.0f} s")


def checks(quick: bool):
    for kind in LAYER_KINDS:
        yield from _layer_checks(kind)
    tiny = compare_tiny_model()
    same = bool(np.array_equal(tiny.tokens_nki, tiny.tokens_reference))
    decode = tiny.cost["decode"]
    yield CheckResult(TOPIC, "tiny model greedy tokens", f"{TINY_PROMPT} + {TINY_NEW_TOKENS} tokens, 4 layers",
                      tiny.logits_error, LAYER_TOL,
                      same and tiny.logits_error <= LAYER_TOL and _ops_ok(tiny.differences),
                      decode["per_pass_us"], decode["total"]["roofline_us"] / max(decode["passes"], 1),
                      note=f"tokens {'equal' if same else 'DIFFER'}; est/roof per decode step; per op: "
                           f"{_format_differences(tiny.differences)}")
    if not quick:
        errors = compare_fp8_layers()
        yield CheckResult(TOPIC, "tiny model FP8 weights", f"T={TINY_PROMPT}, 4 layers + logits",
                          max(errors), LAYER_TOL, max(errors) <= LAYER_TOL,
                          note="per layer update, then logits: " + ", ".join(f"{e:.1e}" for e in errors))
