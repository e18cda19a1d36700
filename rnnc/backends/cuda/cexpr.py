"""C spelling shared by every kernel builder: identifiers, comments and float
literals, a value's storage as one kernel sees it (`Ref`), and the index
arithmetic of row-major buffers.

Every value is stored row-major as [rows, *shape] (batched) or [*shape]
(shared); rows is B per step and T*B for the hoisted `pre` region. Per-example
sizes are compile-time constants; only `rows` and `t` are kernel arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def mangle(name: str) -> str:
    """A C identifier for any name: letters and digits kept, everything else
    (including '_') escaped as _XX, so the map is injective and never yields a
    C or CUDA keyword (`float`, `threadIdx`) or a name of ours."""
    out = []
    for ch in name:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ord(ch) < 256:
            out.append(f"_{ord(ch):02x}")
        else:
            out.append(f"_u{ord(ch):06x}")
    return "v_" + "".join(out)


def comment(text: str) -> str:
    """Text safe inside a // comment: printable ASCII without backslashes
    (a trailing backslash would continue the comment onto the next line)."""
    return "".join(ch if " " <= ch <= "~" and ch != "\\" else "?" for ch in text)


def c_float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"literal {value!r} has no float32 C spelling")
    return f"{float(value)!r}f"


@dataclass(frozen=True)
class Ref:
    """A value's storage as seen by one kernel: a buffer at a slot, and its per-example shape."""

    buffer: str
    selector: str
    shape: tuple
    batched: bool
    elem: str = "float"  # the buffer's elements' C type (launches.ELEMS)
    fixed: bool = False  # the same all through every event that reads it (a param, a value hoisted from params)

    @property
    def param(self) -> str:
        return mangle(f"{self.buffer}@{self.selector}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Joined:
    """A concatenation a product reads where its parts are, with no copy: each
    part's Ref and where it starts along `axis` of `shape` (the parts' batched
    flag is the concatenation's)."""

    parts: tuple  # (Ref, start)
    axis: int
    shape: tuple
    batched: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def elem(self) -> str:
        return self.parts[0][0].elem  # the parts' (Region joins parts of one type only)


def parts_of(operand) -> list:
    """The Refs an operand (a Ref or a Joined) reads."""
    return [ref for ref, _ in operand.parts] if isinstance(operand, Joined) else [operand]


def strides(shape: tuple) -> list:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return out[::-1]


def decode(var: str, sizes: list) -> list:
    """C expressions of the indices of a row-major flat index `var` over `sizes`;
    the first size may be None (runtime), which needs no modulo."""
    exprs, inner = [], 1
    for i in reversed(range(len(sizes))):
        part = var if inner == 1 else f"({var} / {inner})"
        exprs.append(part if i == 0 else f"({part} % {sizes[i]})")
        inner *= sizes[i] if sizes[i] is not None else 1
    return exprs[::-1]


def offset(terms) -> str:
    """sum(index * stride) as C, dropping zero strides."""
    parts = [idx if s == 1 else f"{idx} * {s}" for idx, s in terms if s]
    return " + ".join(parts) or "0"


# Kernels index with 32-bit `int`. A grid-stride loop steps its index past
# the end by up to the loop's own length before it stops, so no kernel may
# index more than half of int's range: a buffer one launch touches holds at
# most MAX_INDEX elements. Per-example sizes are checked when the kernels are
# generated (`lowering.check_sizes`), rows times them at each call
# (`executor.Executor.check_sizes`).
MAX_INDEX = 2**30


def size_expr(n: int, rows: bool) -> str:
    """n elements per row times the kernel's `rows`, or n alone, as C."""
    return f"rows * {n}" if rows else str(n)
