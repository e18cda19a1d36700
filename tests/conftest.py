"""What many test files share: the example cells, compiling one with its dims
bound to small sizes, the `rnnc` command in a fresh process, and a scratch
directory per test module.

Test files import the helpers (`from conftest import EXAMPLES, example`);
pytest hands out the fixtures by name.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import rnnc
from rnnc.driver import check_source, read_source

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.cell"))


def example(name: str) -> Path:
    """The example cell `examples/<name>.cell`."""
    return ROOT / "examples" / f"{name}.cell"


def declared_dims(path: Path, sizes: dict) -> dict:
    """The sizes of the dims the cell in `path` declares, taken from `sizes`."""
    return {name: sizes[name] for name, _ in check_source(read_source(path)).cell.dims}


def compile_sized(path: Path, sizes: dict, **options):
    """`rnnc.compile` of `path`, its dims bound from `sizes`."""
    return rnnc.compile(path, dims=declared_dims(path, sizes), **options)


def run_rnnc(*args, cwd=ROOT):
    """The `rnnc` command in a fresh process, as a user runs it (this checkout's rnnc first)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rnnc.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    """A directory the tests of one module share, so what one builds (a compiled
    emulation, say) the others reuse."""
    return tmp_path_factory.mktemp(request.module.__name__)
