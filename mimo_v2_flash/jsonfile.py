"""Reading the project's JSON files (config, checkpoint index, manifest) with errors naming the file.

Every failure is the caller's error class with the path in the message: missing, a directory, a
FIFO or device (refused without blocking), a symlink loop, too large, not UTF-8 text, not JSON,
nested too deeply, or holding NaN / Infinity (not JSON, though Python's parser accepts them).
"""

from __future__ import annotations

import json

from .fileguard import open_regular

MAX_JSON_BYTES = 256 << 20     # the real index is ~6 MB; a config or manifest far less


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def read_json(path: str, error: type[Exception], what: str, expect: type | None = dict):
    """The parsed JSON at `path` (a `expect` instance, e.g. an object); any problem raises `error`
    naming the path."""
    with open_regular(path, error, what) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{path}: {what} is larger than {MAX_JSON_BYTES >> 20} MiB; refusing to parse it")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not UTF-8 text (a binary file?)") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to be a real {what}") from None
    except ValueError as err:      # json.JSONDecodeError, and the NaN/Infinity refusal
        raise error(f"{path}: not valid JSON ({err})") from None
    if expect is not None and not isinstance(data, expect):
        raise error(f"{path}: {what} must be a JSON {'object' if expect is dict else expect.__name__}, "
                    f"got {type(data).__name__}")
    return data
