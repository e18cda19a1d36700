"""The language front end: the shipped examples, IR shapes, language features, the CLI.

Shapes in these tests are written by hand from each cell's equations, with
D=3, H=5, E=7, S=11 (all different, so a wrong axis shows).
"""
from __future__ import annotations

import re
import sys

import pytest

import new_cells
import rnnc
from rnnc import driver
from rnnc.cli import main

from conftest import EXAMPLES, ROOT, example, run_rnnc
NAMES = ["lstm", "gru", "milstm", "attention_lstm", "recurrent_attention_lstm",
         "layernorm_lstm", "peephole_lstm", "indrnn", "zoneout_lstm", "variational_gru",
         "projected_lstm", "elman", "elman_relu"]
DIMS = {"D": 3, "H": 5, "E": 7, "S": 11, "P": 2}


def check_text(text: str, cell=None, dims=None):
    return driver.check_source(rnnc.errors.Source("<test>", text), cell, dims)


def emit(capsys, *args) -> str:
    assert main(["emit", *args]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def ir_values(text: str) -> dict:
    """`rnnc emit --stage ir` text as {name: (shape, shared)}; shape is the text in [ ]."""
    values = {}
    for line in text.splitlines()[1:]:
        m = re.match(r"\s+(?:(input|context|state|param)\s+)?(\S+?)\[([^\]]*)\]", line)
        if m:
            kind, name, shape = m.groups()
            shared = kind == "param" or line.endswith("(shared)")
            values[name] = (shape, shared)
    return values


def dims_args(names) -> list:
    return [a for n in names for a in ("-D", f"{n}={DIMS[n]}")]


# --- the shipped examples ------------------------------------------------------
def test_all_thirteen_examples_ship():
    assert sorted(p.stem for p in EXAMPLES) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_checks_without_warnings(name, capsys):
    path = example(name)
    checked = driver.check_source(driver.read_source(path))
    assert checked.warnings == ()
    assert checked.cell.name == name
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok (cell {name})\n"
    assert err == ""


@pytest.mark.parametrize("name", NAMES)
def test_example_has_a_header_and_one_cell(name):
    text = example(name).read_text()
    assert text.startswith(f"# {name}.cell -- ")
    assert len(re.findall(r"^cell ", text, flags=re.M)) == 1


@pytest.mark.parametrize("name", NAMES)
def test_example_checks_with_dims_bound(name):
    cell = driver.check_source(driver.read_source(example(name))).cell
    bound = {k: DIMS[k] for k, _ in cell.dims}
    checked = driver.check_source(driver.read_source(example(name)), dims=bound)
    assert dict(checked.cell.dims) == bound
    for node in checked.cell.nodes:
        assert all(s.value is not None for s in node.shape), node


def test_lstm_ir_shapes(capsys):
    text = emit(capsys, str(example("lstm")), "--stage", "ir", *dims_args("DH"))
    assert text.splitlines()[0] == "cell lstm  dims D=3 H=5"
    v = ir_values(text)
    # D=3, H=5: gates are 4*H = 20 wide
    expected = {
        "x": ("3", False), "h": ("5", False), "c": ("5", False),
        "W": ("3, 20", True), "U": ("5, 20", True), "b": ("20", True),
        "gates": ("20", False),
        "i": ("5", False), "f": ("5", False), "g": ("5", False), "o": ("5", False),
        "c_new": ("5", False), "h_new": ("5", False),
    }
    for name, want in expected.items():
        assert v[name] == want, name
    # x @ W, h @ U, their sum: [20]; the other temporaries are [5]
    temps = sorted(s for n, (s, _) in v.items() if n.startswith("%"))
    assert temps == ["20"] * 3 + ["5"] * 7
    assert "  param   b[20] = 0.0" in text
    assert "  param   W[3, 20] = uniform" in text
    assert text.rstrip().splitlines()[-3:] == ["  next h = h_new", "  next c = c_new",
                                               "  output y = h_new"]


def test_attention_lstm_ir_shapes(capsys):
    text = emit(capsys, str(example("attention_lstm")), "--stage", "ir",
                *dims_args("DHES"))
    assert text.splitlines()[0] == "cell attention_lstm  dims D=3 H=5 E=7 S=11"
    v = ir_values(text)
    expected = {
        "x": ("3", False), "enc": ("11, 7", False),
        "h": ("5", False), "c": ("5", False), "ctx": ("7", False),
        "W": ("3, 20", True), "U": ("12, 20", True),  # H + E = 12
        "b": ("20", True), "We": ("7, 7", True), "Wd": ("5, 7", True), "v": ("7", True),
        "keys": ("11, 7", False),  # enc @ We: per example, since enc is a context
        "gates": ("20", False),
        "i": ("5", False), "f": ("5", False), "g": ("5", False), "o": ("5", False),
        "c_new": ("5", False), "h_new": ("5", False),
        "score": ("11", False), "alpha": ("11", False), "ctx_new": ("7", False),
    }
    for name, want in expected.items():
        assert v[name] == want, name
    assert "  %2[12] = concat(h, ctx, axis=-1)" in text
    # alpha @ enc: a vector-matrix product per example, batch letter on both sides
    assert re.search(r"ctx_new\[7\] = dot\(alpha, enc, spec=zk,zkj->zj\)", text)
    assert re.search(r"keys\[11, 7\] = dot\(enc, We, spec=zik,kj->zij\)", text)
    assert "next ctx = ctx_new" in text


def test_shared_marks_for_values_of_params_only(capsys, tmp_path):
    path = tmp_path / "shared.cell"
    path.write_text("cell s {\n"
                    "    dim D, H\n"
                    "    input x[D]\n"
                    "    param W[H, D], b[H] = 0\n"
                    "    Wt = transpose(W)          # params only: once, for every example\n"
                    "    bias = 2 * b\n"
                    "    output y = x @ Wt + bias\n"
                    "}\n")
    v = ir_values(emit(capsys, str(path), "--stage", "ir", *dims_args("DH")))
    assert v["Wt"] == ("3, 5", True)
    assert v["bias"] == ("5", True)
    assert v["y"] == ("5", False)
    assert v["x"] == ("3", False)


# --- language features -------------------------------------------------------------
BASE = """
cell t {{
    dim D, H
    input x[D]
    param W[D, H]
    {body}
}}
"""


def cell_of(body: str, dims=None, cell=None):
    return check_text(BASE.format(body=body), cell, dims)


def shape_of(checked, name: str) -> str:
    values = {n.out: n for n in checked.cell.nodes}
    from rnnc.shapes import shape_str
    return shape_str(values[name].shape)


def test_multi_line_expressions_in_parentheses_and_comments():
    checked = check_text("""
# a comment before the cell
cell t {   # after the brace
    dim D, H   # a comment after a declaration
    input x[D]
    # a comment on its own line

    param W[D,       # inside brackets
            H], b[H] = 0
    a = (x @ W       # the expression goes on
         + b         # and on
         )
    y2 = tanh(
        a
    )
    z = a + \\
        y2
    output y = z     # the end
}
# a comment after the cell
""")
    assert checked.warnings == ()
    assert shape_of(checked, "z") == "[H]"
    assert [d.name for d in checked.cell.decls] == ["x", "W", "b"]


def test_several_cells_per_file_and_cell_selection(tmp_path, capsys):
    path = tmp_path / "two.cell"
    path.write_text("cell first {\n    dim D\n    input x[D]\n    output y = tanh(x)\n}\n\n"
                    "cell second {\n    dim E\n    input u[E]\n    output v = relu(u)\n}\n")
    assert check_text(path.read_text()).cell.name == "first"
    assert check_text(path.read_text(), cell="second").cell.name == "second"
    assert main(["check", str(path), "--cell", "second"]) == 0
    assert capsys.readouterr().out == f"{path}: ok (cell second)\n"
    text = emit(capsys, str(path), "--stage", "ir", "--cell", "second", "-D", "E=4")
    assert text.splitlines()[0] == "cell second  dims E=4"
    assert "v[4] = relu(u)" in text
    assert emit(capsys, str(path), "--stage", "ir").splitlines()[0] == "cell first  dims D"


def test_c_and_cuda_words_are_ordinary_names():
    checked = check_text("""
cell kernel {
    dim D, int, blockDim
    input float[D], threadIdx[D]
    state __global__[D]
    param double[D, D]
    if = float @ double + threadIdx
    while = tanh(if) * __global__
    next __global__ = while
    output return = while
}
""", dims={"D": 3, "int": 1, "blockDim": 2})
    names = [d.name for d in checked.cell.decls]
    assert names == ["float", "threadIdx", "__global__", "double"]
    assert dict(checked.cell.outputs) == {"return": "while"}


def test_initialisers_belong_to_the_item_they_follow_and_may_be_negative():
    checked = cell_of("param b[H] = -1.5, c[H], d[H] = 2, e[H] = 1e-3\n"
                      "    output y = x @ W + b + c + d + e")
    inits = {d.name: d.init for d in checked.cell.decls}
    assert inits == {"x": None, "W": None, "b": -1.5, "c": None, "d": 2.0, "e": 0.001}


def test_numbers():
    checked = cell_of("output y = x * 1 + 0.5 + 1e-5 + .25 + 2. + 3E+2 - -1")
    consts = [n.attr("value") for n in checked.cell.nodes if n.op == "const"]
    assert consts == [1.0, 0.5, 1e-5, 0.25, 2.0, 300.0, -1.0]  # `-1` is folded into a literal
    assert not [n for n in checked.cell.nodes if n.op == "neg"]


def test_reductions_keepdims_and_softmax():
    checked = check_text("""
cell r {
    dim S, E
    context m[S, E]
    input x[E]
    a = sum(m, axis=0)                   # [E]
    b = mean(m, axis=-1)                 # [S]
    c = mean(m, axis=0, keepdims=1)      # [1, E]
    d = sum(x, axis=-1, keepdims=1)      # [1]
    e = sum(x)                           # [] (axis=-1 by default)
    p = softmax(m, axis=0)               # [S, E]
    q = softmax(x)                       # [E]
    output y = a + c + d + e + x * q + sum(p, axis=0) + sum(b * 0, axis=0)
}
""", dims={"S": 11, "E": 7})
    assert [shape_of(checked, n) for n in "abcdepq"] == [
        "[7]", "[11]", "[1, 7]", "[1]", "[]", "[11, 7]", "[7]"]
    assert shape_of(checked, "y") == "[1, 7]"


def test_concat_transpose_split_with_axes():
    checked = check_text("""
cell s {
    dim D, H
    input x[D]
    state h[H]
    context M[D, H]
    param W[D, 2*H]
    both = concat(h, x, h)              # [H + D + H]
    rows = concat(M, M, axis=0)         # [2*D, H]
    Mt = transpose(M)                   # [H, D]
    top, bottom = split(rows, 2, axis=0)
    l, r = split(x @ W, 2)
    next h = l * r + sum(top - bottom, axis=0) + sum(both) * 0
    output y = Mt @ x
}
""")
    assert shape_of(checked, "both") == "[D + 2*H]"
    assert shape_of(checked, "rows") == "[2*D, H]"
    assert shape_of(checked, "Mt") == "[H, D]"
    assert shape_of(checked, "top") == "[D, H]"
    assert shape_of(checked, "l") == "[H]"
    assert shape_of(checked, "y") == "[H]"


def test_shapes_are_compared_in_canonical_form():
    checked = check_text("""
cell canon {
    dim D, H, E
    input x[D]
    state h[H], ctx[E]
    param U[E + H, 4 * H], V[2*(H+1), H*E], P[E*H, (H + E) - E]
    gates = concat(h, ctx) @ U                 # [H + E] @ [E + H, 4*H]
    a, b, c, d = split(gates, 4)
    next h = a + b + c + d
    next ctx = ctx
    one = sum(x, keepdims=1) * 0 + 1           # [1]
    k = concat(h, h, one, one) @ V             # [2*H + 2] @ [2*(H+1), H*E]
    output y = k @ P                           # [H*E] @ [E*H, H]
}
""")
    assert shape_of(checked, "gates") == "[4*H]"
    assert shape_of(checked, "k") == "[E*H]"
    assert shape_of(checked, "y") == "[H]"
    decls = {d.name: d.shape for d in checked.cell.decls}
    from rnnc.shapes import Size
    H, E = Size.dim("H"), Size.dim("E")
    assert decls["U"][0] == H + E
    assert decls["V"][0] == Size.const(2) * H + Size.const(2)


def test_symbolic_emit_without_dims(capsys):
    text = emit(capsys, str(example("attention_lstm")), "--stage", "ir")
    assert text.splitlines()[0] == "cell attention_lstm  dims D H E S"
    v = ir_values(text)
    assert v["U"] == ("E + H, 4*H", True)
    assert v["gates"] == ("4*H", False)
    assert v["keys"] == ("S, E", False)
    assert v["score"] == ("S", False)
    assert v["ctx_new"] == ("E", False)
    assert "g[H] = slice(gates, axis=0, start=2*H, stop=3*H)" in text


def test_an_axis_error_points_at_its_own_call():
    with pytest.raises(rnnc.CellError) as info:
        cell_of("output y = softmax(sum(x @ W, axis=0, keepdims=1), axis=3)")
    assert "axis 3 is out of range for softmax() of shape [1]" in info.value.message
    assert (info.value.line, info.value.col) == (6, 56)  # the outer axis=3


def test_split_of_a_symbolic_size_is_decided_when_dims_are_bound():
    body = "a, b = split(x @ W, 2)\n    output y = a * b"
    assert shape_of(cell_of(body), "a") == "[H/2]"
    assert shape_of(cell_of(body, dims={"H": 6}), "a") == "[3]"
    with pytest.raises(rnnc.CellError, match="cannot split size 5"):
        cell_of(body, dims={"H": 5})


def test_functions():
    checked = cell_of("a = x @ W\n"
                      "    b = sigmoid(a) + tanh(a) + relu(a) + exp(a) + log(abs(a) + 1)\n"
                      "    c = sqrt(softplus(a)) + max(a, 0) + min(a, b) - -a\n"
                      "    output y = b / c")
    ops = {n.op for n in checked.cell.nodes}
    assert {"sigmoid", "tanh", "relu", "exp", "log", "abs", "sqrt", "softplus", "max", "min",
            "neg", "div", "sub", "add", "dot"} <= ops


def test_output_of_a_named_value_and_a_state_through_next():
    checked = check_text("""
cell o {
    dim D
    input x[D]
    state s[D]
    s_new = s + x
    next s = s_new
    output s_new
    output total = sum(s_new)
}
""")
    assert checked.cell.outputs == (("s_new", "s_new"), ("total", "total"))


def test_windows_line_endings_tabs_and_a_last_statement_beside_the_brace():
    text = "cell w {\r\n\tdim D\r\n\tinput x[D]\r\n\toutput y = tanh(x) }\r\n"
    assert check_text(text).cell.outputs == (("y", "y"),)
    one_line = "cell w { dim D\n input x[D]\n output y = x }"
    assert check_text(one_line).cell.name == "w"


def test_errors_in_text_point_at_their_line_with_crlf():
    with pytest.raises(rnnc.CellError) as info:
        check_text("cell w {\r\n\tdim D\r\n\tinput x[D]\r\n\toutput y = tanh(q)\r\n}\r\n")
    assert (info.value.line, info.value.col) == (4, 18)
    assert "\toutput" not in str(info.value)  # the tab prints as one space
    assert "     output y = tanh(q)\n                     ^" in str(info.value)


@pytest.mark.parametrize("name", ["sum", "minus", "calls", "parens"])
def test_long_and_deep_expressions_check_and_print(name, capsys, tmp_path):
    """Neither the parser nor the checker recurses on an expression's depth:
    10,000 terms and 1,000 levels of unary minus, calls or parentheses check,
    and print as an AST whose text grows with the tree's size, not its depth."""
    deep, _ = new_cells.deep_pairs()[name]
    path = tmp_path / "deep.cell"
    path.write_text(deep)
    assert main(["check", str(path)]) == 0
    assert "ok (cell deep)" in capsys.readouterr().out
    ast = emit(capsys, str(path), "--stage", "ast")
    assert ast.startswith("Module @1:1") and len(ast) < 200 * ast.count("\n")


def test_a_deep_shape_expression_is_one_size():
    depth = 1000
    size = "(" * depth + "H" + " + 1)" * depth + " - " + " - ".join(["1"] * depth)
    checked = check_text(f"cell s {{\n dim H\n input x[{size}]\n output y = x * 2\n}}", dims={"H": 5})
    assert checked.cell.decls[0].shape[0].value == 5


def test_emit_ast_has_positions(capsys):
    text = emit(capsys, str(example("lstm")), "--stage", "ast")
    assert text.splitlines()[0] == "Module @1:1"
    assert re.search(r"Cell @\d+:6 name='lstm'", text)
    # a binary expression is placed at its operator
    assert "Binary @13:15 op='matmul'" in text  # x @ W on line 13


# --- the command line ------------------------------------------------------------------
def test_exit_status_0_for_good_files():
    proc = run_rnnc("check", *(f"examples/{n}.cell" for n in NAMES))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.count(": ok (cell ") == len(NAMES)
    proc = run_rnnc("emit", "examples/gru.cell", "--stage", "ir", "-D", "D=3", "-D", "H=5")
    assert proc.returncode == 0
    assert "h_new[5] = add(" in proc.stdout


def test_exit_status_1_for_user_errors(capsys):
    proc = run_rnnc("check", "tests/malformed/unknown_name.cell")
    assert proc.returncode == 1
    assert proc.stderr.startswith("tests/malformed/unknown_name.cell:8:27: error: unknown name")
    assert main(["emit", "examples/lstm.cell", "--stage", "ir", "-D", "K=3"]) == 1  # -D H=x: a usage error
    err = capsys.readouterr().err
    assert "no dim 'K'" in err and "Traceback" not in err
    assert main(["check", "no/such/file.cell"]) == 1
    err = capsys.readouterr().err
    assert "no/such/file.cell" in err and "cannot read" in err


def test_exit_status_2_for_usage_errors(capsys):
    proc = run_rnnc("check")
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
    proc = run_rnnc("emit", "examples/lstm.cell", "--stage", "nonsense")
    assert proc.returncode == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    capsys.readouterr()


def test_concurrent_parses_each_report_their_own_error():
    """The LALR parser is built once and shared; what one parse has seen (its
    open brackets, its last tokens) is its own, so threads parsing different
    broken files at once get the same messages as one after another."""
    from concurrent.futures import ThreadPoolExecutor

    from rnnc.frontend.parse import parse

    files = [p for p in sorted((ROOT / "tests" / "malformed").glob("*.cell")) if p.stat().st_size < 2000]

    def message(path):
        try:
            parse(driver.read_source(path))
            return None
        except rnnc.CellError as err:
            return str(err)
    alone = {p: message(p) for p in files}
    assert sum("never closed" in (m or "") for m in alone.values()) >= 2  # state-dependent messages
    jobs = files * 15
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(message, jobs))
    finally:
        sys.setswitchinterval(interval)
    wrong = [p.name for p, m in zip(jobs, together) if m != alone[p]]
    assert not wrong, f"{len(wrong)} of {len(jobs)} messages differ, e.g. {wrong[:3]}"
