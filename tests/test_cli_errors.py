"""Every mistake a user can make on the command line is one clear line on
stderr (or a .cell line and its caret) and exit status 1, never a traceback."""
from __future__ import annotations

import json
import os
import stat

import pytest

import rnnc
from conftest import example
from rnnc.artifact import write
from rnnc.cli import main

LSTM = str(example("lstm"))
SMALL = ["-D", "D=3", "-D", "H=4"]


def one_line_error(capsys, argv, *words) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("argv,words", [
    (["graph", LSTM, *SMALL, "-o", "/nonexistent/x.dot"], ["/nonexistent/x.dot: No such file or directory"]),
    (["plan", LSTM, *SMALL, "--memory-budget", "inf"], ["memory_budget: 'inf'"]),
    (["plan", LSTM, *SMALL, "--memory-budget", "1e400"], ["memory_budget: '1e400'"]),
    # 10**15 * 4 float64s: more than any address space, so refused at once, never paged in
    (["run", LSTM, "-D", "D=3", "-D", f"H={10 ** 15}"], ["out of memory", "use smaller dims"]),
    (["check", "/dev/zero"], ["cannot read /dev/zero: more than 1 MiB"]),
    (["check", "missing{.cell"], ["cannot read missing{.cell: No such file or directory"]),
    (["compile", LSTM, *SMALL, "--arch", "sm_\u0668\u0660", "-o", "unused"], ["arch: expected a name like sm_80"]),
], ids=["graph-o", "budget-inf", "budget-1e400", "huge-dims", "dev-zero", "brace-name", "arch-digits"])
def test_one_line_errors(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, argv, *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["no plan", "no dims", "files a list", "deep", "launches"])
def test_damaged_artifacts_on_the_command_line(tmp_path, capsys, damage):
    out = tmp_path / "mod"
    write(rnnc.compile(LSTM, dims={"D": 3, "H": 4}), out, build=False)
    module = json.loads((out / "module.json").read_text())
    if damage == "deep":
        text = "[" * 100_000 + "]" * 100_000
    else:
        if damage == "launches":  # what --backend cuda would have run
            module["launches"]["step"][0]["grid"][0]["div"] = 7
        else:
            field, value = {"no plan": ("plan", None), "no dims": ("dims", None), "files a list": ("files", [])}[damage]
            module.pop(field) if value is None else module.__setitem__(field, value)
        text = json.dumps(module)
    (out / "module.json").write_text(text)
    for backend in ("numpy", "cuda"):
        one_line_error(capsys, ["run", str(out), "--backend", backend], f"{out / 'module.json'}: damaged")


def test_a_byte_order_mark_is_accepted(tmp_path, capsys):
    path = tmp_path / "bom.cell"
    path.write_bytes(b"\xef\xbb\xbf" + example("indrnn").read_bytes())
    assert main(["check", str(path)]) == 0
    assert "ok (cell indrnn)" in capsys.readouterr().out
    path.write_bytes(b"\xef\xbb\xbfcell bom {\n    dim H\n}\n")  # no input: reported at the name
    err, text, caret, column = one_line_error_with_caret(capsys, ["check", str(path)])
    assert column == 6 and text[len(caret) - 1:].startswith("bom")  # columns count after the mark


def one_line_error_with_caret(capsys, argv) -> tuple:
    """(stderr, the source line shown, the caret line, the column reported)."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    head, text, caret = err.rstrip("\n").split("\n")
    column = int(head.split(":")[2])
    assert caret.strip() == "^"
    return err, text, caret, column


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_an_error_on_a_long_line_shows_the_place_not_the_line(tmp_path, capsys, where):
    pad = " " * 200_000
    expr = {"start": f"$ + x{pad}", "middle": f"x{pad}$ + x{pad}", "end": f"x{pad}$"}[where]
    path = tmp_path / "long.cell"
    path.write_text(f"cell long {{\n    dim H\n    input x[H]\n    state h[H]\n    a = {expr}\n"
                    "    next h = a\n    output y = a\n}\n")
    err, text, caret, column = one_line_error_with_caret(capsys, ["check", str(path)])
    assert len(err) < 400
    assert column == 9 + {"start": 0, "middle": 200_001, "end": 200_001}[where]  # '$' is there
    assert text[len(caret) - 1] == "$"  # the caret stands under it in what is shown
    assert text.startswith("    ...") == (where != "start") and text.endswith("...") == (where != "end")


def test_a_graphviz_output_named_like_an_option_stays_a_file(tmp_path, monkeypatch, capsys):
    """A stand-in `dot` records its arguments: every path reaches it absolute,
    so none of them can be read as an option."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$(dirname \"$0\")/args\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    assert main(["graph", LSTM, *SMALL, "-o", "./-Tx.svg"]) == 0
    args = (bin_dir / "args").read_text().split("\n")[:-1]
    assert args == ["-Tsvg", str(tmp_path / "-Tx.dot"), "-o", str(tmp_path / "-Tx.svg")]
    assert (tmp_path / "-Tx.dot").read_text().startswith("digraph")
