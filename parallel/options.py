"""The settings of an expert-parallel generation run, as small frozen dataclasses.

The runtime (`run.run_distributed`) takes these, never an argparse namespace; run_example.py
builds them from its flags. Each checks its values when built and raises `OptionError` naming
the field, so a command line can name its own flag for it. Importing this module stays light
(no torch): the command line validates its flags before deciding to run distributed at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mimo_v2_flash.memory_budget import WEIGHT_DTYPES
from mimo_v2_flash.model import check_sampling
from mimo_v2_flash.speculative import SPECULATIVE_METHODS

EP_MODES = ("auto", "alltoallv", "alltoall_padded", "allgather")
WIRE_DTYPES = ("float32", "bfloat16")
BACKENDS = ("reference", "nki")


class OptionError(ValueError):
    """An option value outside its range; `option` is the field, `problem` the rest of the message."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seconds(option: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise OptionError(option, f"must be a positive number of seconds, got {value!r}")


def _one_of(option: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise OptionError(option, f"must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class GenerationOptions:
    """How each rank generates: the sampling settings of `MiMoV2FlashModel.generate`, and the
    backend and weight storage of the model doing it."""
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    speculative: str | None = None      # "mtp": draft with the MTP layers (docs/mtp.md)
    draft_tokens: int = 3
    backend: str = "reference"          # reference = NumPy; nki = the NKI kernels
    weight_dtype: str = "bf16"          # how --backend nki keeps the projections
    no_warmup: bool = False             # skip compiling every bucket before the generation

    def __post_init__(self):
        for option, low in (("max_new_tokens", 0), ("seed", 0), ("draft_tokens", 1)):
            value = getattr(self, option)
            if not _whole(value) or value < low:
                raise OptionError(option, f"must be >= {low}, got {value!r}")
        try:
            check_sampling(self.temperature, None, None)
        except ValueError as err:          # "temperature must be ..."
            raise OptionError("temperature", str(err).partition(" ")[2]) from None
        _one_of("speculative", self.speculative, (None, *SPECULATIVE_METHODS))
        _one_of("backend", self.backend, BACKENDS)
        _one_of("weight_dtype", self.weight_dtype, WEIGHT_DTYPES)


@dataclass(frozen=True)
class ExpertParallelOptions:
    """How the ranks exchange tokens (docs/expert_parallel.md)."""
    dist_backend: str = "gloo"          # process group: gloo on CPU, xla on Neuron
    mode: str = "auto"                  # dispatch collective, or auto per layer
    allgather_max_tokens: int = 1       # auto: all-gather when no rank has more tokens than this
    wire_dtype: str = "float32"
    placement: str | None = None        # "contiguous" or a placement file; None: contiguous, or as prepared
    save_placement: str | None = None   # write a load-aware placement from this run's expert load
    timeout: float = 300.0              # seconds a collective may wait before every rank gives up
    liveness: float | None = None       # seconds without a heartbeat before a rank counts as killed

    def __post_init__(self):
        _one_of("mode", self.mode, EP_MODES)
        _one_of("wire_dtype", self.wire_dtype, WIRE_DTYPES)
        if not _whole(self.allgather_max_tokens) or self.allgather_max_tokens < 0:
            raise OptionError("allgather_max_tokens", f"must be >= 0, got {self.allgather_max_tokens!r}")
        _seconds("timeout", self.timeout)
        if self.liveness is not None:
            _seconds("liveness", self.liveness)
