"""What a kernel-backend generation cost the device outside its kernels: compilations and
host -> device traffic (`mimo_kernels.launch.VARIANTS` and `UPLOADS`), before and after warmup.

    report = DeviceReport()          # before the warmup
    model.warmup()
    report.warmed()                  # skip it for a run without warmup
    tokens = model.generate(...)
    print(report.lines(model.ops.passes))
    kernel variants: 28 compiled at warmup, 0 new after warmup
    host->device: 20.1 MB weights at warmup, 0 B weights after it, 492.8 KB KV cache once (resident), ...
"""
from __future__ import annotations

from mimo_kernels.launch import UPLOADS, VARIANTS


class DeviceReport:
    """Counter marks taken at the start and after the warmup (see module docstring)."""

    def __init__(self):
        self.start_variants, self.start_uploads = len(VARIANTS), UPLOADS.mark()
        self.warm_variants: int | None = None
        self.warm_uploads: dict[str, int] | None = None

    def warmed(self) -> None:
        self.warm_variants, self.warm_uploads = len(VARIANTS), UPLOADS.mark()

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
        after that, the generation's device-resident KV cache (uploaded once, when allocated), and
        the other bytes per pass after the prefill (activations, the new KV slots written into the
        resident cache, positions, attention plans). `passes`: the generation's `NkiOps.passes`
        (prefill first)."""
        if len(passes) < 2:
            return f"host->device: {byte_size(UPLOADS.since(self.start_uploads)['weights'])} weights (no decode step)"
        first = self.warm_uploads if self.warm_uploads is not None else passes[1].upload_mark
        when = "at warmup" if self.warm_uploads is not None else "by the end of the prefill"
        before_cache = self.warm_uploads if self.warm_uploads is not None else self.start_uploads
        kv_cache = UPLOADS.bytes.get("kv_cache", 0) - before_cache.get("kv_cache", 0)
        per_step = UPLOADS.since(passes[1].upload_mark)["activations"] / (len(passes) - 1)
        return (f"host->device: {byte_size(first.get('weights', 0) - self.start_uploads.get('weights', 0))} "
                f"weights {when}, {byte_size(UPLOADS.since(first)['weights'])} weights after it, "
                f"{byte_size(kv_cache)} KV cache once (resident), {byte_size(per_step)} activations per decode "
                f"step (new KV slots, positions and plans included)")

    def lines(self, passes) -> str:
        return self.variants_line() + "\n" + self.uploads_line(passes)


def byte_size(n: float) -> str:
    """Bytes as B, KB, MB or GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
