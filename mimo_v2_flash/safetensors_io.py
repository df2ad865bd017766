"""The safetensors file format, read lazily and written incrementally, with FP8 support.

The `safetensors` package's NumPy API cannot read or write `F8_E4M3`, and its writers need every
tensor in memory at once; both matter for a 313 GB FP8 checkpoint. The format is small:

    [8 bytes: little-endian u64 N] [N bytes: JSON header] [data]

The header maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets
relative to the start of the data, contiguous, no holes) plus an optional `"__metadata__"` dict
of strings. Readers here memory-map one tensor at a time; the writer computes the header from
the planned names, dtypes and shapes first, then streams tensors in that order (arrays, or the
stored bytes of a tensor in another file), hashing as it goes, to a temporary name that is
renamed only when the file is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .fileguard import create_new, open_regular

# safetensors dtype name -> NumPy dtype. F8_E4M3 is OCP e4m3fn (max 448), the Hub's format.
DTYPES = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "U8": np.dtype(np.uint8),
}
HEADER_ALIGN = 8          # the header is padded with spaces so the data starts 8-byte aligned
MAX_HEADER_BYTES = 100_000_000   # same sanity limit as the reference implementation


class SafetensorsError(ValueError):
    """A malformed or truncated safetensors file; the message names the file."""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_finite(array: np.ndarray, where: str, row_offset: int = 0) -> None:
    """Raise SafetensorsError naming `where` and the first row holding NaN or Inf (float data)."""
    if array.dtype.kind not in "fV":      # ml_dtypes floats are kind "V"
        return
    values = np.asarray(array, np.float32) if array.dtype.kind == "V" or array.dtype.itemsize < 4 else array
    finite = np.isfinite(values)
    if not finite.all():
        index = np.unravel_index(int(np.argmin(finite)), finite.shape)
        raise SafetensorsError(f"{where}: non-finite value {values[index]} at index "
                               f"{tuple(int(i) + (row_offset if k == 0 else 0) for k, i in enumerate(index))}")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str                 # safetensors dtype name, e.g. "F8_E4M3"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize     # Python ints: no overflow


class SafetensorsFile:
    """Header of one safetensors file; `read(name)` memory-maps that tensor only.

    Opening parses and checks the header (offsets inside the file, sizes matching dtype x shape,
    data length equal to the file length), so a truncated file fails here, before any tensor is
    used.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open_regular(self.path, SafetensorsError) as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors file ({file_size} bytes, "
                                       "shorter than the 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise SafetensorsError(f"{self.path}: header length {header_len} exceeds the "
                                       f"file ({file_size} bytes): truncated or not safetensors")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({err})") from None
        except RecursionError:
            raise SafetensorsError(f"{self.path}: header is nested too deeply") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise SafetensorsError(f"{self.path}: __metadata__ must map strings to strings")
        self.data_start = 8 + header_len
        self.entries: dict[str, TensorEntry] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, info in header.items():
            entry, begin, end = self._parse_entry(name, info)
            self.entries[name] = entry
            self.offsets[name] = (begin, end)
        # As the reference implementation: tensors tile the data exactly, no holes, no overlaps
        # (two names aliasing one byte range would let one write show up in another tensor).
        data_len = 0
        for name, (begin, end) in sorted(self.offsets.items(), key=lambda item: item[1]):
            if begin != data_len:
                kind = "overlaps the previous tensor" if begin < data_len else "leaves a hole before it"
                raise SafetensorsError(f"{self.path}: tensor {name!r} starts at byte {begin}, which "
                                       f"{kind} (expected {data_len}): overlapping or aliasing offsets")
            data_len = end
        if self.data_start + data_len != file_size:
            raise SafetensorsError(f"{self.path}: truncated or padded file: the header describes "
                                   f"{self.data_start + data_len} bytes, the file has {file_size}")

    def _parse_entry(self, name: str, info) -> tuple["TensorEntry", int, int]:
        """(entry, begin, end) of one header entry, every field type-checked."""
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                   "(expected exactly dtype, shape, data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {dtype!r}, not one of "
                                   f"{sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise SafetensorsError(f"{self.path}: tensor {name!r} has shape {shape!r}; expected a list "
                                   "of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise SafetensorsError(f"{self.path}: tensor {name!r} has data_offsets {offsets!r}; expected "
                                   "[begin, end] with non-negative integers")
        entry = TensorEntry(name, dtype, tuple(shape))
        begin, end = offsets
        if end - begin != entry.nbytes:
            raise SafetensorsError(f"{self.path}: tensor {name!r} spans bytes {begin}..{end} but "
                                   f"{dtype} {list(shape)} needs {entry.nbytes}")
        return entry, begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> np.ndarray:
        """A read-only memory map of one tensor (drop it to unmap; copy what you keep)."""
        entry = self.entries[name]
        begin, _ = self.offsets[name]
        if entry.nbytes == 0:
            return np.zeros(entry.shape, DTYPES[entry.dtype])
        return np.memmap(self.path, DTYPES[entry.dtype], mode="r", offset=self.data_start + begin,
                         shape=entry.shape)

    def iter_bytes(self, name: str, chunk_bytes: int = 1 << 24):
        """Yield the stored bytes of one tensor in chunks of at most `chunk_bytes`, as memoryviews
        of one reused buffer (consume each before asking for the next): copying a tensor costs
        one chunk of memory, not the tensor."""
        begin, end = self.offsets[name]
        remaining = end - begin
        buffer = memoryview(bytearray(min(chunk_bytes, remaining)))
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            while remaining:
                got = f.readinto(buffer[:min(len(buffer), remaining)])
                if not got:
                    raise SafetensorsError(f"{self.path}: tensor {name!r} ends early (file truncated "
                                           "while being read)")
                remaining -= got
                yield buffer[:got]


def dtype_name(dtype) -> str:
    """safetensors name of a NumPy dtype (float8_e4m3fn and float8_e4m3 both store as F8_E4M3:
    their bit patterns agree on every value within +-240)."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.float8_e4m3):
        return "F8_E4M3"
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise SafetensorsError(f"dtype {dtype} has no safetensors name")


def encode_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus the padded JSON header for tensors laid out in `entries` order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        if entry.name in header:
            raise SafetensorsError(f"tensor {entry.name!r} is planned twice")
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the planned order.

    The file is written as `<path>.partial` and renamed to `path` by `finish()` after an fsync;
    leaving the `with` block through an exception deletes the partial file, so a final name
    always holds a complete file. `sha256` covers the whole file.
    """

    def __init__(self, path: str | os.PathLike, entries: list[TensorEntry],
                 metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        self.partial_path = self.path + ".partial"
        self.entries = list(entries)
        self._next = 0
        self._hash = hashlib.sha256()
        header = encode_header(self.entries, metadata)
        self.size = len(header) + sum(e.nbytes for e in self.entries)
        self._file = create_new(self.partial_path, SafetensorsError)
        self._put(header)

    def _put(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def _check_next(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Raise unless `name` with this dtype and shape is the next planned tensor."""
        if self._next >= len(self.entries):
            raise SafetensorsError(f"{self.path}: tensor {name!r} written after all planned tensors")
        entry = self.entries[self._next]
        if name != entry.name:
            raise SafetensorsError(f"{self.path}: expected tensor {entry.name!r} next, got {name!r}")
        if dtype != entry.dtype or tuple(shape) != entry.shape:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is {dtype} {list(shape)}, planned "
                                   f"{entry.dtype} {list(entry.shape)}")

    def write(self, name: str, array: np.ndarray) -> None:
        self._check_next(name, dtype_name(array.dtype), array.shape)
        # ml_dtypes arrays do not export a buffer; their bytes do (no copy when contiguous).
        self._put(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self._next += 1

    def copy(self, source: SafetensorsFile, name: str) -> None:
        """Write tensor `name` as its bytes stored in `source` (same name, dtype and shape), streamed
        in chunks without decoding."""
        if name not in source:
            raise SafetensorsError(f"{source.path}: has no tensor {name!r} to copy into {self.path}")
        stored = source.entries[name]
        self._check_next(name, stored.dtype, stored.shape)
        for chunk in source.iter_bytes(name):
            self._put(chunk)
        self._next += 1

    def finish(self) -> str:
        """Flush, rename to the final name, return the file's sha256 hex digest."""
        if self._next != len(self.entries):
            raise SafetensorsError(f"{self.path}: only {self._next} of {len(self.entries)} planned "
                                   f"tensors were written (next: {self.entries[self._next].name!r})")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial_path, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self.partial_path):
            os.remove(self.partial_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 24, progress=None) -> str:
    """Hex sha256 of a file, read in chunks (`progress.update(n)` per chunk if given)."""
    digest = hashlib.sha256()
    with open_regular(os.fspath(path), SafetensorsError) as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()
