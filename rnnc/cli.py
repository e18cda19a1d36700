"""The `rnnc` command line.

Exit status: 0 success, 1 a user error (printed as file:line:col: error: ...),
2 a usage error (argparse's own convention); every error is one line (or a
.cell line and its caret), never a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import driver
from .backends.args import bind_seed
from .backends.cuda import ToolchainError
from .errors import CellError
from .precision import DEFAULT as DEFAULT_PRECISION
from .precision import PRECISIONS
from .dtypes import NAMES as DTYPES


DEFAULT_T, DEFAULT_B = 5, 3  # the steps and batch of every command that takes --seq-len and --batch


def dim_binding(item: str) -> tuple:
    """One `-D NAME=VALUE`. argparse calls it, so what is not a name and a whole
    number is a usage error; the checker reports a 0 or an unknown name at the cell's dims."""
    name, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, as in -D H=256, got {item!r}")
    if not re.fullmatch(r"[0-9]+", value.strip()):
        raise argparse.ArgumentTypeError(f"{item}: a dim must be a positive integer, not {value!r}")
    return name.strip(), int(value)


def positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def seed_int(text: str) -> int:
    """A seed: an integer in 0..2^64-1."""
    try:
        return bind_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..2**64-1, got {text!r}") from None


def parse_dims(items: list) -> dict:
    """`-D H=256 -D E=64` (as dim_binding parsed them) as {"H": 256, "E": 64}."""
    return dict(items or ())


def cmd_check(args) -> int:
    failed = False
    for path in args.files:
        try:
            checked = driver.check_source(driver.read_source(Path(path)), args.cell)
        except CellError as err:
            print(err.format(), file=sys.stderr)
            failed = True
            continue
        for warning in checked.warnings:
            print(warning.format(), file=sys.stderr)
        print(f"{path}: ok (cell {checked.cell.name})")
    return 1 if failed else 0


def cmd_emit(args) -> int:
    source = driver.read_source(Path(args.file))
    print(driver.emit(source, args.stage, **compile_options(args)))
    return 0


def cmd_gradcheck(args) -> int:
    from .gradcheck import gradcheck
    prog = compile_for_cli(args)
    module = prog.load(backend="numpy", dtype="float64")

    def progress(label: str, entries: int, done: int, total: int):
        print(f"gradcheck: {label}, {entries} entries ({done + 1} of {total})", file=sys.stderr)
    print(f"gradcheck: T={args.seq_len}, B={args.batch}, float64, central differences of every entry "
          f"of every argument", file=sys.stderr)
    report = gradcheck(module, T=args.seq_len, B=args.batch, seed=args.seed, with_lengths=args.lengths,
                       progress=progress, reverse=args.reverse)
    print(report.format())
    ok = report.worst <= args.tolerance
    print(f"{'ok' if ok else 'FAILED'}: tolerance {args.tolerance:.0e}")
    return 0 if ok else 1


def cmd_run(args) -> int:
    from .gradcheck import random_arguments
    module = load_for_run(args)
    arrays = random_arguments(module, args.seq_len, args.batch, with_lengths=args.lengths)
    times = []  # (forward, backward) seconds of each run; the first is a warm-up
    for _ in range(args.repeat + 1):
        start = time.perf_counter()
        result = module.forward(**arrays, seed=args.seed, reverse=args.reverse)
        middle = time.perf_counter()
        grads = module.backward(result, {k: np.ones_like(v) for k, v in result.outputs.items()})
        times.append((middle - start, time.perf_counter() - middle))
    for group, table in (("output", result.outputs), ("state", result.states),
                         ("d param", grads.params), ("d input", grads.inputs)):
        for name, array in table.items():
            print(f"{group:>8} {name}: {list(array.shape)}")
    forward, backward = (1e3 * statistics.median(t[i] for t in times[1:]) for i in (0, 1))
    print(f"forward {forward:.2f} ms, backward {backward:.2f} ms (median of {args.repeat} runs after a "
          f"warm-up of {1e3 * times[0][0]:.2f} + {1e3 * times[0][1]:.2f} ms; "
          f"{module.backend}, {module.dtype.name}, {module.precision.name}, T={args.seq_len}, B={args.batch}"
          f"{', random lengths' if args.lengths else ''}{', reversed' if args.reverse else ''})")
    return 0


def load_for_run(args):
    """The module `rnnc run` runs: an artifact directory or a .cell file, on --backend."""
    from .artifact import load
    if Path(args.file).is_dir():
        if args.D:
            raise ValueError(f"-D: {args.file} is a compiled artifact; its dims are fixed")
        return load(args.file, backend=args.backend, dtype=args.dtype, precision=args.precision)
    return compile_for_cli(args).load(backend=args.backend, dtype=args.dtype, precision=args.precision)


def cmd_compile(args) -> int:
    from .artifact import write
    program = compile_for_cli(args)
    module = write(program, args.output)
    for note in module["notes"]:
        print(f"rnnc: warning: {note}", file=sys.stderr)
    built = [n for n in module["files"] if n.endswith(".cubin")]
    print(f"{args.output}: cell {module['cell']}, {len(module['kernels'])} kernels, "
          f"{', '.join(built) or 'no cubin'} (recompute={module['plan']['policy']}, "
          f"precision={module['precision']})")
    return 0


def compile_options(args) -> dict:
    """The compile options (rnnc/driver.py's Options) a command was given: FILE's
    -D and --cell, and the ones its parser declares (`options`). A
    --memory-budget string ("64MiB") is parsed by the planner, as the API's is."""
    return {**{name: getattr(args, name) for name in args.options},
            "dims": parse_dims(args.D), "cell": args.cell}


def compile_for_cli(args):
    """The Program of the command's options; warnings to stderr."""
    program = driver.compile(Path(args.file), **compile_options(args))
    for warning in program.warnings:
        print(warning.format(), file=sys.stderr)
    return program


def cmd_plan(args) -> int:
    from .passes.plan import format_table, make_plan
    program = compile_for_cli(args)
    beside = {p: make_plan(program.hoisted, program.grads, p) for p in ("none", "all")}
    print(format_table(program.plan, program.hoisted.step, args.seq_len, args.batch, args.dtype, beside))
    print(driver.cuda_forms(program))
    return 0


def cmd_graph(args) -> int:
    from .dot import to_dot, write_graph
    program = compile_for_cli(args)
    text = to_dot(program.hoisted.step, program.plan, f"cell {program.cell.name}, one step")
    for path in write_graph(text, Path(args.output)):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="rnnc", description="A compiler for recurrent cells.")
    p.add_argument("--version", action="version", version=f"rnnc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text, options=("recompute",)):
        """A subcommand; `options` are the compile options (rnnc/driver.py) it takes."""
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.set_defaults(func=func, options=options)
        if "recompute" in options:
            c.add_argument("--recompute", default="auto", help="none, all, auto or value names (a,b)")
        if "memory_budget" in options:
            c.add_argument("--memory-budget", metavar="BYTES",
                           help="checkpoint states to fit forward+backward (of --dtype) in BYTES for "
                                "--seq-len steps of --batch, e.g. 64MiB")
            with_sizes(c, "of a call: of the budget and the schedule")
            c.add_argument("--dtype", default="float32", choices=DTYPES,
                           help="the dtype bytes are counted in and the CUDA kernels' arrays hold "
                                "(default float32; bfloat16 and float16 keep states and sums in float32)")
        if "precision" in options:
            with_precision(c, DEFAULT_PRECISION)
        return c

    def with_cell(c, metavar="FILE", help_text=".cell file"):
        c.add_argument("file", metavar=metavar, help=help_text)
        c.add_argument("-D", action="append", type=dim_binding, metavar="NAME=VALUE",
                       help="bind a dim, e.g. -D H=256")
        c.add_argument("--cell", help="which cell of the file (default: the first)")
        return c

    def with_sizes(c, what: str):
        c.add_argument("--seq-len", type=positive_int, default=DEFAULT_T, metavar="T",
                       help=f"steps {what} (default {DEFAULT_T})")
        c.add_argument("--batch", type=positive_int, default=DEFAULT_B, metavar="B",
                       help=f"batch size {what} (default {DEFAULT_B})")

    def with_seed(c, what: str, default):
        c.add_argument("--seed", type=seed_int, default=default, metavar="N", help=what)

    def with_precision(c, default_help):
        c.add_argument("--precision", choices=tuple(PRECISIONS), help="of products: fp32 (exact) or tf32 "
                                                                      f"(tensor cores); default: {default_help}")

    def with_time(c):
        c.add_argument("--lengths", action="store_true", help="random sequence lengths")
        c.add_argument("--reverse", action="store_true",
                       help="run each sequence from its last valid step to its first")

    plan_options = ("recompute", "memory_budget", "seq_len", "batch", "dtype")
    c = command("check", cmd_check, "parse and check .cell files", options=())
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--cell", help="which cell of each file (default: the first)")

    c = with_cell(command("emit", cmd_emit, "print one stage of the pipeline, made with the "
                                            "options `compile` takes", plan_options + ("precision",)))
    c.add_argument("--stage", required=True, choices=driver.PRINTABLE)

    c = with_cell(command("gradcheck", cmd_gradcheck,
                          "check gradients against float64 finite differences (numpy backend)"))
    with_sizes(c, "of the random data")
    with_seed(c, "of the random data and of dropout's and zoneout's masks (default 0)", 0)
    with_time(c)
    c.add_argument("--tolerance", type=float, default=1e-6, help="worst relative error allowed (default 1e-6)")

    c = with_cell(command("run", cmd_run, "forward and backward on random data, with timing"), "DIR|FILE",
                  "an artifact directory (rnnc compile -o) or a .cell file")
    with_sizes(c, "of the random data")
    with_seed(c, "of dropout's and zoneout's masks (default: a fresh one each run)", None)
    with_time(c)
    c.add_argument("--repeat", type=positive_int, default=5, metavar="N",
                   help="timed runs after a warm-up; their median is shown (default 5)")
    c.add_argument("--backend", default="numpy", choices=("numpy", "cuda"))
    c.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: an artifact's bfloat16 or float16, else float64 on numpy, float32 on cuda")
    with_precision(c, f"an artifact's, else {DEFAULT_PRECISION}")

    c = with_cell(command("compile", cmd_compile, "compile a cell into an artifact directory",
                          plan_options + ("precision", "arch")))
    c.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="the artifact directory (made, or replaced if it holds an artifact)")
    c.add_argument("--target", default="cuda", choices=("cuda",))
    c.add_argument("--arch", help="GPU architecture of the cubin, e.g. sm_90 (default: the local "
                                  "GPU's, else sm_80)")

    with_cell(command("plan", cmd_plan, "show what the backward stores and recomputes, and "
                                        "the bytes and flops that costs", plan_options))

    c = with_cell(command("graph", cmd_graph, "draw the step graph, stored and recomputed values "
                                              "marked (DOT; SVG or PNG with Graphviz)"))
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="cell.dot, cell.svg or cell.png")
    return p


def print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"rnnc: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # rnnc's own warnings as one line each (the cache's)
            warnings.showwarning = print_warning
            return args.func(args)
    except CellError as err:
        print(err.format(), file=sys.stderr)
        return 1
    # a bad argument, already worded for the user; or nvcc, PyCUDA, the
    # driver or a GPU is missing, and the message says what to install
    except (ValueError, ToolchainError) as err:
        print(f"rnnc: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (rnnc plan ... | head -1): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 128 + signal.SIGPIPE
    except OSError as err:  # a file that cannot be written or read
        print(f"rnnc: error: {err.filename + ': ' if err.filename else ''}{err.strerror or err}",
              file=sys.stderr)
        return 1
    except MemoryError as err:
        print(f"rnnc: error: out of memory ({err}); use smaller dims, --seq-len or --batch", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
