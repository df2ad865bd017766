"""Memory per rank, computed from the config before anything is allocated or loaded.

```python
budget = memory_budget(config, world_size=32, weight_dtype="fp8", batch=8, context=8192)
print(budget.table())      # host and device bytes per rank, item by item, against the limits
budget.check()             # MemoryBudgetError (with the table) when a limit is exceeded
```

Device memory of one rank: its weights in kernel layout (the replicated tensors plus its share of
the routed experts; `fp8` = 1 byte per FP8 weight plus float32 128x128 block scales, `bf16` = 2
bytes; router F32), a static KV cache for the bucket (full-attention layers hold `context` keys,
sliding-window layers a ring of the window), the logits of one step, and a fixed runtime reserve.
Host memory of one rank: the staging copy of its weights on their way to the device (or, with
`host_weights="float32+kernel"`, the float32 Hub-layout copy the NumPy path keeps plus the kernel
copy) and a fixed process overhead. The ranks of one instance share its host memory.

Instance numbers (Neuron documentation, "Amazon EC2 Trn2 architecture" and "Logical NeuronCore
configuration"): a trn2.48xlarge has 16 Trainium2 chips, 96 GiB of HBM and 8 physical
NeuronCore-v3 per chip, 2,048 GiB of host memory. LNC=2 (the trn2 default) pairs physical cores
into 4 logical NeuronCores per chip: 64 ranks per instance, 24 GiB of HBM per rank. One rank runs
per logical core; a world larger than one instance spreads evenly over several.

The reserves below are assumptions, not measurements (nothing here has run on a trn2): the
Neuron runtime, compiled graphs and scratch buffers take some HBM per core, and each rank's Python
+ torch + runtime process takes some host memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .config import MiMoV2FlashConfig
from .weights import FP8_BLOCK, HUB_F32, HUB_FP8, is_expert, layer_tensors, model_tensors

GIB = 1 << 30
DEVICE_RESERVE = 2 * GIB          # per rank: runtime, compiled graphs, scratch (assumption)
PROCESS_OVERHEAD = 3 * GIB        # per rank on the host: interpreter, torch, runtime (assumption)
WEIGHT_DTYPES = ("bf16", "fp8")
KV_DTYPE_BYTES = {"bf16": 2, "fp32": 4, "fp8": 1}
HOST_WEIGHTS = ("kernel", "float32+kernel")


class MemoryBudgetError(ValueError):
    """A run that does not fit in host or device memory; the message holds the budget table."""


@dataclass(frozen=True)
class Instance:
    name: str
    chips: int
    hbm_per_chip: int              # bytes
    physical_cores_per_chip: int
    host_memory: int               # bytes

    def logical_cores(self, lnc: int) -> int:
        return self.chips * self.physical_cores_per_chip // lnc

    def hbm_per_logical_core(self, lnc: int) -> int:
        return self.hbm_per_chip * lnc // self.physical_cores_per_chip


INSTANCES = {
    "trn2.48xlarge": Instance("trn2.48xlarge", chips=16, hbm_per_chip=96 * GIB, physical_cores_per_chip=8,
                              host_memory=2048 * GIB),
}


@dataclass
class MemoryBudget:
    """Bytes per rank, item by item, and the limits they must fit in. `check()` raises if not."""
    instance: Instance
    world_size: int
    lnc: int
    ranks_per_instance: int
    settings: str
    host: list[tuple[str, int]] = field(default_factory=list)      # per rank
    device: list[tuple[str, int]] = field(default_factory=list)    # per rank

    @property
    def host_per_rank(self) -> int:
        return sum(n for _, n in self.host)

    @property
    def host_per_instance(self) -> int:
        return self.host_per_rank * self.ranks_per_instance

    @property
    def device_per_rank(self) -> int:
        return sum(n for _, n in self.device)

    @property
    def device_limit(self) -> int:
        return self.instance.hbm_per_logical_core(self.lnc)

    def problems(self) -> list[str]:
        out = []
        if self.device_per_rank > self.device_limit:
            out.append(f"device memory: {_gib(self.device_per_rank)} per rank exceeds the "
                       f"{_gib(self.device_limit)} of HBM of one logical NeuronCore (LNC={self.lnc})")
        if self.host_per_instance > self.instance.host_memory:
            out.append(f"host memory: {self.ranks_per_instance} ranks x {_gib(self.host_per_rank)} = "
                       f"{_gib(self.host_per_instance)} exceeds the instance's {_gib(self.instance.host_memory)}")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems()

    def table(self) -> str:
        lines = [f"memory budget per rank: {self.settings}",
                 f"  {self.world_size} ranks on {math.ceil(self.world_size / self.ranks_per_instance)} x "
                 f"{self.instance.name} ({self.ranks_per_instance} per instance, LNC={self.lnc})"]
        for title, items, total, limit in (
                ("device (HBM)", self.device, self.device_per_rank, self.device_limit),
                ("host", self.host, self.host_per_rank, self.instance.host_memory // self.ranks_per_instance)):
            lines.append(f"  {title}")
            lines += [f"    {label:<34} {_gib(n):>12}" for label, n in items]
            verdict = "fits" if total <= limit else "DOES NOT FIT"
            lines.append(f"    {'total':<34} {_gib(total):>12}  of {_gib(limit)} per rank: {verdict}")
        return "\n".join(lines)

    def check(self) -> "MemoryBudget":
        """Raise MemoryBudgetError naming every exceeded limit (and the table); else return self."""
        problems = self.problems()
        if problems:
            raise MemoryBudgetError("; ".join(problems) + "\n" + self.table())
        return self


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MiB"


def weight_bytes(config: MiMoV2FlashConfig, specs, weight_dtype: str) -> int:
    """Bytes of these tensors in kernel layout: FP8 Hub weights as 1 byte + F32 128x128 scales
    (fp8) or BF16 (bf16); F32 tensors 4 bytes; the rest BF16."""
    total = 0
    for spec in specs:
        elements = math.prod(spec.shape)
        if spec.hub_dtype == HUB_FP8 and weight_dtype == "fp8":
            rows, cols = spec.shape
            total += elements + 4 * -(-rows // FP8_BLOCK) * -(-cols // FP8_BLOCK)
        else:
            total += elements * (4 if spec.hub_dtype == HUB_F32 else 2)
    return total


def kv_cache_bytes(config: MiMoV2FlashConfig, batch: int, context: int, kv_dtype: str = "bf16") -> int:
    """A static cache for `batch` sequences of up to `context` tokens: full layers every key, SWA
    layers a ring of the window."""
    total = 0
    for layer in range(config.num_hidden_layers):
        _, kv, d, dv = config.attention_shape(layer)
        slots = min(context, config.window_keys) if config.is_swa(layer) else context
        total += batch * slots * kv * (d + dv) * KV_DTYPE_BYTES[kv_dtype]
    return total


def memory_budget(config: MiMoV2FlashConfig, world_size: int = 1, *, weight_dtype: str = "bf16",
                  batch: int = 1, context: int = 4096, instance: str = "trn2.48xlarge", lnc: int = 2,
                  kv_dtype: str = "bf16", host_weights: str = "kernel",
                  experts_per_rank: int | None = None) -> MemoryBudget:
    """The per-rank budget of an expert-parallel run (see the module docstring for the items).

    experts_per_rank: the most routed experts any rank holds (default ceil(experts / world_size),
    the contiguous placement). host_weights: "kernel" (weights staged once in kernel layout) or
    "float32+kernel" (the NumPy path's float32 Hub copy plus the kernel copy).
    """
    if instance not in INSTANCES:
        raise MemoryBudgetError(f"unknown instance {instance!r}; known: {', '.join(INSTANCES)}")
    spec = INSTANCES[instance]
    for name, value, allowed in (("weight_dtype", weight_dtype, WEIGHT_DTYPES),
                                 ("kv_dtype", kv_dtype, tuple(KV_DTYPE_BYTES)),
                                 ("host_weights", host_weights, HOST_WEIGHTS)):
        if value not in allowed:
            raise MemoryBudgetError(f"{name} must be one of {allowed}, got {value!r}")
    if lnc not in (1, 2) or spec.physical_cores_per_chip % lnc:
        raise MemoryBudgetError(f"lnc must be 1 or 2 on {instance}, got {lnc!r}")
    for name, value in (("world_size", world_size), ("batch", batch), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MemoryBudgetError(f"{name} must be a positive integer, got {value!r}")
    if context > config.max_position_embeddings:
        raise MemoryBudgetError(f"context {context} exceeds max_position_embeddings "
                                f"{config.max_position_embeddings}")
    per_instance = spec.logical_cores(lnc)
    instances = -(-world_size // per_instance)
    ranks_here = -(-world_size // instances)
    experts = experts_per_rank if experts_per_rank is not None else -(-config.n_routed_experts // world_size)

    replicated_specs = model_tensors(config, experts=[])
    expert_specs = [s for layer in range(config.num_hidden_layers) if config.is_moe(layer)
                    for s in layer_tensors(config, layer, experts=[0]) if is_expert(s)]
    replicated = weight_bytes(config, replicated_specs, weight_dtype)
    routed = experts * weight_bytes(config, expert_specs, weight_dtype)
    kv = kv_cache_bytes(config, batch, context, kv_dtype)
    logits = batch * config.vocab_size * 4
    budget = MemoryBudget(spec, world_size, lnc, ranks_here,
                          f"weights {weight_dtype}, KV {kv_dtype} bucket {batch} x {context}, "
                          f"{experts} routed experts per rank")
    budget.device = [("replicated weights", replicated), (f"{experts} routed experts x "
                     f"{sum(config.moe_layer_freq)} MoE layers", routed), ("KV cache", kv),
                     ("logits (float32, one step)", logits), ("runtime reserve (assumed)", DEVICE_RESERVE)]
    budget.host = [("weights staged for upload", replicated + routed)]
    if host_weights == "float32+kernel":
        elements = sum(math.prod(s.shape) for s in replicated_specs) + \
            experts * sum(math.prod(s.shape) for s in expert_specs)
        budget.host.append(("float32 Hub-layout copy", 4 * elements))
    budget.host.append(("process overhead (assumed)", PROCESS_OVERHEAD))
    return budget


def available_host_memory() -> int:
    """Bytes this machine can still give a process (MemAvailable; free pages where not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_reference_weights_fit(config: MiMoV2FlashConfig, experts=None, what: str = "the model") -> int:
    """Refuse, before allocating, float32 weights of `config` (all experts, or the listed ones)
    that this machine's available memory cannot hold; returns the bytes needed."""
    count = len(experts) if experts is not None else config.n_routed_experts
    replicated = sum(math.prod(s.shape) for s in model_tensors(config, experts=[]))
    per_expert = sum(math.prod(s.shape) for layer in range(config.num_hidden_layers) if config.is_moe(layer)
                     for s in layer_tensors(config, layer, experts=[0]) if is_expert(s))
    need = 4 * (replicated + count * per_expert)
    have = available_host_memory()
    if need > have:
        raise MemoryBudgetError(f"{what}: float32 weights need {_gib(need)}, this machine has {_gib(have)} "
                                "available; use fewer layers or experts (e.g. --num-layers 2, an expert "
                                "subset) or the expert-parallel runtime")
    return need


def main(argv=None) -> int:
    """`python -m mimo_v2_flash.memory_budget --config full --world-size 32 --weight-dtype fp8`:
    print the table; exit 1 if it does not fit."""
    import argparse
    import sys

    from .config import ConfigError, load_config
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--config", default="full", help="preset or config.json path")
    p.add_argument("--world-size", type=int, default=32)
    p.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="fp8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--instance", default="trn2.48xlarge", choices=sorted(INSTANCES))
    p.add_argument("--lnc", type=int, default=2)
    p.add_argument("--host-weights", choices=HOST_WEIGHTS, default="kernel")
    args = p.parse_args(argv)
    try:
        budget = memory_budget(load_config(args.config), args.world_size, weight_dtype=args.weight_dtype,
                               batch=args.batch, context=args.context, instance=args.instance, lnc=args.lnc,
                               host_weights=args.host_weights)
    except (ConfigError, MemoryBudgetError) as err:
        print(f"memory_budget: error: {err}", file=sys.stderr)
        return 2
    print(budget.table())
    for problem in budget.problems():
        print(f"DOES NOT FIT: {problem}")
    return 0 if budget.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
