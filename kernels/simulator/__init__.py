"""CPU simulator of the NKI 0.6 dialect (``import nki``) for Trainium2.

This package stands in for the ``nki`` module: ``nki.jit``, ``nki.simulate``, ``nki.language``
(``nl``) and ``nki.isa`` (``nisa``).  Kernels import it through :mod:`mimo_kernels.backend`.

Layout: ``dtypes`` (types and rounding), ``memory`` (buffers, tensors, views, access patterns),
``ops`` (ALU operators and activation functions), ``isa`` and ``language`` (the APIs; ``isa_ext``
holds scan / shuffle / range-select / nonzero instructions, ``lnc`` the LNC=2 synchronisation),
``nki_typing`` (``nki.typing``),
``cost`` (the Trainium2 cost model and :class:`Report`), ``context`` (settings, allocation
tracking), ``runtime`` (``jit``/``simulate``), ``errors`` (exception classes).
"""
import numpy as np

from . import errors, isa, language
from . import nki_typing as typing
from .cost import Report, Trn2Model, TRN2
from .errors import *  # noqa: F401,F403  (the exception classes)
from .memory import MemoryRegion, NkiTensor, VirtualRegister
from .runtime import Kernel, jit, simulate

dtype = np.dtype        # the type of nl.float32 etc. (kernels annotate ``index_dtype: nki.dtype``)

__version__ = "0.6.0+cpu-sim"
IS_SIMULATOR = True
