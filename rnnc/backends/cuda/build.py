"""Building: nvcc turns the generated source into a cubin, cached on disk.

The cache key is a hash of the source, the nvcc options and `nvcc --version`,
so a new compiler or new flags never reuse an old cubin. Cubins are written to
a temporary file and renamed into place, so two processes building the same
cell at once both succeed and the cache never holds a half-written file.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import ToolchainError

DEFAULT_ARCH = "sm_80"
OPTIONS = ("-O3", "-Xptxas", "-v")  # -v: ptxas reports registers and spills on stderr


class BuildError(ToolchainError):
    """nvcc is missing or rejected the generated source."""


@dataclass(frozen=True)
class Cubin:
    path: Path
    arch: str
    log: str  # ptxas's report (empty when the cubin came from the cache)

    def spills(self) -> int:
        return spill_bytes(self.log)


def nvcc_path() -> str:
    found = shutil.which("nvcc") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc",)
         if p.exists()), None)
    if not found:
        raise BuildError("nvcc not found: install the CUDA toolkit (https://developer.nvidia.com/"
                         "cuda-downloads) and put its bin/ on PATH or set CUDA_HOME")
    return found


@lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout


def check_arch(arch: str) -> str:
    if not re.fullmatch(r"sm_\d+[a-z]?", arch):
        raise ValueError(f"arch: expected a name like sm_80 or sm_90, got {arch!r}")
    return arch


def default_arch() -> str:
    """The local GPU's architecture when PyCUDA and a GPU are there, else sm_80."""
    try:
        import pycuda.driver as drv
        drv.init()
        major, minor = drv.Device(0).compute_capability()
        return f"sm_{major}{minor}"
    except Exception:  # no PyCUDA, no driver or no GPU: any of them means "build for the default"
        return DEFAULT_ARCH


def cache_dir() -> Path:
    root = os.environ.get("RNNC_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rnnc"
    return Path(root)


def cache_key(source: str, arch: str, nvcc: str) -> str:
    h = hashlib.sha256()
    for part in (source, arch, " ".join(OPTIONS), nvcc_version(nvcc)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def compile_cubin(source: str, arch: str | None = None, cache: Path | None = None) -> Cubin:
    """The cubin of `source` for `arch`, from the cache or built by nvcc."""
    arch = check_arch(arch or default_arch())
    nvcc = nvcc_path()
    cache = Path(cache or cache_dir())
    target = cache / f"{cache_key(source, arch, nvcc)}.{arch}.cubin"
    if target.exists():
        return Cubin(target, arch, "")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as work:
        src = Path(work) / "kernels.cu"
        src.write_text(source)
        out = Path(work) / "kernels.cubin"
        done = subprocess.run([nvcc, "-cubin", f"-arch={arch}", *OPTIONS, "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"nvcc failed for {arch} (exit {done.returncode}):\n{done.stderr.strip()}")
        os.replace(out, target)  # atomic: readers see no cubin or a whole one
    return Cubin(target, arch, done.stderr)


def spill_bytes(log: str) -> int:
    """Total spill stores and loads ptxas reports in its -v output."""
    return sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
