"""Reading the project's JSON files (config, checkpoint index, manifest) with errors naming the file."""

from __future__ import annotations

import json


def read_json(path: str, error: type[Exception], what: str):
    """The parsed JSON at `path`; a missing or malformed file raises `error` naming the path."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
