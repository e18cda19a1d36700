"""The pipeline, one named stage after another.

    source --parse--> AST --check--> step IR --hoist--> regions
           --autodiff--> backward regions --plan--> Plan --backend--> module

Each stage is a function of the previous stage's result; `STAGES` names the
printable ones for `rnnc emit --stage NAME`.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CellError, Source
from .frontend import check as checker
from .frontend import parse as parser
from .ir import format_cell


def read_source(path_or_text: str | os.PathLike) -> Source:
    """A `.cell` file by path, or the program text itself (anything with a '{')."""
    text = str(path_or_text)
    if isinstance(path_or_text, os.PathLike) or "{" not in text:
        path = Path(path_or_text)
        try:
            return Source(str(path), path.read_text())
        except (OSError, UnicodeDecodeError) as err:
            raise CellError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    return Source("<cell>", text)


def check_source(source: Source, cell: str | None = None, dims: dict | None = None) -> checker.Checked:
    return checker.check(parser.parse(source), source, cell, dims)


def emit(source: Source, stage: str, cell: str | None = None, dims: dict | None = None) -> str:
    """The text of one pipeline stage, as `rnnc emit --stage` prints it."""
    if stage == "ast":
        return parser.format_ast(parser.parse(source))
    checked = check_source(source, cell, dims)
    if stage == "ir":
        return format_cell(checked.cell)
    raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")


STAGES = ("ast", "ir")
