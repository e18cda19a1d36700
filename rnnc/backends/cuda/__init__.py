"""The CUDA backend: codegen (IR + Plan -> CUDA C), build (nvcc -> cubin), runtime (PyCUDA)."""
