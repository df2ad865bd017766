"""Test-session settings.

Single-threaded BLAS: the simulator issues many small matmuls, which multi-threaded OpenBLAS
runs 10-40x slower on a 2-core machine; torchrun subprocesses inherit the setting. It must be set
before NumPy is first imported, which is why it lives here.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
