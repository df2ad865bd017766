"""ALU operators and activation functions, as vectorised NumPy on fp32 tiles.

Instructions take operators as the ``nl.*`` functions themselves (``op=nl.add``,
``op=nl.exp``), like NKI; NumPy ufuncs (``np.add``, ``np.exp``, ``np.max``...) are accepted too,
as the legacy samples use them.  ``nki.language`` registers its functions here at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

def _erf(x):
    """erf in float64: SciPy's when installed (imported on first use), else a rational
    approximation with fractional error below 1.2e-7 (Numerical Recipes erfc)."""
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - depends on the environment
        x = np.asarray(x, np.float64)
        a = np.abs(x)
        t = 1.0 / (1.0 + 0.5 * a)
        poly = -a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
            -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
                -0.82215223 + t * 0.17087277))))))))
        return np.sign(x) * (1.0 - t * np.exp(poly))
    return erf(np.asarray(x, np.float64))


@dataclass(frozen=True)
class AluOp:
    """A Vector/GpSimd/Scalar ALU operator."""

    name: str
    kind: str                 # "arith", "compare", "logical", "bitvec", "unary"
    fn: Callable              # (a, b) -> array; fp32 for arithmetic, int64 for bitvec
    reduce: Callable | None = None   # (array, axis) -> array, for reduction-legal operators
    identity: float | None = None


@dataclass(frozen=True)
class ActivationFn:
    """A ScalarE activation function applied to fp32 values."""

    name: str
    fn: Callable


def _f(x):
    return np.asarray(x, np.float32)


def _bool_f32(x):
    return np.asarray(x, np.float32)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


_ALU_LIST = [
    AluOp("add", "arith", np.add, np.add.reduce, 0.0),
    AluOp("subtract", "arith", np.subtract),
    AluOp("multiply", "arith", np.multiply, np.multiply.reduce, 1.0),
    AluOp("divide", "arith", np.divide),
    AluOp("maximum", "arith", np.maximum, np.maximum.reduce, -np.inf),
    AluOp("minimum", "arith", np.minimum, np.minimum.reduce, np.inf),
    AluOp("power", "arith", np.power),
    AluOp("equal", "compare", lambda a, b: _bool_f32(a == b)),
    AluOp("not_equal", "compare", lambda a, b: _bool_f32(a != b)),
    AluOp("greater", "compare", lambda a, b: _bool_f32(a > b)),
    AluOp("greater_equal", "compare", lambda a, b: _bool_f32(a >= b)),
    AluOp("less", "compare", lambda a, b: _bool_f32(a < b)),
    AluOp("less_equal", "compare", lambda a, b: _bool_f32(a <= b)),
    AluOp("logical_and", "logical", lambda a, b: _bool_f32((a != 0) & (b != 0)),
          lambda x, axis: _bool_f32(np.logical_and.reduce(x != 0, axis=axis)), 1.0),
    AluOp("logical_or", "logical", lambda a, b: _bool_f32((a != 0) | (b != 0)),
          lambda x, axis: _bool_f32(np.logical_or.reduce(x != 0, axis=axis)), 0.0),
    AluOp("logical_xor", "logical", lambda a, b: _bool_f32((a != 0) ^ (b != 0)),
          lambda x, axis: _bool_f32(np.logical_xor.reduce(x != 0, axis=axis)), 0.0),
    AluOp("bitwise_and", "bitvec", np.bitwise_and, np.bitwise_and.reduce),
    AluOp("bitwise_or", "bitvec", np.bitwise_or, np.bitwise_or.reduce),
    AluOp("bitwise_xor", "bitvec", np.bitwise_xor, np.bitwise_xor.reduce),
    AluOp("left_shift", "bitvec", np.left_shift),
    AluOp("right_shift", "bitvec", np.right_shift),
    # Unary ALU operators (tensor_scalar op0 with an ignored operand, e.g. GpSimd rsqrt).
    AluOp("rsqrt", "unary", lambda a, b: 1.0 / np.sqrt(a)),
    AluOp("reciprocal", "unary", lambda a, b: 1.0 / a),
    AluOp("abs", "unary", lambda a, b: np.abs(a)),
]
ALU_BY_NAME = {op.name: op for op in _ALU_LIST}

_ACT_LIST = [
    ActivationFn("copy", lambda x: x),
    ActivationFn("exp", np.exp),
    ActivationFn("log", np.log),
    ActivationFn("sqrt", np.sqrt),
    ActivationFn("rsqrt", lambda x: 1.0 / np.sqrt(x)),
    ActivationFn("reciprocal", lambda x: 1.0 / x),
    ActivationFn("sigmoid", _sigmoid),
    ActivationFn("tanh", np.tanh),
    ActivationFn("relu", lambda x: np.maximum(x, 0.0)),
    ActivationFn("gelu", lambda x: 0.5 * x * (1.0 + _f(_erf(x / np.sqrt(2.0))))),
    ActivationFn("gelu_apprx_tanh",
                 lambda x: 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * x ** 3)))),
    ActivationFn("gelu_apprx_sigmoid", lambda x: x * _sigmoid(1.702 * x)),
    ActivationFn("silu", lambda x: x * _sigmoid(x)),
    ActivationFn("softplus", lambda x: np.logaddexp(0.0, x)),
    ActivationFn("mish", lambda x: x * np.tanh(np.logaddexp(0.0, x))),
    ActivationFn("erf", lambda x: _f(_erf(x))),
    ActivationFn("sin", np.sin),
    ActivationFn("cos", np.cos),
    ActivationFn("tan", np.tan),
    ActivationFn("arctan", np.arctan),
    ActivationFn("abs", np.abs),
    ActivationFn("negative", np.negative),
    ActivationFn("sign", np.sign),
    ActivationFn("square", np.square),
    ActivationFn("floor", np.floor),
    ActivationFn("ceil", np.ceil),
    ActivationFn("trunc", np.trunc),
]
ACT_BY_NAME = {fn.name: fn for fn in _ACT_LIST}

# Lookup tables from operator objects (nl functions, NumPy ufuncs) to the specs above.
_ALU: dict = {}
_ACT: dict = {}

for _ufunc, _name in [(np.add, "add"), (np.subtract, "subtract"), (np.multiply, "multiply"),
                      (np.divide, "divide"), (np.true_divide, "divide"), (np.maximum, "maximum"),
                      (np.minimum, "minimum"), (np.max, "maximum"), (np.amax, "maximum"),
                      (np.min, "minimum"), (np.amin, "minimum"), (np.sum, "add"),
                      (np.power, "power"), (np.equal, "equal"), (np.not_equal, "not_equal"),
                      (np.greater, "greater"), (np.greater_equal, "greater_equal"),
                      (np.less, "less"), (np.less_equal, "less_equal"),
                      (np.logical_and, "logical_and"), (np.logical_or, "logical_or"),
                      (np.logical_xor, "logical_xor"), (np.bitwise_and, "bitwise_and"),
                      (np.bitwise_or, "bitwise_or"), (np.bitwise_xor, "bitwise_xor"),
                      (np.left_shift, "left_shift"), (np.right_shift, "right_shift")]:
    _ALU[_ufunc] = ALU_BY_NAME[_name]
for _ufunc, _name in [(np.exp, "exp"), (np.log, "log"), (np.sqrt, "sqrt"), (np.tanh, "tanh"),
                      (np.square, "square"), (np.abs, "abs"), (np.negative, "negative"),
                      (np.sign, "sign"), (np.sin, "sin"), (np.cos, "cos"), (np.tan, "tan"),
                      (np.arctan, "arctan"), (np.copy, "copy"), (np.floor, "floor"),
                      (np.ceil, "ceil"), (np.trunc, "trunc"), (np.reciprocal, "reciprocal")]:
    _ACT[_ufunc] = ACT_BY_NAME[_name]


def register_alu(obj, name: str) -> None:
    _ALU[obj] = ALU_BY_NAME[name]


def register_activation(obj, name: str) -> None:
    _ACT[obj] = ACT_BY_NAME[name]


def alu(op, instr: str, operand: str = "op") -> AluOp:
    """The ALU operator behind ``op`` or a TypeError naming the instruction."""
    if isinstance(op, AluOp):
        return op
    try:
        return _ALU[op]
    except (KeyError, TypeError):
        pass
    raise TypeError(f"{instr}: {operand}={getattr(op, '__name__', op)!r} is not an ALU operator "
                    f"(supported: {', '.join('nl.' + n for n in ALU_BY_NAME)})")


def activation(op, instr: str = "activation") -> ActivationFn:
    if isinstance(op, ActivationFn):
        return op
    try:
        return _ACT[op]
    except (KeyError, TypeError):
        pass
    raise TypeError(f"{instr}: op={getattr(op, '__name__', op)!r} is not an activation function "
                    f"(supported: {', '.join('nl.' + n for n in ACT_BY_NAME)})")


def apply_alu(op: AluOp, a, b):
    """``a op b`` with NumPy broadcasting; fp32 for arithmetic, integer bit patterns for bitvec."""
    with np.errstate(all="ignore"):
        if op.kind == "bitvec":
            return op.fn(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64))
        return np.asarray(op.fn(a, b), dtype=np.float32)


def apply_activation(fn: ActivationFn, x):
    with np.errstate(all="ignore"):
        return np.asarray(fn.fn(x), dtype=np.float32)
