"""Test-session settings.

Single-threaded BLAS: the simulator issues many small matmuls, which multi-threaded OpenBLAS
runs 10-40x slower on a 2-core machine; torchrun subprocesses inherit the setting. It must be set
before NumPy is first imported, which is why it lives here.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the BLAS settings above)
import pytest  # noqa: E402


@pytest.fixture
def lnc1_and_lnc2(monkeypatch):
    """`compare(run)`: calls `run()` (-> outputs, cost report) at LNC=1 and again at LNC=2, asserts
    the LNC=2 launch ran two programs and gave LNC=1's outputs bit for bit, and returns both
    reports (for the kernels whose split must also save time)."""
    def compare(run):
        monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
        want, rep1 = run()
        monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
        got, rep2 = run()
        assert rep2.num_programs == 2
        pairs = zip(got, want) if isinstance(want, tuple) else [(got, want)]
        for a, b in pairs:
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        return rep1, rep2
    return compare
