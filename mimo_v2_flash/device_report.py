"""What a kernel-backend generation cost the device outside its kernels: compilations and the
traffic between host and device (`mimo_kernels.launch.VARIANTS` and `TRANSFERS`), before and after
warmup.

    report = DeviceReport()          # before the warmup
    model.warmup()
    report.warmed()                  # skip it for a run without warmup
    tokens = model.generate(...)
    print(report.lines(model.ops.passes))
    kernel variants: 20 compiled at warmup, 0 new after warmup
    host->device: 20.1 MB weights at warmup, 0 B weights after it, 492.8 KB KV cache ...
    device->host: 1 read, 16 B per decode step (explicit reads: the sampled token ids; ...)
"""
from __future__ import annotations

from mimo_kernels.launch import TRANSFERS, VARIANTS


class DeviceReport:
    """Counter marks taken at the start and after the warmup (see module docstring)."""

    def __init__(self):
        self.start_variants, self.start_transfers = len(VARIANTS), TRANSFERS.mark()
        self.warm_variants: int | None = None
        self.warm_transfers = None

    def warmed(self) -> None:
        self.warm_variants, self.warm_transfers = len(VARIANTS), TRANSFERS.mark()

    def variants(self) -> dict[str, int]:
        """Specializations compiled at warmup and after it (without warmup: all "after")."""
        warm = self.start_variants if self.warm_variants is None else self.warm_variants
        return {"at_warmup": warm - self.start_variants, "after_warmup": len(VARIANTS) - warm}

    def variants_line(self) -> str:
        counts = self.variants()
        if self.warm_variants is None:
            return f"kernel variants: {counts['after_warmup']} compiled during generation (no warmup)"
        return f"kernel variants: {counts['at_warmup']} compiled at warmup, {counts['after_warmup']} new after warmup"

    def uploads_line(self, passes) -> str:
        """Weight bytes uploaded at warmup (without one: up to the end of the prefill), weight bytes
        after that, the generation's device-resident KV cache (uploaded once, when allocated), the
        attention plan tensors (once per static shape, mostly at warmup), and the other bytes per
        pass after the prefill (activations, the new KV slots written into the resident cache,
        positions). `passes`: the generation's `NkiOps.passes` (prefill first)."""
        since_start = TRANSFERS.since(self.start_transfers)
        if len(passes) < 2:
            return f"host->device: {byte_size(since_start['weights'])} weights (no decode step)"
        first = self.warm_transfers if self.warm_transfers is not None else passes[1].transfer_mark
        when = "at warmup" if self.warm_transfers is not None else "by the end of the prefill"
        kv_cache = TRANSFERS.since(self.warm_transfers or self.start_transfers)["kv_cache"]    # not the warmup's
        per_step = TRANSFERS.since(passes[1].transfer_mark)["activations"] / (len(passes) - 1)
        return (f"host->device: {byte_size(since_start['weights'] - TRANSFERS.since(first)['weights'])} "
                f"weights {when}, {byte_size(TRANSFERS.since(first)['weights'])} weights after it, "
                f"{byte_size(kv_cache)} KV cache and {byte_size(since_start['plans'])} attention "
                f"plans once (resident), {byte_size(per_step)} activations per decode step (new KV slots and "
                f"positions included)")

    def readback_line(self, passes) -> str:
        """Reads back to the host (`launch.to_host`) and their bytes per pass after the prefill
        (without a decode step: everything since the start)."""
        mark, steps, per = (passes[1].transfer_mark, len(passes) - 1, "per decode step") if len(passes) >= 2 \
            else (self.start_transfers, 1, "in all (no decode step)")
        reads = TRANSFERS.tensors_since(mark, "readback") / steps
        plural = "" if reads == 1 else "s"
        return (f"device->host: {reads:g} read{plural}, {byte_size(TRANSFERS.since(mark)['readback'] / steps)} "
                f"{per} (explicit reads: on the static path the sampled token ids, and under expert "
                f"parallelism each MoE layer's routing counters; on a NeuronCore each is a graph break)")

    def traffic_lines(self, passes) -> list[str]:
        """The `host->device:` and `device->host:` lines."""
        return [self.uploads_line(passes), self.readback_line(passes)]

    def lines(self, passes) -> str:
        return "\n".join([self.variants_line()] + self.traffic_lines(passes))


def byte_size(n: float) -> str:
    """Bytes as B, KB, MB or GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
