"""A progress report for the training examples, needing nothing beyond the standard library.

On a terminal it is one bar redrawn in place; anywhere else (a log file, a
pipe, CI) the same line is printed every tenth of the way, so nothing fills
the output with carriage returns.
"""
from __future__ import annotations

import sys
from collections import deque


class TextBar:
    """`bar(step, loss)` after each step: progress and the mean loss of the last `window`
    steps (one batch's loss is noisy)."""

    def __init__(self, total: int, width: int = 30, window: int = 10, out=None):
        self.total, self.width = total, width
        self.out = out or sys.stdout
        self.redraw = self.out.isatty()
        self.recent = deque(maxlen=window)

    def __call__(self, step: int, loss: float):
        done = step + 1
        self.recent.append(loss)
        filled = self.width * done // self.total
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                f"loss {sum(self.recent) / len(self.recent):.3f}")
        kept = done % max(1, self.total // 10) == 0 or done == self.total
        if self.redraw:  # keep a line every tenth of the way, so the fall stays visible
            self.out.write("\r" + line + ("\n" if kept else ""))
        elif kept:
            self.out.write(line + "\n")
        self.out.flush()
