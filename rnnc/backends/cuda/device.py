"""The real device: PyCUDA's driver, a GPU's context and the cubin's kernels,
behind the few methods `executor.Executor` and `runtime.CudaModule` call
(alloc, copies, memset0, launch, active)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from . import ToolchainError
from .occupancy import Limits, co_resident


class CudaUnavailable(ToolchainError):
    """PyCUDA, the driver or a GPU is missing; the message says which and what to do."""


class PycudaDevice:
    """The real device: a PyCUDA context and the cubin's functions.

    `ordinal=None` runs in the PyCUDA context active on this thread (pycuda.autoinit's,
    say), else in pycuda.autoprimaryctx's: a GPU's primary context (GPU 0's unless
    CUDA_DEVICE says otherwise), left active on this thread (so the caller can make and
    read GPUArrays) until PyCUDA pops it at exit. An ordinal picks that GPU's primary
    context, the one the CUDA runtime and PyTorch use, and leaves no context active.

    PyCUDA keeps a context stack per thread, so every call pushes the context and pops
    it after (`active`): the module works from any thread, such as torch's autograd
    threads. `empty(shape)` makes float32 device arrays (results, and the pools behind
    them): PyCUDA GPUArrays unless given. PyCUDA frees its device memory only where its
    context is active or on the thread that made the context (elsewhere it leaks it,
    with a warning), so rnnc.torch passes torch.empty.
    """

    def __init__(self, ordinal: int | None = None, empty=None):
        drv = import_pycuda()
        try:
            drv.init()
            count = drv.Device.count()
            if count == 0:
                raise CudaUnavailable("backend='cuda': the CUDA driver sees no GPU; run on a machine "
                                      "with an NVIDIA GPU or use backend='numpy'")
            if ordinal is None and drv.Context.get_current() is None:
                import pycuda.autoprimaryctx  # noqa: F401  (its first import pushes the context)
            current = drv.Context.get_current() if ordinal is None else None
            if current is not None:
                self.context, self.gpu = current, drv.Context.get_device()
            else:
                if not 0 <= (ordinal or 0) < count:
                    raise CudaUnavailable(f"backend='cuda': there is no GPU {ordinal}; the CUDA driver "
                                          f"sees {count} (0 to {count - 1})")
                self.gpu = drv.Device(ordinal or 0)
                self.context = self.gpu.retain_primary_context()
        except drv.Error as err:
            raise CudaUnavailable(f"backend='cuda': the CUDA driver failed ({err}); install the NVIDIA "
                                  "driver or use backend='numpy'") from None
        self.drv = drv
        self.empty = empty or self._gpuarray
        self.functions = {}

    @contextmanager
    def active(self):
        self.context.push()
        try:
            yield
        finally:
            self.drv.Context.pop()

    @property
    def arch(self) -> str:
        major, minor = self.gpu.compute_capability()
        return f"sm_{major}{minor}"

    def load_module(self, cubin_path, arities: dict):
        """The cubin's kernels, each prepared for (rows, buffers...)."""
        with self.active():
            try:
                self.module = self.drv.module_from_file(str(cubin_path))
            except self.drv.Error as err:  # PyCUDA's errors are not RuntimeErrors: say what this one means
                raise CudaUnavailable(f"backend='cuda': this GPU ({self.arch}) cannot load {cubin_path} "
                                      f"({err}); rebuild it for {self.arch}") from None
            for name, n in arities.items():
                f = self.module.get_function(name)
                f.prepare("i" + "P" * n)
                self.functions[name] = f

    @staticmethod
    def _gpuarray(shape):
        from pycuda import gpuarray
        return gpuarray.empty(shape, np.float32)

    def alloc(self, nbytes: int):
        pool = self.empty((max(-(-nbytes // 4), 1),))
        return int(pool.__cuda_array_interface__["data"][0]), pool

    # the driver's copies and memsets run in order with the launches (all on stream 0);
    # empty arrays may have a null pointer, which the driver need not accept
    def htod(self, ptr: int, array: np.ndarray):
        if array.nbytes:
            self.drv.memcpy_htod(ptr, array)

    def dtoh(self, out: np.ndarray, ptr: int):
        if out.nbytes:
            self.drv.memcpy_dtoh(out, ptr)

    def dtod(self, dst: int, src: int, nbytes: int):
        if nbytes:
            self.drv.memcpy_dtod(dst, src, nbytes)

    def memset0(self, ptr: int, nbytes: int):
        if nbytes:
            self.drv.memset_d8(ptr, 0, nbytes)

    def launch(self, kernel, grid, block, args: bytes, shared: int = 0):
        """`args`: the kernel's parameter struct, packed (executor.packed);
        `shared`: its bytes of dynamic shared memory. PyCUDA's `prepared_call`
        packs its arguments with `struct` on every call, then hands them to
        `_launch_kernel`; the runtime packs them once per event, so this calls
        `_launch_kernel` itself (the same in every PyCUDA since 2011). More
        than 48 KB of shared memory a block is the kernel's to opt into."""
        function = self.functions[kernel]
        if shared:
            function.set_attribute(self.drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
        function._launch_kernel(grid, (block, 1, 1), args, shared, None)

    def co_resident(self, kernel, block: int, shared: int = 0) -> int:
        """Blocks of `block` threads of `kernel`, given `shared` bytes of dynamic
        shared memory, this GPU holds at once, from the kernel's registers and
        shared memory and the GPU's limits (occupancy.py)."""
        function, attribute = self.functions[kernel], self.drv.device_attribute

        def limit(name, default):  # attributes newer than some PyCUDA releases know
            return self.gpu.get_attribute(getattr(attribute, name)) if hasattr(attribute, name) else default
        limits = Limits(self.gpu.name(), limit("MULTIPROCESSOR_COUNT", 0),
                        threads_per_sm=limit("MAX_THREADS_PER_MULTIPROCESSOR", 2048),
                        blocks_per_sm=limit("MAX_BLOCKS_PER_MULTIPROCESSOR", 16),
                        registers_per_sm=limit("MAX_REGISTERS_PER_MULTIPROCESSOR", 65536),
                        registers_per_block=limit("MAX_REGISTERS_PER_BLOCK", 65536),
                        shared_per_sm=limit("MAX_SHARED_MEMORY_PER_MULTIPROCESSOR", 0),
                        shared_per_block=limit("MAX_SHARED_MEMORY_PER_BLOCK_OPTIN", 48 * 1024),
                        reserved_shared_per_block=limit("RESERVED_SHARED_MEMORY_PER_BLOCK", 1024))
        if block > function.max_threads_per_block:
            return 0
        return co_resident(limits, block, function.num_regs, function.shared_size_bytes + shared)


def import_pycuda():
    try:
        import pycuda.driver as drv
    except ImportError as err:
        if "libcuda" in str(err):
            raise CudaUnavailable(f"backend='cuda': the NVIDIA driver is missing ({err}); install it "
                                  "on a machine with an NVIDIA GPU, or use backend='numpy'") from None
        raise CudaUnavailable("backend='cuda' needs PyCUDA: pip install 'rnnc[cuda]' (or pip install "
                              "pycuda), with the NVIDIA driver and a GPU; or use backend='numpy'") from None
    return drv
