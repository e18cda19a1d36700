"""Building: nvcc turns the generated source into a cubin, cached on disk.

The cache is $RNNC_CACHE_DIR, else $XDG_CACHE_HOME/rnnc, else ~/.cache/rnnc.
An entry is named by a hash of the source, the nvcc options and `nvcc
--version` (so a new compiler or new flags never reuse an old cubin), the
arch, and the hash of the cubin itself: an entry whose bytes no longer match
its name is removed and built again, never served. Cubins are written to a
temporary file and renamed into place, so two processes building the same
cell at once both succeed and the cache never holds a half-written file. A
cache directory that cannot be made or written is a warning, and the cubin is
built in a temporary directory instead. Whatever nvcc warns (past ptxas's
register report) is an `NvccWarning`, on every build of the source, cached or
not: a warning is never hidden.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import ToolchainError

DEFAULT_ARCH = "sm_80"
OPTIONS = ("-O3", "-Xptxas", "-v")  # -v: ptxas reports registers and spills on stderr


class BuildError(ToolchainError):
    """nvcc is missing or rejected the generated source."""


class CacheWarning(UserWarning):
    """The cubin cache cannot be used; cubins are built without it."""


class NvccWarning(UserWarning):
    """nvcc (or ptxas) warned about the generated source; the message holds its words."""


@dataclass(frozen=True)
class Cubin:
    path: Path
    arch: str
    log: str  # ptxas's report (empty when the cubin came from the cache)
    data: bytes  # the cubin, as checked against the hash in its name
    warned: str = ""  # nvcc's warnings, kept beside a cached cubin so every build shows them

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
    if not isinstance(arch, str) or not re.fullmatch(r"sm_[0-9]+[a-z]?", arch):
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


def kernel_resources(log: str) -> dict:
    """Each kernel's (registers, bytes of static shared memory) in ptxas -v's
    report (a Cubin's `log`)."""
    out = {}
    for name, report in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?Used \d+ registers[^\n]*)", log, re.S):
        shared = re.search(r"(\d+) bytes smem", report)
        out[name] = (int(re.search(r"Used (\d+) registers", report).group(1)), int(shared.group(1)) if shared else 0)
    return out


def compile_cubin(source: str, arch: str | None = None, cache: Path | None = None) -> Cubin:
    """The cubin of `source` for `arch`, from the cache or built by nvcc."""
    arch = check_arch(arch or default_arch())
    nvcc = nvcc_path()
    entry = f"{cache_key(source, arch, nvcc)}.{arch}"
    cache = usable_cache(Path(cache or cache_dir()))
    cubin = from_cache(cache, entry, arch) or run_nvcc(nvcc, source, arch, cache, entry)
    if cubin.warned:
        warnings.warn(NvccWarning(f"nvcc warned while building the kernels for {arch}:\n{cubin.warned}"),
                      stacklevel=2)
    return cubin


def nvcc_warnings(stderr: str) -> str:
    """What nvcc said besides ptxas's -v report (its `ptxas info` lines and their
    indented details), when some of it is a warning; else ''."""
    kept, in_report = [], False
    for line in stderr.splitlines():
        in_report = line.startswith("ptxas info") or (in_report and line[:1].isspace())
        if not in_report:
            kept.append(line)
    text = "\n".join(kept).strip()
    return text if "warning" in text.lower() else ""


def usable_cache(cache: Path) -> Path:
    """`cache`, made if need be, when a file can be written there; else (with a
    warning) a temporary directory of this process."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cache).close()
        return cache
    except OSError as err:
        warnings.warn(CacheWarning(f"the cubin cache {cache} is unusable ({err.strerror or err}); "
                                   "building without it (set RNNC_CACHE_DIR to a writable directory)"),
                      stacklevel=3)
        return scratch_dir()


@lru_cache(maxsize=None)
def scratch_dir() -> Path:
    path = tempfile.mkdtemp(prefix="rnnc-cubins-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def from_cache(cache: Path, entry: str, arch: str) -> Cubin | None:
    """The entry's cubin when its bytes match the hash in its name; a damaged one is removed."""
    for path in cache.glob(f"{entry}.*.cubin"):
        try:
            data = path.read_bytes()
            if path.name == f"{entry}.{hashlib.sha256(data).hexdigest()}.cubin":
                warned = cache / f"{entry}.warnings"
                return Cubin(path, arch, "", data, warned.read_text() if warned.exists() else "")
            path.unlink()
        except OSError:  # gone meanwhile, or unreadable: built again
            continue
    return None


def run_nvcc(nvcc: str, source: str, arch: str, cache: Path, entry: str) -> Cubin:
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as work:
        src = Path(work) / "kernels.cu"
        src.write_text(source)
        out = Path(work) / "kernels.cubin"
        done = subprocess.run([nvcc, "-cubin", f"-arch={arch}", *OPTIONS, "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"nvcc failed for {arch} (exit {done.returncode}):\n{done.stderr.strip()}")
        data = out.read_bytes()
        warned = nvcc_warnings(done.stderr.replace(str(src), src.name))  # not the scratch path
        if warned:  # in place before the cubin, which a reader takes as the whole entry
            (Path(work) / "warnings").write_text(warned)
            os.replace(Path(work) / "warnings", cache / f"{entry}.warnings")
        target = cache / f"{entry}.{hashlib.sha256(data).hexdigest()}.cubin"
        os.replace(out, target)  # atomic: readers see no cubin or a whole one
    return Cubin(target, arch, done.stderr, data, warned)


def spill_bytes(log: str) -> int:
    """Total spill stores and loads ptxas reports in its -v output."""
    return sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
