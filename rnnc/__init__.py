"""rnnc: a compiler for recurrent cells.

Write one time step in a `.cell` file; get the whole sequence, forward and
backward through time, on NumPy (the reference) or as fused CUDA kernels.

    prog = rnnc.compile("examples/lstm.cell", dims={"D": 32, "H": 64})
    mod = prog.load(backend="numpy")
    mod = rnnc.load("/tmp/lstm_mod", backend="cuda")   # an artifact of `rnnc compile -o`
"""
from .artifact import load
from .driver import Program, compile
from .errors import CellError, CellWarning

__version__ = "0.1.0"
__all__ = ["CellError", "CellWarning", "Program", "compile", "load", "__version__"]
