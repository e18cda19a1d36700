"""The backends: `numpy` (the reference interpreter) and `cuda` (generated
kernels), and `args`, the checks of a caller's arrays that both share."""
