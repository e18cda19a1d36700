"""The CUDA backend, in the order a program goes through it:

- `lowering.py`: the program (IR + Plan) as CUDA C and the kernel launches of
  each kind of event of the schedule, every value in a buffer of a role;
  `region.py` lowers one region's nodes into kernels, `elementwise.py` the
  fused loops of a phase, `kernels.py` builds each kernel from its template
  (`templates/*.cu.j2`), `products.py` decides the tiles, shared memory and
  inner loop of products (CUDA cores or tensor cores), `cexpr.py` spells
  names, literals and indices in C; `templates/intrinsics.cu` holds the PTX
  instructions the kernels use (and the grid barrier of persistent kernels).
- `launches.py`: the launches and buffers, plain data shared by the runtime
  and the artifact.
- `build.py`: nvcc turns the source into a cubin, cached on disk.
- `runtime.py`: `CudaModule`, the NumPy module's API, interpreting the Plan's
  schedule (rnnc/passes/schedule.py) event by event, its launches run by
  `executor.py` on a device (`device.py`: PyCUDA); a persistent kernel's
  grid is what the GPU holds at once (`occupancy.py`).
"""


class ToolchainError(RuntimeError):
    """nvcc, PyCUDA, the NVIDIA driver or a GPU is missing or failed; the message says what to do."""
