"""The step graph in Graphviz DOT, with the plan's choices marked.

`rnnc graph FILE -o cell.dot|cell.svg|cell.png` writes the DOT text and, for
SVG or PNG, renders it with Graphviz's `dot` program where it is installed.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from .ir import Graph
from .passes.plan import Plan
from .shapes import shape_str

# fill colours: what the backward gets from the forward, and how
STYLE = {
    "input": 'shape=box, style=filled, fillcolor="#e8e8e8"',  # states, hoisted values, params
    "stored": 'style=filled, fillcolor="#9ecae1"',  # kept for every step
    "recomputed": 'style="filled,dashed", fillcolor="#fdd0a2"',  # rerun by the backward step
    "other": "",  # neither read by the backward nor needed to rebuild what is
}


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(step: Graph, plan: Plan, title: str) -> str:
    stored, rerun = set(plan.stored), {n.out for n in plan.recompute}
    lines = [f"digraph {quote(title)} {{", "  rankdir=TB;", "  node [fontname=Helvetica];",
             f"  label={quote(f'{title} (recompute={plan.policy}): blue stored, orange dashed recomputed')};"]
    for v in step.inputs:
        kind = "stored" if v.name in stored else "input"
        lines.append(f"  {quote(v.name)} [{STYLE[kind]}, shape=box];")
    for n in step.nodes:
        kind = "stored" if n.out in stored else "recomputed" if n.out in rerun else "other"
        label = f"{n.out} = {n.op} {shape_str(n.shape)}"
        lines.append(f"  {quote(n.out)} [label={quote(label)}, {STYLE[kind]}];")
        lines += [f"  {quote(a)} -> {quote(n.out)};" for a in n.args]
    for out in dict.fromkeys(step.outputs):
        lines.append(f"  {quote('out ' + out)} [shape=plaintext, label={quote('-> ' + out)}];")
        lines.append(f"  {quote(out)} -> {quote('out ' + out)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(text: str, output: Path) -> list:
    """Write `output` (.dot, .svg or .png); returns the paths written. For SVG and
    PNG the DOT text is written beside it, then rendered by Graphviz."""
    fmt = output.suffix.lstrip(".").lower()
    if fmt not in ("dot", "gv", "svg", "png"):
        raise ValueError(f"-o {output}: expected a .dot, .svg or .png file")
    dot_path = output if fmt in ("dot", "gv") else output.with_suffix(".dot")
    dot_path.write_text(text)
    if dot_path == output:
        return [dot_path]
    # absolute paths: a name starting with '-' would be read as an option
    command = ["dot", f"-T{fmt}", str(dot_path.absolute()), "-o", str(output.absolute())]
    program = shutil.which("dot")
    if program is None:
        raise ValueError(f"wrote {dot_path}, but rendering {fmt.upper()} needs Graphviz's `dot`, "
                         f"which is not installed (apt-get install graphviz, brew install graphviz, "
                         f"or conda install graphviz); or render it with: {shlex.join(command)}")
    done = subprocess.run([program, *command[1:]], capture_output=True, text=True)
    if done.returncode:
        raise ValueError(f"dot -T{fmt} {dot_path} failed: {done.stderr.strip()}")
    return [dot_path, output]
