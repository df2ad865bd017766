"""One place kernels import NKI from: the real ``nki`` package or the bundled CPU simulator.

    from mimo_kernels.backend import nki, nl, nisa, simulate

Selection (``MIMO_NKI_BACKEND`` environment variable, read at first import):

* ``auto`` (default): the real ``nki`` when it is importable and real (the Neuron-repository
  wheel with ``nki.jit``, ``nki.simulate``, ``nki.language``, ``nki.isa``; PyPI only carries a
  placeholder), the simulator otherwise;
* ``simulator`` (or ``sim``): always the bundled simulator (:mod:`mimo_kernels.simulator`);
* ``real`` (or ``nki``): the real package, or an ImportError saying why it is unusable.

``simulate(kernel, report=False, **options)(*arrays)`` works with both: on the simulator it
returns the outputs (plus a :class:`mimo_kernels.simulator.Report` when ``report=True``); with the real
package it calls ``nki.simulate(kernel)(*arrays)``, and a requested report is ``None`` because the
cost model belongs to the bundled simulator.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

ENV_VAR = "MIMO_NKI_BACKEND"
_ALIASES = {"auto": "auto", "": "auto", "simulator": "simulator", "sim": "simulator",
            "real": "real", "nki": "real", "neuron": "real"}


def _load_real():
    """The real NKI modules, or raise ImportError explaining why they are not usable."""
    try:
        real = importlib.import_module("nki")
        language = importlib.import_module("nki.language")
        isa = importlib.import_module("nki.isa")
    except Exception as exc:  # the PyPI placeholder raises ImportError("WRONG PACKAGE ...")
        raise ImportError(f"the real 'nki' package is not usable: {exc}") from exc
    if getattr(real, "IS_SIMULATOR", False):
        raise ImportError("'nki' resolves to the bundled simulator, not the Neuron package")
    missing = [name for name in ("jit", "simulate") if not hasattr(real, name)]
    if missing or not hasattr(isa, "nc_matmul"):
        raise ImportError(f"the installed 'nki' looks like a placeholder (missing {missing or ['isa.nc_matmul']}); "
                          f"install it from the Neuron package repository")
    return real, language, isa


def _select(requested: str):
    choice = _ALIASES.get(requested.strip().lower())
    if choice is None:
        raise ValueError(f"{ENV_VAR}={requested!r}: use 'auto', 'simulator' or 'real'")
    if choice in ("auto", "real"):
        try:
            return ("real",) + _load_real()
        except ImportError:
            if choice == "real":
                raise
    from . import simulator
    return "simulator", simulator, simulator.language, simulator.isa


BACKEND, nki, nl, nisa = _select(os.environ.get(ENV_VAR, "auto"))
IS_SIMULATOR = BACKEND == "simulator"


def simulate(kernel, report: bool = False, **options):
    """``simulate(kernel)(*arrays)`` on either backend; see the module docstring."""
    if IS_SIMULATOR:
        return nki.simulate(kernel, report=report, **options)
    if options:
        raise TypeError(f"simulator options {sorted(options)} need the bundled simulator backend")
    run = nki.simulate(kernel)

    def call(*args, **kwargs):
        outputs = run(*args, **kwargs)
        if report:
            warnings.warn("cost reports come from the bundled simulator; the real nki backend gives none")
            return outputs, None
        return outputs
    return call


def install_as_nki() -> None:
    """Make ``import nki`` / ``import nki.language`` resolve to the simulator (simulator backend only),
    so kernel files written with the real import lines run unchanged."""
    if not IS_SIMULATOR:
        return
    sys.modules.setdefault("nki", nki)
    sys.modules.setdefault("nki.language", nl)
    sys.modules.setdefault("nki.isa", nisa)
    sys.modules.setdefault("nki.isa.constants", nisa.constants)
    sys.modules.setdefault("nki.typing", nki.typing)


__all__ = ["BACKEND", "IS_SIMULATOR", "nki", "nl", "nisa", "simulate", "install_as_nki"]
