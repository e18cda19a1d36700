"""Every Python snippet of the README runs as written, each on its own, from the repository root."""
import re

import pytest

from conftest import ROOT

SNIPPETS = [(text[:m.start()].count("\n") + 2, m.group(1)) for text in [(ROOT / "README.md").read_text()]
            for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S)]


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("line, code", SNIPPETS, ids=[f"line{line}" for line, _ in SNIPPETS])
def test_snippet_runs(line, code, monkeypatch):
    if "import torch" in code:
        pytest.importorskip("torch", reason="a PyTorch snippet; torch is an optional dependency")
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
