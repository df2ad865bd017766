"""The NKI Python subset, checked when a kernel is traced.

The NKI language guide ("NKI Values") allows inside a kernel: None, booleans, 32-bit integers,
32-bit floats, string literals and tensors; tuples, lists, dictionaries with string keys and
simple classes deriving from ``NKIObject`` only.  The compiler inlines the helper functions a
kernel calls, so the check covers the kernel function and, transitively, the plain Python
functions of the same package it names.  What it rejects: generators (``yield``, generator
expressions), sets, dictionaries with non-string constant keys, integer literals and integer
arguments outside 32 bits, classes not deriving from ``NKIObject`` alone, ``global`` /
``nonlocal`` (kernels must be pure functions of their arguments), ``async`` code.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types

from .errors import PythonSubsetError
from .rules import strict, violation

_INT32 = (-(2 ** 31), 2 ** 32 - 1)     # int32 and uint32 literals both fit 32 bits
_checked: dict = {}                     # code object -> None (ok) or the violation message


def _where(fn, node) -> str:
    code = fn.__code__
    return f"{code.co_filename}:{code.co_firstlineno + getattr(node, 'lineno', 1) - 1} in {fn.__name__}"


def _problem(node) -> str | None:
    if isinstance(node, (ast.GeneratorExp, ast.Yield, ast.YieldFrom)):
        return "a generator (NKI has no generators; use a list or a loop)"
    if isinstance(node, (ast.Set, ast.SetComp)):
        return "a set (NKI values are tuples, lists and dicts with string keys)"
    if isinstance(node, ast.Dict):
        for key in node.keys:
            if isinstance(key, ast.Constant) and not isinstance(key.value, str):
                return f"a dict with the non-string key {key.value!r} (NKI dict keys are strings)"
    if isinstance(node, ast.DictComp) and isinstance(node.key, ast.Constant) \
            and not isinstance(node.key.value, str):
        return "a dict comprehension with non-string keys"
    if isinstance(node, ast.Constant) and isinstance(node.value, int) \
            and not isinstance(node.value, bool) and not _INT32[0] <= node.value <= _INT32[1]:
        return f"the integer literal {node.value} (NKI integers are 32-bit)"
    if isinstance(node, (ast.Global, ast.Nonlocal)):
        return "global/nonlocal state (a kernel must be a pure function of its arguments)"
    if isinstance(node, (ast.AsyncFunctionDef, ast.Await, ast.AsyncFor, ast.AsyncWith)):
        return "async code"
    if isinstance(node, ast.ClassDef):
        bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "?") for b in node.bases]
        if bases != ["NKIObject"]:
            return f"class {node.name} deriving from {bases or 'object'} (NKI classes derive from NKIObject only)"
    return None


def _called_helpers(fn, tree) -> list:
    """Plain Python functions of the kernel's own package that the function names."""
    package = (fn.__module__ or "").split(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            value = fn.__globals__.get(node.id)
            if isinstance(value, types.FunctionType) and value is not fn and \
                    (value.__module__ or "").split(".")[0] == package:
                found.append(value)
    return found


def _check_function(fn, seen: set) -> str | None:
    code = fn.__code__
    if code in _checked:
        return _checked[code]
    if code in seen:
        return None
    seen.add(code)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None                      # no source (built in, generated): nothing to check
    message = None
    for node in ast.walk(tree):
        what = _problem(node)
        if what:
            message = f"{_where(fn, node)} uses {what}"
            break
    if message is None:
        for helper in _called_helpers(fn, tree):
            message = _check_function(helper, seen)
            if message:
                break
    _checked[code] = message
    return message


def _check_value(value, name: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int) and not _INT32[0] <= value <= _INT32[1]:
        raise violation(PythonSubsetError, "python-subset",
                        f"kernel argument {name} = {value} is outside 32-bit integers")
    if isinstance(value, (set, frozenset)):
        raise violation(PythonSubsetError, "python-subset", f"kernel argument {name} is a set")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise violation(PythonSubsetError, "python-subset",
                                f"kernel argument {name} is a dict with the non-string key {key!r}")
            _check_value(item, f"{name}[{key!r}]")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _check_value(item, f"{name}[{i}]")


def check_kernel(fn, args, kwargs) -> None:
    """Raise :class:`PythonSubsetError` when the kernel (or a helper it calls) leaves the subset."""
    if not strict("python-subset"):
        return
    message = _check_function(fn, set())
    if message:
        raise violation(PythonSubsetError, "python-subset", message)
    names = list(inspect.signature(fn).parameters)
    for i, value in enumerate(args):
        _check_value(value, names[i] if i < len(names) else f"#{i}")
    for key, value in kwargs.items():
        _check_value(value, key)
