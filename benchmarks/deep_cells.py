"""How the pipeline's time grows with the size of one expression or statement list.

    python benchmarks/deep_cells.py [--size 2000] [--stages check,plan,numpy]

Each cell family is built at n and 2n terms (a sum, a chain of statements
whose values the backward reads, unused values, 1/4 as deep nestings of
unary minus, calls and parentheses); for each stage the script prints the
seconds at both sizes and their ratio: about 2 where the stage is linear, 4
where it is quadratic. A stage that fails prints the exception's name.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from rnnc.driver import check_source, differentiate
from rnnc.errors import Source
from rnnc.passes.hoist import hoist
from rnnc.passes.plan import make_plan


def cell(body: str) -> str:
    return ("cell deep {\n    dim H\n    input x[H]\n    state h[H]\n    param W[H, H]\n"
            f"    a = x @ W\n{body}\n    next h = tanh(r)\n    output y = tanh(r)\n}}\n")


FAMILIES = {
    # name: (terms at size n, the cell of that many terms)
    "sum": (lambda n: n, lambda n: cell("    r = " + " + ".join(["tanh(h + a)"] * n))),
    "chain": (lambda n: n, lambda n: cell("    r0 = h\n" + "".join(
        f"    r{i + 1} = tanh(r{i}) * a + h\n" for i in range(n)) + f"    r = r{n}")),
    "unused": (lambda n: 8 * n, lambda n: cell("".join(f"    u{i} = h * 2\n" for i in range(n)) + "    r = h * a")),
    "minus": (lambda n: n // 4, lambda n: cell("    r = " + "-" * n + "h * a")),
    "calls": (lambda n: n // 4, lambda n: cell("    r = " + "tanh(" * n + "h * a" + ")" * n)),
    "parens": (lambda n: n // 4, lambda n: cell("    r = " + "(h + " * n + "a" + ")" * n)),
}


def run_stage(stage: str, text: str) -> float:
    """Seconds of one stage on `text` (the stages before it are not counted)."""
    start = time.perf_counter()
    checked = check_source(Source("deep.cell", text), dims={"H": 4})
    if stage == "check":
        return time.perf_counter() - start
    hoisted = hoist(checked.cell)
    grads = differentiate(hoisted)
    start = time.perf_counter()
    plan = make_plan(hoisted, grads, "auto")
    if stage == "plan":
        return time.perf_counter() - start
    from rnnc.driver import Program
    module = Program(Source("deep.cell", text), checked.cell, checked.warnings, hoisted, grads,
                     plan).load("numpy")
    rng = np.random.default_rng(0)
    args = dict(inputs={"x": rng.normal(size=(3, 2, 4))}, params=module.init_params(0),
                states={"h": rng.normal(size=(2, 4)) * 0.1})
    start = time.perf_counter()
    result = module.forward(**args)
    module.backward(result, {"y": np.ones((3, 2, 4))})
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="n (the cells are built at n and 2n)")
    parser.add_argument("--stages", default="check,plan,numpy")
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    print(f"{'cell':<8} {'terms':>12} {'stage':<6} {'seconds':>17} {'ratio':>6}")
    for name in args.families.split(","):
        terms, text = FAMILIES[name]
        for stage in args.stages.split(","):
            times = []
            for n in (args.size, 2 * args.size):
                try:
                    times.append(run_stage(stage, text(terms(n))))
                except (Exception, RecursionError) as err:  # noqa: BLE001  (reported, not raised)
                    times.append(type(err).__name__)
            shown = " ".join(f"{t:8.2f}" if isinstance(t, float) else f"{t[:8]:>8}" for t in times)
            ratio = times[1] / times[0] if all(isinstance(t, float) for t in times) else float("nan")
            print(f"{name:<8} {terms(args.size):>5}/{terms(2 * args.size):<6} {stage:<6} {shown} {ratio:6.2f}")


if __name__ == "__main__":
    main()
