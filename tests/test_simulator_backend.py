"""The backend switch and the public import surface."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mimo_kernels.backend as backend
from mimo_kernels.backend import nki, nl, nisa, simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=ROOT)


def test_simulator_is_selected_without_the_real_package():
    assert backend.BACKEND == "simulator" and backend.IS_SIMULATOR
    assert nki.language is nl and nki.isa is nisa
    for name in ("jit", "simulate"):
        assert callable(getattr(nki, name))


def test_forcing_the_neuron_backend_without_it_fails_clearly():
    res = _python("import mimo_kernels.backend", MIMO_NKI_BACKEND="neuron")
    assert res.returncode != 0 and "nki" in res.stderr and "ImportError" in res.stderr


def test_forcing_the_simulator():
    res = _python("import mimo_kernels.backend as b; print(b.BACKEND)", MIMO_NKI_BACKEND="simulator")
    assert res.returncode == 0 and res.stdout.strip() == "simulator"


def test_bad_backend_name():
    res = _python("import mimo_kernels.backend", MIMO_NKI_BACKEND="gpu")
    assert res.returncode != 0 and "MIMO_NKI_BACKEND" in res.stderr


def test_install_as_nki_makes_real_import_lines_work():
    code = ("import mimo_kernels.backend as b; b.install_as_nki()\n"
            "import nki, nki.language as nl, nki.isa as nisa\n"
            "import numpy as np\n"
            "@nki.jit\n"
            "def k(a):\n"
            "    out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)\n"
            "    nl.store(out, nl.exp(nl.load(a)))\n"
            "    return out\n"
            "print(float(nki.simulate(k)(np.zeros((2, 2), np.float32))[0, 0]))\n")
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1.0"


def test_simulate_report_flag_returns_pair():
    @nki.jit
    def k(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        nl.store(out, nl.load(a))
        return out
    a = np.ones((4, 4), np.float32)
    out = simulate(k)(a)
    assert isinstance(out, np.ndarray)
    out2, rep = simulate(k, report=True)(a)
    np.testing.assert_array_equal(out, out2)
    assert rep.engines["DMA"].instructions == 2


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")

    @nki.jit
    def k(a):
        out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
        nl.store(out, nl.multiply(nl.load(a), 2.0, dtype=a.dtype))
        return out
    x = torch.ones((4, 4), dtype=torch.bfloat16)
    y = simulate(k)(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
    assert torch.equal(y, 2 * x)


def test_kernel_called_inside_a_kernel_is_an_error():
    from mimo_kernels.simulator.errors import NkiContextError

    @nki.jit
    def inner(a):
        return a

    @nki.jit
    def outer(a):
        inner(a)
    with pytest.raises(NkiContextError, match="inside another kernel"):
        simulate(outer)(np.ones((2, 2), np.float32))
