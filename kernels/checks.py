"""The error a kernel raises for an argument it does not support.

Kernel input checks are `if not ...: raise KernelInputError(...)`, never `assert` (python -O
strips asserts, and the kernel would then run on shapes it cannot handle). The class is a
ValueError (bad input) and an AssertionError (what NKI's own argument validation raises, so
callers catching either keep working).
"""


class KernelInputError(ValueError, AssertionError):
    """A kernel argument (shape, dtype, size) outside what the kernel supports; the message names it."""
