"""``nki.typing``: annotations kernels write on their parameters and tiles (``tensor[32, 128]``,
``mutable_tensor``).  They document shapes; the simulator does not check them."""
from __future__ import annotations


class _Annotation:
    """``name[shape...]`` gives back the annotation; it carries no runtime behaviour."""

    def __init__(self, name: str):
        self._name = name

    def __getitem__(self, shape):
        return self

    def __repr__(self) -> str:
        return f"nki.typing.{self._name}"


tensor = _Annotation("tensor")
mutable_tensor = _Annotation("mutable_tensor")
