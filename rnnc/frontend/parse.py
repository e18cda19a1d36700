"""Parse `.cell` text into an AST with a position on every node.

The grammar lives in `grammar/cell.lark`; lark's LALR parser reads it, a small
post-lexer drops newlines inside brackets, and a transformer builds the frozen
dataclasses below. Syntax errors become `CellError`s at file:line:col.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources

import lark

from ..errors import CellError, Pos, Source

KEYWORDS = ("cell", "dim", "input", "context", "state", "param", "step", "next", "output")


# --- AST -------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Number(Node):
    value: float


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class Unary(Node):
    op: str  # "neg"
    operand: Node


@dataclass(frozen=True)
class Binary(Node):
    op: str  # add sub mul div matmul
    left: Node
    right: Node


@dataclass(frozen=True)
class Keyword(Node):
    name: str
    value: Node


@dataclass(frozen=True)
class Call(Node):
    func: str
    args: tuple  # of Node and Keyword


@dataclass(frozen=True)
class Var(Node):
    """A declared name with its shape and (params only) initial value."""

    name: str
    shape: tuple  # of expression nodes
    init: Node | None = None


@dataclass(frozen=True)
class Decl(Node):
    kind: str  # dim input context state param step
    items: tuple  # Var, or Name for dims and the step


@dataclass(frozen=True)
class Assign(Node):
    targets: tuple  # of Name
    value: Node


@dataclass(frozen=True)
class Next(Node):
    target: Name
    value: Node


@dataclass(frozen=True)
class Output(Node):
    target: Name
    value: Node | None


@dataclass(frozen=True)
class Cell(Node):
    name: str
    body: tuple


@dataclass(frozen=True)
class Module(Node):
    cells: tuple


MAX_INDENT = 40  # levels of indentation format_ast draws; deeper ones are numbered


def _indent(level: int) -> str:
    if level <= MAX_INDENT:
        return "  " * level
    return "  " * MAX_INDENT + f"<{level}> "


def format_ast(node) -> str:
    """An indented, stable rendering of an AST (for `rnnc emit --stage ast`).

    Written with an explicit stack, so a very long expression (a sum of
    thousands of terms nests that deep) prints without recursion; levels past
    MAX_INDENT show their depth as a number, so the text grows with the tree's
    size, not with its size times its depth."""
    lines = []
    stack = [(node, 0)]
    while stack:
        node, indent = stack.pop()
        pad = _indent(indent)
        if isinstance(node, str):  # a field label
            lines.append(pad + node)
            continue
        if isinstance(node, tuple):
            stack.extend((n, indent) for n in reversed(node))
            continue
        if not isinstance(node, Node):
            lines.append(pad + repr(node))
            continue
        scalars, children = [], []
        for f in fields(node):
            if f.name == "pos":
                continue
            value = getattr(node, f.name)
            if isinstance(value, (Node, tuple)) and value != ():
                children.append((f.name, value))
            else:
                scalars.append(f"{f.name}={value!r}")
        head = f"{pad}{type(node).__name__} @{node.pos.line}:{node.pos.col}"
        if scalars:
            head += " " + " ".join(scalars)
        lines.append(head)
        for name, value in reversed(children):
            stack.append((value, indent + 2))
            stack.append((f"{name}:", indent + 1))
    return "\n".join(lines)


# --- lark glue -------------------------------------------------------------
_OPENERS = {"LPAR": "RPAR", "LSQB": "RSQB", "LBRACE": "RBRACE"}
_CLOSERS = {v: k for k, v in _OPENERS.items()}


class _ParseState:
    """What one parse has seen so far: the brackets still open and the last two
    tokens passed on, so that a syntax error can name a bracket that was never
    closed or a keyword used as a name."""

    def __init__(self):
        self.open: list = []
        self.recent: list = []


# The parse running in this thread (or task). The lark parser and its
# post-lexer are built once and shared, so the state of a parse cannot live in
# them: `parse` makes a fresh `_ParseState` and the post-lexer finds it here.
_current: contextvars.ContextVar = contextvars.ContextVar("rnnc_parse_state")


class _BracketNewlines:
    """Post-lexer: newlines inside ( ) or [ ] are not statement ends, and
    runs of newlines (blank or comment lines) collapse into one. It keeps what
    it sees in the current parse's `_ParseState`."""

    always_accept = ("_NL",)

    def process(self, tokens):
        state = _current.get()
        stack, recent = state.open, state.recent
        last_was_newline = False
        for tok in tokens:
            if tok.type in _OPENERS:
                stack.append(tok)
            elif tok.type in _CLOSERS:
                if stack and stack[-1].type == _CLOSERS[tok.type]:
                    stack.pop()
            if tok.type == "_NL":
                inside = any(t.type != "LBRACE" for t in stack)
                if inside or last_was_newline:
                    continue
                last_was_newline = True
            else:
                last_was_newline = False
            recent[:] = recent[-1:] + [tok]
            yield tok


@lru_cache(maxsize=None)
def _parser() -> lark.Lark:
    grammar = resources.files("rnnc.grammar").joinpath("cell.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True,
                     postlex=_BracketNewlines(), maybe_placeholders=True)


def _pos(meta_or_token) -> Pos:
    return Pos(meta_or_token.line, meta_or_token.column)


class _ToAst(lark.visitors.Transformer_NonRecursive):
    """The parse tree to AST nodes, bottom up (without recursion: a sum of
    thousands of terms is a tree that deep)."""

    def _name(self, tok) -> Name:
        return Name(_pos(tok), str(tok))

    @lark.v_args(meta=True)
    def start(self, meta, cells):
        return Module(Pos(1, 1), tuple(cells))

    @lark.v_args(meta=True)
    def cell(self, meta, items):
        name, *body = items
        return Cell(_pos(name), str(name), tuple(b for b in body if b is not None))

    def _decl(kind):
        @lark.v_args(meta=True)
        def build(self, meta, items):
            return Decl(_pos(meta), kind, tuple(items))
        return build

    input_decl = _decl("input")
    context_decl = _decl("context")
    state_decl = _decl("state")
    param_decl = _decl("param")

    @lark.v_args(meta=True)
    def dim_decl(self, meta, names):
        return Decl(_pos(meta), "dim", tuple(self._name(n) for n in names))

    @lark.v_args(meta=True)
    def step_decl(self, meta, names):
        return Decl(_pos(meta), "step", tuple(self._name(n) for n in names))

    def var(self, items):
        name, shape = items
        return Var(_pos(name), str(name), shape)

    def param_var(self, items):
        name, shape, init = items
        return Var(_pos(name), str(name), shape, init)

    def shape(self, items):
        return tuple(i for i in items if i is not None)

    @lark.v_args(meta=True)
    def assign(self, meta, items):
        *targets, value = items
        return Assign(_pos(meta), tuple(self._name(t) for t in targets), value)

    @lark.v_args(meta=True)
    def next_stmt(self, meta, items):
        target, value = items
        return Next(_pos(meta), self._name(target), value)

    @lark.v_args(meta=True)
    def output_stmt(self, meta, items):
        target, value = items
        return Output(_pos(meta), self._name(target), value)

    def number(self, items):
        tok, = items
        return Number(_pos(tok), float(tok))  # may be inf (1e999); the checker decides

    def name(self, items):
        return self._name(items[0])

    def neg(self, items):
        minus, operand = items
        return Unary(_pos(minus), "neg", operand)

    def _binary(op):
        def build(self, items):
            left, operator, right = items
            return Binary(_pos(operator), op, left, right)  # errors point at the operator
        return build

    add = _binary("add")
    sub = _binary("sub")
    mul = _binary("mul")
    div = _binary("div")
    matmul = _binary("matmul")

    def call(self, items):
        func, *args = items
        return Call(_pos(func), str(func), tuple(a for a in args if a is not None))

    def keyword(self, items):
        name, value = items
        return Keyword(_pos(name), str(name), value)


_TOKEN_WORDS = {
    "_NL": "end of line", "$END": "end of file", "NAME": "name", "NUMBER": "number",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'",
    "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'",
    "STAR": "'*'", "SLASH": "'/'", "AT": "'@'",
}


def _describe(token_type: str) -> str:
    if token_type in _TOKEN_WORDS:
        return _TOKEN_WORDS[token_type]
    return "'" + token_type.lower() + "'" if token_type.isupper() else token_type


def _is_keyword(tok) -> bool:
    return tok is not None and tok.type != "NAME" and str(tok) in KEYWORDS


def _unclosed(open_brackets: list, before: str = "") -> str:
    tok = open_brackets[-1]
    before = " " + before if before else ""
    return (f"'{tok}' at line {tok.line}:{tok.column} is never closed "
            f"(expected {_describe(_OPENERS[tok.type])}{before})")


def _syntax_error(err: lark.exceptions.LarkError, source: Source,
                  open_brackets: list, recent: list) -> CellError:
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        return CellError(f"unexpected character {err.char!r}", Pos(err.line, err.column), source)
    if isinstance(err, lark.exceptions.UnexpectedToken):
        return _unexpected_token(err, source, open_brackets, recent)
    if isinstance(err, lark.exceptions.UnexpectedEOF):
        return CellError("unexpected end of file", source.last_pos, source)
    return CellError(f"syntax error: {err}", None, source)


def _unexpected_token(err: lark.exceptions.UnexpectedToken, source: Source,
                      open_brackets: list, recent: list) -> CellError:
    """The error for a token the grammar does not allow where it stands,
    worded after its most likely cause."""
    tok = err.token
    # The token before `tok`: lark's contextual lexer refuses some tokens
    # itself, before the post-lexer passes them on.
    if recent and recent[-1] is tok:
        prev = recent[-2] if len(recent) == 2 else None
    else:
        prev = recent[-1] if recent else None
    expected = sorted(_describe(t) for t in err.expected if not t.startswith("__"))
    hint = f"; expected {', '.join(expected)}" if expected and len(expected) <= 6 else ""
    if tok.type == "$END" or getattr(tok, "line", None) in (None, -1):
        if open_brackets:
            return CellError(f"unexpected end of file: {_unclosed(open_brackets)}",
                             source.last_pos, source)
        return CellError(f"unexpected end of file{hint}", source.last_pos, source)
    inner = open_brackets[-1] if open_brackets else None
    if (inner is not None and inner.type != "LBRACE" and inner.line < tok.line
            and prev is not None and prev.end_line is not None and prev.end_line < tok.line
            and prev.type in ("NAME", "NUMBER", "RPAR", "RSQB")):
        # A new line that looks like a new statement, while a bracket is
        # open: the bracket is the mistake, not this line.
        return CellError(_unclosed(open_brackets, f"before line {tok.line}"), _pos(inner),
                         source)
    if (tok.type == "_NL" and prev is not None
            and prev.type in ("COMMA", "EQUAL", "PLUS", "MINUS", "STAR", "SLASH", "AT")):
        return CellError(f"the line ends after '{prev}'; a statement is one line, and "
                         "continues onto the next only inside ( ) or [ ]", _pos(prev), source)
    if tok.type in ("EQUAL", "COMMA", "LSQB") and _is_keyword(prev):
        return CellError(f"'{prev}' is a reserved keyword and cannot be used as a name",
                         _pos(prev), source)
    if _is_keyword(tok):
        return CellError(f"'{tok}' is a reserved keyword and cannot be used here",
                         _pos(tok), source)
    text = "end of line" if tok.type == "_NL" else repr(str(tok))
    return CellError(f"unexpected {text}{hint}", _pos(tok), source)


def parse(source: Source) -> Module:
    """Parse a whole `.cell` file; raises CellError on a syntax error."""
    state = _ParseState()
    token = _current.set(state)
    try:
        tree = _parser().parse(source.text + "\n")
    except lark.exceptions.LarkError as err:
        raise _syntax_error(err, source, state.open, state.recent) from None
    finally:
        _current.reset(token)
    module = _ToAst().transform(tree)
    if not module.cells:
        raise CellError("no cell in this file (expected 'cell NAME { ... }')", Pos(1, 1), source)
    seen = {}
    for cell in module.cells:
        if cell.name in seen:
            p = seen[cell.name]
            raise CellError(f"cell '{cell.name}' is already defined at line {p.line}:{p.col}",
                            cell.pos, source)
        seen[cell.name] = cell.pos
    return module
