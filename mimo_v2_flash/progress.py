"""Progress bars (tqdm) for steps that can take more than a few seconds: checkpoint loading,
weight conversion, long generations.

A bar appears only after `delay` seconds (quick steps never show one), on stderr, and only when
stderr is a terminal; `MIMO_PROGRESS=0` turns every bar off (`run_example.py --no-progress`
sets it), `MIMO_PROGRESS=1` forces them on. A caller may also pass `enabled` explicitly.
"""

from __future__ import annotations

import os
import sys

PROGRESS_ENV = "MIMO_PROGRESS"
DELAY_S = 2.0


def progress_enabled(enabled: bool | None = None) -> bool:
    if enabled is not None:
        return enabled
    setting = os.environ.get(PROGRESS_ENV)
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr.isatty()


def progress_bar(iterable=None, *, enabled: bool | None = None, delay: float | None = None, **kwargs):
    """A tqdm bar (a plain pass-through when disabled); kwargs go to tqdm (total, desc, unit...)."""
    from tqdm import tqdm   # imported when a bar is made, not with the package
    return tqdm(iterable, disable=not progress_enabled(enabled), delay=DELAY_S if delay is None else delay,
                leave=False, file=sys.stderr, dynamic_ncols=True, **kwargs)
