"""Progress on a terminal: one tqdm bar per long phase (pretraining, RL steps, evaluation, export) with its rate and
ETA, and every log line written through the bars (tqdm.write), so that a line never lands on the end of a bar's
line. Off a terminal (a pipe, a file, a CI log) no bar is drawn (tqdm's disable=None) and the lines print as they
are; `UNIRL_FAST_PROGRESS=0` turns the bars off on a terminal too."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def say(*args, file=None) -> None:
    """print(), through any open bar (the bar is cleared, the line written, the bar drawn again below it)."""
    tqdm.write(" ".join(str(a) for a in args), file=file or sys.stdout)


def bar(total: int, desc: str, *, initial: int = 0, unit: str = "step", show: bool = True):
    """A bar over `total` units (steps, batches), or a no-op bar off a terminal / when `show` is False."""
    off = not show or os.environ.get("UNIRL_FAST_PROGRESS", "1") == "0"
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=True if off else None, leave=False,
                dynamic_ncols=True, file=sys.stderr)
