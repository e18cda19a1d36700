"""The CUDA backend: codegen (IR + Plan -> CUDA C), build (nvcc -> cubin), runtime (PyCUDA)."""


class ToolchainError(RuntimeError):
    """nvcc, PyCUDA, the NVIDIA driver or a GPU is missing or failed; the message says what to do."""
