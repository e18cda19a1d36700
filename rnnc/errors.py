"""Typed user errors.

A `CellError` is a mistake in a `.cell` file: it carries the file name, the
1-based line and column, and the source line, and prints itself the way
compilers do::

    lstm.cell:12:9: error: unknown name 'hh'
        c_new = hh * c
                ^
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Pos:
    """A place in a source file (1-based line and column)."""

    line: int
    col: int


class CellError(Exception):
    """An error in a `.cell` program, reported at file:line:col."""

    def __init__(self, message: str, pos: Pos | None = None, source: "Source | None" = None):
        self.message = message
        self.pos = pos
        self.source = source
        super().__init__(self.format())

    @property
    def file(self) -> str:
        return self.source.name if self.source else "<cell>"

    @property
    def line(self) -> int | None:
        return self.pos.line if self.pos else None

    @property
    def col(self) -> int | None:
        return self.pos.col if self.pos else None

    def located(self, source: "Source") -> "CellError":
        """The same error, attached to `source` if it has no file yet."""
        if self.source is not None:
            return self
        return type(self)(self.message, self.pos, source)

    def format(self, kind: str = "error") -> str:
        if self.pos is None:
            # Not tied to a file (a bad command-line value, a file that cannot
            # be read): reported the way argparse reports usage mistakes.
            where = self.source.name if self.source else "rnnc"
            return f"{where}: {kind}: {self.message}"
        head = f"{self.file}:{self.pos.line}:{self.pos.col}: {kind}: {self.message}"
        text = self.source.line_text(self.pos.line) if self.source else None
        if text is None:
            return head
        text, col = clip(text, self.pos.col)
        return f"{head}\n    {text}\n    {' ' * (col - 1)}^"


SHOWN = 60  # characters of a long line shown on each side of the caret


def clip(text: str, col: int) -> tuple:
    """A long line cut to SHOWN characters either side of column `col` ("..." marks
    a cut), and the caret's column in what is left."""
    start = max(col - 1 - SHOWN, 0)
    end = col - 1 + SHOWN
    if start == 0 and end >= len(text):
        return text, col
    prefix = "..." if start else ""
    return prefix + text[start:end] + ("..." if end < len(text) else ""), col - start + len(prefix)


class CellWarning(CellError):
    """A suspicious but legal construct (an unused value)."""

    def format(self, kind: str = "warning") -> str:
        return super().format(kind)


@dataclass(frozen=True)
class Source:
    """The text of a `.cell` program and the name it is reported under."""

    name: str
    text: str

    @cached_property  # split once: a file with thousands of warnings formats each of them
    def lines(self) -> list:
        """The lines as the parser counts them: split at newlines only."""
        return [line.rstrip("\r") for line in self.text.split("\n")]

    def line_text(self, line: int) -> str | None:
        lines = self.lines
        if 1 <= line <= len(lines):
            # One column per character, as positions count them (a tab is one).
            return "".join(c if c.isprintable() else " " for c in lines[line - 1])
        return None

    @property
    def last_pos(self) -> Pos:
        """Where an unexpected end of file is reported: just after the last
        character of the last line that is not blank (line 1 if all are)."""
        lines = self.lines
        for number in range(len(lines), 0, -1):
            if lines[number - 1].strip():
                return Pos(number, len(lines[number - 1].rstrip()) + 1)
        return Pos(1, 1)
