"""One place kernels import NKI from: the Neuron SDK's ``nki`` package or the bundled CPU simulator.

    from mimo_kernels.backend import nki, nl, nisa, simulate

Selection (``MIMO_NKI_BACKEND`` environment variable, read at first import):

* ``auto`` (default): the Neuron SDK's ``nki`` package when it is importable and usable (the
  Neuron-repository wheel with ``nki.jit``, ``nki.simulate``, ``nki.language``, ``nki.isa``; PyPI
  only carries a placeholder), the bundled simulator otherwise;
* ``simulator`` (or ``sim``): always the bundled simulator (:mod:`mimo_kernels.simulator`);
* ``neuron`` (or ``nki``): the Neuron SDK's package, or an ImportError saying why it is unusable.

The target stack is Neuron SDK 2.31 (torch-neuronx 2.9, torch-xla 2.9, NKI 0.5.0; docs/device.md).
`NKI_VERSION` is the version of the selected package; `describe()` says what a launch runs on:
the bundled simulator, the Neuron package on a NeuronCore (an XLA device is present), or the
Neuron package's own CPU simulator (no NeuronCore: nothing runs on hardware then either).

Kernels are launched with `mimo_kernels.launch.launch` (``kernel[lnc](*device_tensors)``).
``simulate(kernel, report=False, **options)(*arrays)`` is the test and benchmark tool: on the
bundled simulator it returns the outputs (plus a :class:`mimo_kernels.simulator.Report` when
``report=True``); with the Neuron package it calls ``nki.simulate(kernel)(*arrays)`` (NKI's CPU
simulator), and a requested report is ``None`` because the cost model belongs to the bundled
simulator.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import warnings

ENV_VAR = "MIMO_NKI_BACKEND"
_ALIASES = {"auto": "auto", "": "auto", "simulator": "simulator", "sim": "simulator",
            "neuron": "neuron", "nki": "neuron"}


def _load_neuron():
    """The Neuron SDK's NKI modules, or raise ImportError explaining why they are not usable."""
    try:
        package = importlib.import_module("nki")
        language = importlib.import_module("nki.language")
        isa = importlib.import_module("nki.isa")
    except Exception as exc:  # the PyPI placeholder raises ImportError("WRONG PACKAGE ...")
        raise ImportError(f"the Neuron SDK's 'nki' package is not usable: {exc}") from exc
    if getattr(package, "IS_SIMULATOR", False):
        raise ImportError("'nki' resolves to the bundled simulator, not the Neuron package")
    missing = [name for name in ("jit", "simulate") if not hasattr(package, name)]
    if missing or not hasattr(isa, "nc_matmul"):
        raise ImportError(f"the installed 'nki' looks like a placeholder (missing {missing or ['isa.nc_matmul']}); "
                          f"install it from the Neuron package repository")
    return package, language, isa


def _select(requested: str):
    choice = _ALIASES.get(requested.strip().lower())
    if choice is None:
        raise ValueError(f"{ENV_VAR}={requested!r}: use 'auto', 'simulator' or 'neuron'")
    if choice in ("auto", "neuron"):
        try:
            return ("neuron",) + _load_neuron()
        except ImportError:
            if choice == "neuron":
                raise
    from . import simulator
    return "simulator", simulator, simulator.language, simulator.isa


BACKEND, nki, nl, nisa = _select(os.environ.get(ENV_VAR, "auto"))
IS_SIMULATOR = BACKEND == "simulator"


def _version() -> str:
    if IS_SIMULATOR:
        return nki.__version__
    try:
        return importlib.metadata.version("nki")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(nki, "__version__", "unknown"))


NKI_VERSION = _version()


def describe() -> str:
    """What a kernel launch runs on, with the NKI version (for logs and the README's tables)."""
    if IS_SIMULATOR:
        return f"bundled CPU simulator of NKI (mimo_kernels.simulator {NKI_VERSION}); no NeuronCore"
    from .launch import device
    where = device()
    if where is not None and where.type != "cpu":
        return f"nki {NKI_VERSION} on a NeuronCore ({where}, torch-xla)"
    return f"nki {NKI_VERSION} without a Neuron device: NKI's own CPU simulator; no NeuronCore"


def simulate(kernel, report: bool = False, **options):
    """``simulate(kernel)(*arrays)`` on either backend (a test and benchmark tool; launches go
    through `mimo_kernels.launch.launch`); see the module docstring."""
    if IS_SIMULATOR:
        return nki.simulate(kernel, report=report, **options)
    if options:
        raise TypeError(f"simulator options {sorted(options)} need the bundled simulator backend")
    run = nki.simulate(kernel)

    def call(*args, **kwargs):
        outputs = run(*args, **kwargs)
        if report:
            warnings.warn("cost reports come from the bundled simulator; the Neuron nki backend gives none")
            return outputs, None
        return outputs
    return call


def install_as_nki() -> None:
    """Make ``import nki`` / ``import nki.language`` resolve to the simulator (simulator backend only),
    so kernel files written with the Neuron import lines run unchanged."""
    if not IS_SIMULATOR:
        return
    sys.modules.setdefault("nki", nki)
    sys.modules.setdefault("nki.language", nl)
    sys.modules.setdefault("nki.isa", nisa)
    sys.modules.setdefault("nki.isa.constants", nisa.constants)
    sys.modules.setdefault("nki.typing", nki.typing)


__all__ = ["BACKEND", "IS_SIMULATOR", "NKI_VERSION", "describe", "nki", "nl", "nisa", "simulate", "install_as_nki"]
