"""PyTorch stays optional: only rnnc/torch.py imports it, and without torch it says what to install.

These tests need no torch (they simulate its absence), so they run everywhere.
"""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rnnc"


def imported_modules(path: Path) -> set:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_rnnc_torch_imports_torch():
    offenders = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
                 if p.name != "torch.py" and "torch" in imported_modules(p)]
    assert offenders == [], f"torch must stay optional, but these import it: {offenders}"


def test_rnnc_runs_without_torch():
    """Compile and run a cell in a fresh interpreter where `import torch` fails."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, rnnc\n"
        f"mod = rnnc.compile({str(PACKAGE.parent / 'examples' / 'gru.cell')!r}, "
        "dims={'D': 2, 'H': 3}).load()\n"
        "res = mod.forward(inputs={'x': np.ones((2, 1, 2))}, params=mod.init_params())\n"
        "print(res.outputs['y'].shape)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 1, 3)"


def test_rnnc_torch_without_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "rnnc.torch", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'rnnc\[torch\]'"):
        importlib.import_module("rnnc.torch")
