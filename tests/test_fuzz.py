"""Mutation fuzzing of the front end: any text gives a checked cell or a CellError.

Each example cell is mutated (a token or a line deleted, duplicated or
swapped with another) and run through parse + check, once with no dims bound
and once with the file's own dims bound to small values. Whatever the
mutation, the outcome is a result or an `rnnc.CellError` that carries a
position inside the file: never another exception.
"""
from __future__ import annotations

import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rnnc  # noqa: E402
from rnnc.errors import Source  # noqa: E402
from rnnc.frontend import check as checker  # noqa: E402
from rnnc.frontend import parse as parser  # noqa: E402

from conftest import EXAMPLES  # noqa: E402

TEXTS = [p.read_text() for p in EXAMPLES]
TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|\d+\.?\d*(?:[eE][-+]?\d+)?|#[^\n]*|.")


def tokens(text: str) -> list:
    return TOKEN.findall(text)


def mutate(text: str, kind: str, i: int, j: int) -> str:
    if kind.endswith("line"):
        parts = text.split("\n")
    else:
        parts = tokens(text)
    n = len(parts)
    i, j = i % n, j % n
    if kind.startswith("delete"):
        del parts[i]
    elif kind.startswith("duplicate"):
        parts.insert(i, parts[i])
    else:  # swap
        parts[i], parts[j] = parts[j], parts[i]
    return ("\n" if kind.endswith("line") else "").join(parts)


def dims_of(text: str) -> dict:
    """The dims a file declares (by a regex: the text may be broken), bound to small sizes."""
    names = []
    for line in re.findall(r"^\s*dim\s+([^\n#]*)", text, flags=re.M):
        names += re.findall(r"[A-Za-z_][A-Za-z0-9_]*", line)
    return {name: 2 + k % 3 for k, name in enumerate(dict.fromkeys(names))}


def front_end(text: str, dims: dict | None):
    source = Source("fuzz.cell", text)
    return checker.check(parser.parse(source), source, None, dims)


def run_front_end(text: str, dims: dict | None):
    """A checked cell or a well-formed CellError, whatever the text."""
    try:
        front_end(text, dims)
    except rnnc.CellError as err:
        assert err.message
        assert str(err)  # formatting never fails
        if err.pos is not None:
            assert err.pos.line >= 1 and err.pos.col >= 1
            assert err.pos.line <= len(text.split("\n")) + 1


KINDS = ["delete token", "duplicate token", "swap token",
         "delete line", "duplicate line", "swap line"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(example=st.sampled_from(range(len(TEXTS))),
       mutations=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 10_000),
                                    st.integers(0, 10_000)), min_size=1, max_size=3))
def test_mutated_examples_give_a_result_or_a_cell_error(example, mutations):
    text = TEXTS[example]
    for kind, i, j in mutations:
        text = mutate(text, kind, i, j)
    run_front_end(text, None)
    run_front_end(text, dims_of(text))


@pytest.mark.parametrize("text", TEXTS, ids=[p.stem for p in EXAMPLES])
def test_the_examples_themselves_check(text):
    """The unmutated examples check, with and without dims, without a warning
    (a CellError here fails the test)."""
    for dims in (None, dims_of(text)):
        checked = front_end(text, dims)
        assert checked.cell.nodes and not checked.warnings
