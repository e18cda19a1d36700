"""How many blocks of a kernel a GPU holds at once: the size of a persistent kernel's grid.

A persistent kernel (templates/persistent.cu.j2) separates its phases with
a grid barrier, so every block of its grid must be resident at the same
time: a block waiting at the barrier for one that cannot start until
another exits would wait forever. PyCUDA has no cooperative launch (which
would refuse a grid that does not fit), so the runtime launches at most the
GPU's co-resident capacity, computed here from the kernel's registers and
shared memory (ptxas's numbers, as PyCUDA's function attributes give them)
and the multiprocessor's limits, by the rules of NVIDIA's occupancy
calculator (CUDA C++ Best Practices Guide, "Occupancy"; the limits in the
CUDA C++ Programming Guide, "Technical Specifications per Compute
Capability"). Shared memory counts at the largest carveout: with no
preference set, the driver sizes a kernel's carveout so that shared memory
does not limit its occupancy (the Programming Guide's shared memory
sections for compute capability 8.x and 9.0).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one GPU's multiprocessors hold at once."""

    name: str
    sms: int  # multiprocessors
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    registers_per_sm: int = 65536
    registers_per_block: int = 65536
    shared_per_sm: int = 0  # bytes, at the largest carveout
    shared_per_block: int = 48 * 1024  # the most one block may have (above 48 KB, a kernel's to opt into)
    reserved_shared_per_block: int = 1024  # the driver's own, per block (compute capability 8.0 on)
    register_unit: int = 256  # registers are given to warps in units of this many
    shared_unit: int = 128  # shared memory is given to blocks in units of this many bytes
    source: str = ""


# compute capability 8.0 (A100) and 9.0 (H100, H200): 64K registers, 2048 threads and 32 blocks per
# multiprocessor; shared memory 164 KB (8.0) and 228 KB (9.0) per multiprocessor, at most 163 KB
# and 227 KB a block (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability")
GPUS = {
    "A100": Limits("A100", 108, shared_per_sm=164 * 1024, shared_per_block=163 * 1024,
                   source="108 SMs: NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020)"),
    "H100": Limits("H100", 132, shared_per_sm=228 * 1024, shared_per_block=227 * 1024,
                   source="132 SMs (SXM5): NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022)"),
    "H200": Limits("H200", 132, shared_per_sm=228 * 1024, shared_per_block=227 * 1024,
                   source="132 SMs: the H100's GH100 with HBM3e memory (NVIDIA H200 Tensor Core GPU datasheet)"),
}


def blocks_per_sm(limits: Limits, threads: int, registers: int, shared: int) -> int:
    """Blocks of `threads` threads, `registers` registers a thread and `shared`
    bytes of shared memory that one multiprocessor holds at once (0: none)."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // limits.register_unit) * limits.register_unit
    if threads > 1024 or per_warp * warps > limits.registers_per_block or shared > limits.shared_per_block:
        return 0
    by_threads = limits.threads_per_sm // (warps * 32)
    by_registers = (limits.registers_per_sm // per_warp) // warps if per_warp else limits.blocks_per_sm
    block_shared = -(-(shared + limits.reserved_shared_per_block) // limits.shared_unit) * limits.shared_unit
    by_shared = limits.shared_per_sm // block_shared
    return min(limits.blocks_per_sm, by_threads, by_registers, by_shared)


def co_resident(limits: Limits, threads: int, registers: int, shared: int) -> int:
    """Blocks of such a kernel the whole GPU holds at once."""
    return limits.sms * blocks_per_sm(limits, threads, registers, shared)


def persistent_grid(capacity: int, needed: int) -> int:
    """A persistent kernel's blocks, given that the GPU holds `capacity` >= 1 at
    once: no more than that, and no more than its largest phase has blocks of
    work (more would only wait)."""
    return max(1, min(capacity, needed))
