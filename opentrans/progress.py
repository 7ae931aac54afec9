"""Progress bars on stderr (tqdm) that the command line knows about.

A bar redraws its line with carriage returns and never ends it, so in a log file (``2>&1 | tee``) whatever is
printed next lands on the bar's line. :func:`end_progress_bars` closes open bars and says whether any bar was drawn,
so the CLI can start its ``Error:`` line on a line of its own.
"""

from __future__ import annotations

from tqdm import tqdm

_drawn = False


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, remembered as drawn unless disabled."""
    global _drawn
    bar = tqdm(iterable, **kwargs)
    if not bar.disable:
        _drawn = True
    return bar


def end_progress_bars() -> bool:
    """Close every open bar (a stage that failed inside a loop leaves its bar open), clearing its line; True when
    a bar was drawn since the last call (the caller should then start a new line)."""
    global _drawn
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()
    drawn, _drawn = _drawn, False
    return drawn
