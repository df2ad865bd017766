"""The per-rank memory budget: the full model at 32 and 64 ranks on a trn2.48xlarge, and refusals."""

import math

import pytest

from mimo_v2_flash import MiMoV2FlashModel, load_config
from mimo_v2_flash.config import ConfigError
from mimo_v2_flash.memory_budget import (GIB, INSTANCES, MemoryBudgetError, kv_cache_bytes,
                                         memory_budget, weight_bytes)
from mimo_v2_flash.weights import model_tensors

FULL = load_config("full")


def test_trn2_numbers_are_the_documented_ones():
    trn2 = INSTANCES["trn2.48xlarge"]
    assert trn2.logical_cores(2) == 64 and trn2.hbm_per_logical_core(2) == 24 * GIB
    assert trn2.chips * trn2.hbm_per_chip == 1536 * GIB and trn2.host_memory == 2048 * GIB


@pytest.mark.parametrize("world_size, dtype", [(32, "fp8"), (64, "fp8"), (64, "bf16")])
def test_full_model_fits_at_32_and_64_ranks(world_size, dtype, capsys):
    budget = memory_budget(FULL, world_size, weight_dtype=dtype, batch=8, context=8192).check()
    print(budget.table())
    out = capsys.readouterr().out
    assert "DOES NOT FIT" not in out and f"{world_size} ranks on 1 x trn2.48xlarge" in out
    assert budget.device_per_rank <= 24 * GIB
    assert budget.host_per_instance <= 2048 * GIB


def test_weight_bytes_agree_with_an_independent_count():
    # every routed expert over every rank plus one replicated copy per rank = the whole model once
    world = 64
    budget = memory_budget(FULL, world, weight_dtype="bf16")
    experts_total = world * dict(budget.device)["4 routed experts x 47 MoE layers"]
    replicated = dict(budget.device)["replicated weights"]
    f32 = sum(math.prod(s.shape) for s in model_tensors(FULL) if s.hub_dtype == "F32")
    elements = sum(math.prod(s.shape) for s in model_tensors(FULL))
    assert replicated + experts_total == 2 * elements + 2 * f32
    # 309B parameters (spec) within 2%: total bytes / 2 in bf16
    assert abs(elements / 309e9 - 1) < 0.02


def test_fp8_counts_one_byte_per_weight_plus_block_scales():
    spec = [s for s in model_tensors(FULL, layers=[1], experts=[0]) if s.name.endswith("experts.0.gate_proj.weight")]
    assert weight_bytes(FULL, spec, "fp8") == 2048 * 4096 + 4 * 16 * 32
    assert weight_bytes(FULL, spec, "bf16") == 2 * 2048 * 4096


def test_kv_cache_full_layers_grow_swa_layers_keep_the_window():
    small, large = kv_cache_bytes(FULL, 1, 1024), kv_cache_bytes(FULL, 1, 2048)
    full_layers = sum(1 for i in range(48) if not FULL.is_swa(i))
    assert full_layers == 9
    assert large - small == full_layers * 1024 * 4 * (192 + 128) * 2


def test_too_few_ranks_is_a_clear_error_naming_the_limit():
    with pytest.raises(MemoryBudgetError, match=r"device memory: .* per rank exceeds the 24.00 GiB") as err:
        memory_budget(FULL, 8, weight_dtype="fp8").check()
    assert "DOES NOT FIT" in str(err.value)


def test_float32_host_copies_at_64_ranks_exceed_the_host():
    with pytest.raises(MemoryBudgetError, match="host memory: 64 ranks x"):
        memory_budget(FULL, 64, weight_dtype="bf16", host_weights="float32+kernel").check()


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=0), "world_size must be a positive integer"),
    (dict(weight_dtype="int4"), "weight_dtype must be one of"),
    (dict(instance="p5.48xlarge"), "unknown instance"),
    (dict(context=1 << 20), "exceeds max_position_embeddings"),
    (dict(lnc=3), "lnc must be 1 or 2"),
])
def test_bad_budget_arguments(kwargs, message):
    with pytest.raises(MemoryBudgetError, match=message):
        memory_budget(FULL, **{"world_size": 32, **kwargs})


def test_random_full_model_is_refused_before_allocating():
    # 309B float32 parameters: the budget refuses before a single tensor exists
    with pytest.raises(MemoryBudgetError, match="random weights: float32 weights need"):
        MiMoV2FlashModel.random("full")


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**9), ("hidden_size", 10**6),
                                        ("vocab_size", 10**12), ("n_routed_experts", 10**7)])
def test_config_sizes_are_bounded_before_anything_is_built(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}'={value} exceeds the limit"):
        load_config("tiny").replace(**{key: value})
