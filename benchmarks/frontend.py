"""How long parsing and checking the shipped example cells takes.

    python benchmarks/frontend.py [--repeats 20]

Prints the first pass over examples/*.cell (which also builds the LALR
parser) and the median of the passes after it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rnnc.driver import check_source, read_source

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.cell"))


def one_pass() -> float:
    start = time.perf_counter()
    for path in EXAMPLES:
        check_source(read_source(path))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    first = one_pass()
    median = statistics.median(one_pass() for _ in range(args.repeats))
    print(f"parse + check of {len(EXAMPLES)} examples: first pass {1e3 * first:.1f} ms "
          f"(builds the parser), then median {1e3 * median:.1f} ms over {args.repeats} passes")


if __name__ == "__main__":
    main()
