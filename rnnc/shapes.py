"""Symbolic sizes: polynomials over dim symbols in a canonical form.

A `Size` is a sum of terms, each a rational coefficient times a product of
dim symbols. Two sizes are equal when their canonical forms are, so
`H + E == E + H` and `2*(H+1) == 2*H + 2`. Exact division by an integer or by a
single term is allowed; the result must be a whole number once dims are bound.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Mapping

Monomial = tuple  # sorted tuple of dim names, () for the constant term


class Size:
    __slots__ = ("terms", "value")

    def __init__(self, terms: Mapping[Monomial, Fraction]):
        self.terms = {m: Fraction(c) for m, c in sorted(terms.items()) if c != 0}
        # the integer value of a constant size, else None (read on hot paths)
        const = self.terms.get((), Fraction(0))
        whole = len(self.terms) <= 1 and not any(self.terms.keys() - {()})
        self.value = int(const) if whole and const.denominator == 1 else None

    @staticmethod
    def const(n) -> "Size":
        return Size({(): Fraction(n)})

    @staticmethod
    def dim(name: str) -> "Size":
        return Size({(name,): Fraction(1)})

    # arithmetic -----------------------------------------------------------
    def __add__(self, other: "Size") -> "Size":
        terms = dict(self.terms)
        for m, c in other.terms.items():
            terms[m] = terms.get(m, 0) + c
        return Size(terms)

    def __neg__(self) -> "Size":
        return Size({m: -c for m, c in self.terms.items()})

    def __sub__(self, other: "Size") -> "Size":
        return self + (-other)

    def __mul__(self, other: "Size") -> "Size":
        terms: dict = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in other.terms.items():
                m = tuple(sorted(m1 + m2))
                terms[m] = terms.get(m, 0) + c1 * c2
        return Size(terms)

    def divide(self, other: "Size") -> "Size | None":
        """self / other when other is a single term and divides every term."""
        if len(other.terms) != 1:
            return None
        (m2, c2), = other.terms.items()
        terms = {}
        for m1, c1 in self.terms.items():
            rest = list(m1)
            for sym in m2:
                if sym not in rest:
                    return None
                rest.remove(sym)
            terms[tuple(rest)] = c1 / c2
        return Size(terms)

    # queries --------------------------------------------------------------
    @property
    def symbols(self) -> set:
        return {s for m in self.terms for s in m}

    def bind(self, dims: Mapping[str, int]) -> "Size":
        out = Size.const(0)
        for m, c in self.terms.items():
            term = Size.const(c)
            for sym in m:
                term = term * (Size.const(dims[sym]) if sym in dims else Size.dim(sym))
            out = out + term
        return out

    def __eq__(self, other) -> bool:
        if isinstance(other, int):
            other = Size.const(other)
        return isinstance(other, Size) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(tuple(self.terms.items()))

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for m, c in sorted(self.terms.items(), key=lambda mc: (-len(mc[0]), mc[0])):
            sign = "-" if c < 0 else "+"
            c = abs(c)
            syms = "*".join(m)
            if not m:
                body = str(c)
            elif c == 1:
                body = syms
            elif c.denominator == 1:
                body = f"{c.numerator}*{syms}"
            else:
                body = f"{c.numerator}*{syms}/{c.denominator}" if c.numerator != 1 else f"{syms}/{c.denominator}"
            parts.append((sign, body))
        first_sign, first = parts[0]
        text = ("-" if first_sign == "-" else "") + first
        for sign, body in parts[1:]:
            text += f" {sign} {body}"
        return text

    __repr__ = __str__


Shape = tuple  # tuple of Size


def shape_str(shape) -> str:
    """`[H, 4*H]`: a shape of sizes or of ints, as messages and printers show it."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def concrete_shape(shape: Shape) -> tuple:
    """The shape as plain ints (every dim bound)."""
    return tuple(int(s.value) for s in shape)


def broadcast(a: Shape, b: Shape) -> Shape | None:
    """NumPy broadcasting of two per-example shapes; None when they clash."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else Size.const(1)
        y = b[-i] if i <= len(b) else Size.const(1)
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(reversed(out))
