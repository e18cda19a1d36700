"""The malformed corpus: every kind of user error, reported where it was made.

Each file in tests/malformed/ holds one mistake. The table gives the extra
command-line arguments (dims, --cell), the `line:col` the error must point at
and words its message must contain. Every row is run through `rnnc check`
(when it takes no -D) and `rnnc emit --stage ir`, and must print

    FILE:LINE:COL: error: ...words...
        the source line
        ^ under column COL

with exit status 1 and no traceback.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from rnnc.cli import main

from conftest import example, run_rnnc

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "malformed"

# file, extra args, line:col, words of the message
TABLE = [
    ("syntax_error", [], "8:22", ["unexpected '@'"]),
    ("unexpected_character", [], "8:26", ["unexpected character", "'$'"]),
    ("unexpected_eof", [], "8:25", ["unexpected end of file", "'{'", "never closed"]),
    ("eof_in_expression", [], "8:22", ["unexpected end of file", "'('", "never closed"]),
    ("unclosed_paren", [], "8:17", ["'('", "never closed", "')'"]),
    ("line_ends_after_operator", [], "8:25", ["line ends after '+'", "( )"]),
    ("no_cell", [], "1:1", ["no cell"]),
    ("empty_file", [], "1:1", ["no cell"]),
    ("duplicate_cell", [], "8:6", ["cell 'twin'", "already defined", "2:6"]),
    ("no_input", [], "2:6", ["cell 'bad'", "no input"]),
    ("unknown_name", [], "8:27", ["unknown name", "'hh'"]),
    ("assigned_twice", [], "9:5", ["'a'", "already defined", "8:5"]),
    ("use_before_definition", [], "8:18", ["'a'", "used before", "defined", "9:5"]),
    ("state_without_next", [], "5:17", ["state 'c'", "no 'next c"]),
    ("state_two_nexts", [], "9:5", ["state 'h'", "already has a next", "8:5"]),
    ("next_of_non_state", [], "9:10", ["'W'", "not a state", "param"]),
    ("output_of_state", [], "9:12", ["'output h'", "lag one step", "next h"]),
    ("output_alias_of_state", [], "7:16", ["'output y'", "lag one step", "next h"]),
    ("output_twice", [], "11:12", ["output 'y'", "twice"]),
    ("output_unknown", [], "9:12", ["unknown name", "'h_new'"]),
    ("keyword_as_name_next", [], "8:5", ["'next'", "reserved keyword", "name"]),
    ("input_as_name", [], "8:5", ["'input'", "reserved keyword", "name"]),
    ("keyword_as_dim", [], "3:14", ["'input'", "reserved keyword"]),
    ("builtin_as_name", [], "8:5", ["'tanh'", "built-in function"]),
    ("dim_as_value", [], "8:28", ["'H'", "dim", "only", "shapes"]),
    ("value_in_shape", [], "6:25", ["'x'", "input", "not a dim"]),
    ("unknown_function", [], "8:14", ["unknown function", "'gelu'", "sigmoid"]),
    ("wrong_arity", [], "8:14", ["max()", "takes 2 arguments", "got 1"]),
    ("unknown_keyword", [], "8:29", ["softmax()", "no argument 'dim'", "axis"]),
    ("keyword_given_twice", [], "8:37", ["'axis'", "twice"]),
    ("positional_after_keyword", [], "8:33", ["positional argument", "keyword argument"]),
    ("axis_not_literal", [], "8:34", ["'axis'", "integer literal"]),
    ("axis_out_of_range", [], "8:29", ["axis 1", "out of range", "[H]", "rank 1"]),
    ("keepdims_not_boolean", [], "8:38", ["keepdims", "0 or 1"]),
    ("undeclared_dim", [], "6:16", ["undeclared dim", "'N'"]),
    ("non_integer_size", [], "6:16", ["size", "positive integer", "2.5"]),
    ("zero_size", [], "6:16", ["size 0", "'W'", "positive integer"]),
    ("zero_size", ["-D", "H=3"], "6:16", ["size 0", "'W'", "H=3"]),
    ("shape_division_not_exact", ["-D", "H=5"], "6:17", ["5 / 2", "exact division", "H=5"]),
    ("no_broadcast", [], "9:25", ["[4*H]", "[H]", "do not broadcast"]),
    ("matmul_mismatch", [], "8:21", ["matmul", "inner sizes", "[H]", "[D, H]"]),
    ("matmul_rank3", [], "8:21", ["'@'", "vectors and matrices", "[D, H, H]"]),
    ("transpose_vector", [], "8:19", ["transpose", "matrix", "[H]"]),
    ("concat_mismatch", [], "9:19", ["concat", "[D]", "[D, H]"]),
    ("split_wrong_targets", [], "8:15", ["split into 4 parts", "3 names"]),
    ("split_not_divisible", ["-D", "H=5", "-D", "D=2"], "8:12",
     ["cannot split", "5", "2 equal parts", "H=5"]),
    ("split_parts_not_literal", [], "8:25", ["'parts'", "integer literal"]),
    ("split_outside_assignment", [], "8:19", ["split(...)", "several values"]),
    ("multiple_targets_without_split", [], "8:8", ["2 names", "one value", "split"]),
    ("next_wrong_shape", [], "8:14", ["'next h'", "[D]", "state 'h'", "[H]"]),
    ("param_init_not_number", [], "6:27", ["initial value", "number"]),
    ("bad_number", [], "6:27", ["initial value", "finite number", "float32"]),
    ("number_too_large", [], "8:27", ["number", "too large for float32"]),
    ("constant_overflows", [], "7:18", ["constant expression", "1e+60", "too large for float32"]),
    ("constant_not_a_number", [], "8:31", ["constant expression", "not a number"]),
    ("dropout_p_out_of_range", [], "8:38", ["'p'", "in [0, 1)", "not 1"]),
    ("dropout_p_not_literal", [], "8:38", ["'p'", "number or an expression of numbers"]),
    ("zoneout_p_dim", [], "8:42", ["'H'", "dim", "only", "shapes"]),
    ("step_declared_twice", [], "7:11", ["step index", "already declared", "'t'"]),
    ("bad_dim_binding", ["-D", "H=0"], "4:14", ["-D H=0", "positive integer"]),
    ("bad_dim_binding", ["-D", "Q=3"], "4:5", ["-D Q=3", "no dim 'Q'", "D, H"]),
    ("bad_dim_binding", ["--cell", "nope"], "3:6", ["no cell named 'nope'", "cells: ok"]),
]

IDS = [f"{name}{'[' + ' '.join(args) + ']' if args else ''}" for name, args, _, _ in TABLE]


def source_line(path: Path, line: int) -> str:
    return path.read_text().split("\n")[line - 1]


def assert_reported(stderr: str, path: str, where: str, words: list, file: Path):
    line, col = (int(n) for n in where.split(":"))
    assert "Traceback" not in stderr
    head, *rest = stderr.splitlines()
    assert head.startswith(f"{path}:{line}:{col}: error: "), stderr
    for word in words:
        assert word in head, f"{word!r} not in {head!r}"
    # the source line (a long one cut around the column, "..." where cut), then a caret under the column
    text = source_line(file, line)
    assert len(rest) >= 2, stderr
    shown, caret = rest[0][4:], rest[1][4:]
    assert caret == " " * (len(caret) - 1) + "^", stderr
    offset = col - len(caret)  # where shown[0] stands in the line
    head = 3 if offset != 0 else 0  # "..." in place of what comes before
    tail = 3 if offset + len(shown) != len(text) else 0  # and after
    assert shown[:head] + shown[len(shown) - tail:] == "..."[:head] + "..."[:tail], stderr
    assert shown[head:len(shown) - tail] == text[offset + head:offset + len(shown) - tail], stderr
    assert shown[len(caret) - 1:len(caret)] == text[col - 1:col] and len(shown) < 130, stderr  # "" past the end


def test_the_corpus_is_all_in_the_table():
    files = {p.stem for p in CORPUS.glob("*.cell")}
    assert files == {name for name, _, _, _ in TABLE}
    assert len(files) >= 28


@pytest.mark.parametrize("name,args,where,words", TABLE, ids=IDS)
def test_emit_ir_reports_the_error(name, args, where, words, capsys):
    file = CORPUS / f"{name}.cell"
    assert main(["emit", str(file), "--stage", "ir", *args]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert_reported(err, str(file), where, words, file)


@pytest.mark.parametrize("name,args,where,words",
                         [row for row in TABLE if "-D" not in row[1]],
                         ids=[i for i, row in zip(IDS, TABLE) if "-D" not in row[1]])
def test_check_reports_the_error(name, args, where, words, capsys):
    file = CORPUS / f"{name}.cell"
    assert main(["check", str(file), *args]) == 1
    out, err = capsys.readouterr()
    assert "ok" not in out
    assert_reported(err, str(file), where, words, file)


@pytest.mark.parametrize("name", ["unexpected_eof", "no_broadcast", "split_not_divisible"])
def test_a_real_process_reports_the_error(name):
    row = next(r for r in TABLE if r[0] == name)
    _, args, where, words = row
    proc = run_rnnc("emit", f"{name}.cell", "--stage", "ir", *args, cwd=CORPUS)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert_reported(proc.stderr, f"{name}.cell", where, words, CORPUS / f"{name}.cell")


def test_check_of_several_files_reports_each_and_fails(capsys):
    good = example("lstm")
    bad = CORPUS / "unknown_name.cell"
    assert main(["check", str(good), str(bad), str(CORPUS / "no_input.cell")]) == 1
    out, err = capsys.readouterr()
    assert f"{good}: ok (cell lstm)" in out
    assert f"{bad}:8:27: error: unknown name 'hh'" in err
    assert f"{CORPUS / 'no_input.cell'}:2:6: error:" in err


def test_end_of_file_is_reported_on_the_last_line_with_text(tmp_path):
    path = tmp_path / "eof.cell"
    path.write_text("cell t {\n    dim D\n    input x[D]\n    output y = x\n\n\n   \n")
    proc = run_rnnc("check", str(path))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{path}:4:17: error: unexpected end of file"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unused_value_is_a_warning_and_the_exit_status_stays_0(tmp_path, capsys):
    path = tmp_path / "unused.cell"
    path.write_text("cell t {\n"
                    "    dim D\n"
                    "    input x[D]\n"
                    "    param w[D], spare[D]\n"
                    "    a = x * w\n"
                    "    b = tanh(a)\n"
                    "    output y = a\n"
                    "}\n")
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: ok (cell t)" in out
    lines = err.splitlines()
    assert f"{path}:4:17: warning: param 'spare' is never used" in lines
    assert f"{path}:6:5: warning: value 'b' is never used" in lines
    assert "        b = tanh(a)" in lines  # the source line, then the caret
    assert lines[lines.index("        b = tanh(a)") + 1] == "        ^"
    assert "error" not in err
    # the same through a real process
    proc = run_rnnc("check", str(path))
    assert proc.returncode == 0
    assert f"{path}:6:5: warning: value 'b' is never used" in proc.stderr


def test_errors_carry_file_line_and_column():
    import rnnc
    from rnnc import driver
    file = CORPUS / "no_broadcast.cell"
    with pytest.raises(rnnc.CellError) as info:
        driver.check_source(driver.read_source(file))
    err = info.value
    assert (err.file, err.line, err.col) == (str(file), 9, 25)
    assert str(err).startswith(f"{file}:9:25: error: shapes [4*H] and [H] do not broadcast")
