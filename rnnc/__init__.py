"""rnnc: a compiler for recurrent cells.

Write one time step in a `.cell` file; get the whole sequence, forward and
backward through time, on NumPy (the reference) or as fused CUDA kernels.
"""
from .errors import CellError, CellWarning

__version__ = "0.1.0"
__all__ = ["CellError", "CellWarning", "__version__"]
