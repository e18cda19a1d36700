"""Plant mistakes in the CUDA lowering, one at a time, and show that each fails a test.

    python tests/mutations.py            # every mistake below, a table of what caught it
    python tests/mutations.py -k softmax # the mistakes whose description has "softmax"

Each mistake is a text replacement in one file of the repository (an op's C
expression or index arithmetic in rnnc/ops/, a template, a kernel builder).
It is made in a copy of the working tree (rnnc importable from there, its
templates beside it), and the emulated op tier (tests/test_ops_emulated.py:
every op in every form against the NumPy reference) runs on the copy until
its first failure. A mistake no test catches is a hole in the tests: the
script exits with status 1. tests/test_mutations.py checks that every
mistake still finds the text it replaces.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_ops_emulated.py"]
# the data packages setuptools maps into rnnc (pyproject.toml), placed so the copy imports its own
DATA = {"templates": "rnnc/templates", "grammar": "rnnc/grammar", "examples": "rnnc/examples"}


@dataclass(frozen=True)
class Mutation:
    what: str  # the mistake
    path: str  # the file it is planted in
    old: str  # the text it replaces, `count` times
    new: str
    count: int = 1


MUTATIONS = [
    Mutation("min as fmaxf", "rnnc/ops/elementwise.py", '"fminf({0}, {1})"', '"fmaxf({0}, {1})"'),
    Mutation("log as log2f", "rnnc/ops/elementwise.py", '"logf({0})"', '"log2f({0})"'),
    Mutation("abs as the identity", "rnnc/ops/elementwise.py", '"fabsf({0})"', '"({0})"'),
    Mutation("softplus as relu", "rnnc/ops/elementwise.py", '"(fmaxf({0}, 0.0f) + log1pf(expf(-fabsf({0}))))"',
             '"fmaxf({0}, 0.0f)"'),
    Mutation("sigmoid of -x", "rnnc/ops/elementwise.py", '"(1.0f / (1.0f + expf(-{0})))"',
             '"(1.0f / (1.0f + expf({0})))"'),
    Mutation("division the other way round", "rnnc/ops/elementwise.py", '"({0} / {1})"', '"({1} / {0})"'),
    Mutation("a tie counted as won (>= in gt)", "rnnc/ops/elementwise.py", '"(({0} > {1}) ? 1.0f : 0.0f)"',
             '"(({0} >= {1}) ? 1.0f : 0.0f)"'),
    Mutation("transpose as the identity", "rnnc/ops/structure.py",
             "return (yield n.args[0], row, tuple(reversed(index)))", "return (yield n.args[0], row, tuple(index))"),
    Mutation("every slice from offset 0", "rnnc/ops/structure.py",
             "{index[axis]} + {n.attr('start').value}", "{index[axis]} + 0"),
    Mutation("concat switching one element late", "rnnc/ops/structure.py",
             'f"({index[axis]} < {stop}) ? {value} : {expr}"', 'f"({index[axis]} <= {stop}) ? {value} : {expr}"'),
    Mutation("pad keeping one element too many", "rnnc/ops/structure.py",
             '"({j} >= 0 && {j} < {size}) ? {inner} : 0.0f"', '"({j} >= 0 && {j} <= {size}) ? {inner} : 0.0f"'),
    Mutation("sum and mean over the next axis", "rnnc/ops/reductions.py",
             '{"axes": (n.attr("axis") % len(x.shape),)', '{"axes": ((n.attr("axis") + 1) % len(x.shape),)'),
    Mutation("a shared gradient not summed over the batch", "rnnc/ops/reductions.py",
             '"rows": x.batched and not n.batched', '"rows": False'),
    Mutation("softmax over the next axis", "rnnc/ops/reductions.py",
             'lambda n, x: {"axis": n.attr("axis") % len(x.shape)}',
             'lambda n, x: {"axis": (n.attr("axis") + 1) % len(x.shape)}'),
    Mutation("softmax without the max shift", "templates/softmax.cu.j2", " - max_)", ")", count=2),
    Mutation("mean not divided by its count", "rnnc/backends/cuda/kernels.py",
             'scale = f" * {c_float(1.0 / count)}" if mean else ""', 'scale = ""'),
    Mutation("broadcasting reading a unit axis at the index", "rnnc/backends/cuda/elementwise.py",
             '"0" if a == 1 and out_shape[lead + k] != 1 else index[lead + k]', "index[lead + k]"),
    Mutation("products keeping the last k only (= for +=)", "rnnc/backends/cuda/products.py",
             'f"acc[{i * self.tn + j}] += {av} * {bv};"', 'f"acc[{i * self.tn + j}] = {av} * {bv};"'),
    Mutation("tensor-core fragments reading k 0-3 twice", "rnnc/backends/cuda/products.py",
             "'k': f'kk + quad + {4 * half}'", "'k': f'kk + quad'"),
    Mutation("Philox without its key schedule", "templates/intrinsics.cu", "if (round > 0) {", "if (round < 0) {"),
    Mutation("a counter word not offset by 1 (example 0 as a shared draw)", "rnnc/ops/random.py",
             'f"(unsigned){(yield name, row, ())} + 1u"', 'f"(unsigned){(yield name, row, ())}"'),
    Mutation("dropout not scaling what it keeps", "rnnc/ops/random.py",
             "0.0f : {x} * {c_float(1 / (1 - p))}", "0.0f : {x}"),
    Mutation("zoneout taking new where it keeps old", "rnnc/ops/random.py",
             "? {old} : {new}) : {expected}", "? {new} : {old}) : {expected}"),
]


def planted(mutation: Mutation, root: Path = ROOT) -> str:
    """The text of the mutation's file with the mistake in it (ValueError when
    the file no longer holds the text it replaces `count` times)."""
    text = (root / mutation.path).read_text()
    found = text.count(mutation.old)
    if found != mutation.count:
        raise ValueError(f"{mutation.path}: {mutation.old!r} occurs {found} times, not {mutation.count} "
                         f"({mutation.what}): update tests/mutations.py")
    return text.replace(mutation.old, mutation.new)


def copy_tree(dest: Path):
    """The working tree (tracked files and untracked ones git does not ignore) in
    `dest`, with the data packages where an import of rnnc from `dest` finds them."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for source, package in DATA.items():
        os.symlink(dest / source, dest / package)


def environment(copy: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(copy))
    where = subprocess.run([sys.executable, "-c", "import rnnc, rnnc.templates; "
                            "print(rnnc.__file__); print(*rnnc.templates.__path__)"],
                           cwd=copy, env=env, check=True, capture_output=True, text=True).stdout.split()
    if not all(Path(w).resolve().is_relative_to(copy.resolve()) for w in where):
        raise RuntimeError(f"the copy's rnnc is not the one imported: {where}")
    return env


def run(mutation: Mutation, copy: Path, env: dict) -> tuple:
    """(the first failing test or None, seconds) with the mistake planted in `copy`."""
    original = (copy / mutation.path).read_text()
    (copy / mutation.path).write_text(planted(mutation, copy))
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                              cwd=copy, env=env, capture_output=True, text=True)
    finally:
        (copy / mutation.path).write_text(original)
    failed = [line.split(" ", 2)[1] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if done.returncode not in (0, 1):
        failed = failed or [f"pytest exit status {done.returncode}"]
    return (failed[0] if failed else None), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only the mistakes whose description contains this")
    chosen = [m for m in MUTATIONS if parser.parse_args(argv).k in m.what]
    for m in chosen:
        planted(m)  # every one applies before any runs
    survived = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        env = environment(copy)
        print(f"{'mistake':48} {'file':36} {'caught by':60} seconds")
        for m in chosen:
            caught, seconds = run(m, copy, env)
            survived += caught is None
            print(f"{m.what:48} {m.path:36} {caught or 'NOTHING: no test fails':60} {seconds:.0f}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mistakes caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
