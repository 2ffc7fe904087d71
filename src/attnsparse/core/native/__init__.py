"""Small C kernels compiled on first use with the system C compiler, with a pure numpy fallback.

A kernel is built once per source version into `$ATTNSPARSE_CACHE/native/` (atomic rename, so concurrent
processes never load a half-written library) and loaded with ctypes. Without a compiler, or with
ATTNSPARSE_NATIVE=0, `load` returns None and callers use their numpy path: results are the same, only slower.

Kernels are built for the CPU they run on (-march=native: AVX2/FMA/F16C paths where it has them).
ATTNSPARSE_NATIVE_PORTABLE=1 builds for the baseline of the architecture instead (x86-64: no AVX2, FMA or F16C),
under its own cache key, so the portable paths can be run and tested on any machine; ATTNSPARSE_NATIVE_PORTABLE=avx2
builds for x86-64-v3 (AVX2, FMA, F16C, no AVX-512), so an AVX-512 host also runs the AVX2 paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

from attnsparse.core.runs import cache_root

SOURCES = Path(__file__).resolve().parent


def enabled() -> bool:
    """False when the user switched native kernels off (ATTNSPARSE_NATIVE=0)."""
    return os.environ.get("ATTNSPARSE_NATIVE", "1").strip() not in ("0", "false", "no", "off")


def portable() -> bool:
    """True when kernels are to be built without the CPU's own extensions (ATTNSPARSE_NATIVE_PORTABLE=1)."""
    return _portable_setting() in ("1", "true", "yes", "on")


def _portable_setting() -> str:
    return os.environ.get("ATTNSPARSE_NATIVE_PORTABLE", "0").strip().lower()


def _target_flags() -> list[str]:
    """-march=native; the architecture's baseline for a portable build; with ATTNSPARSE_NATIVE_PORTABLE=avx2 on
    x86-64, AVX2/FMA/F16C without AVX-512 (x86-64-v3: how an AVX-512 host tests the paths other hosts take)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if _portable_setting() == "avx2" and x86:
        return ["-march=x86-64-v3"]
    if not portable():
        return ["-march=native"]
    return ["-march=x86-64"] if x86 else []


def _cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name and feature flags from /proc/cpuinfo (or `cpuinfo`): both, since a generic model name
    such as "Intel(R) Xeon(R) Processor" covers hosts with and without AVX-512, and a -march=native build for one
    must not load on the other (the build cache is keyed on this)."""
    try:
        lines = (Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo).splitlines()
    except OSError:
        return platform.processor()
    model = next((line for line in lines if line.startswith("model name")), "")
    flags = next((line for line in lines if line.startswith(("flags", "Features"))), "")
    return f"{model} {flags}".strip() or platform.processor()


@cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel `name` (native/NAME.c) as a ctypes library, or None when it cannot be built."""
    if not enabled():
        return None
    source = SOURCES / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    # built on the machine that runs it (the cache key has the CPU model); no -ffast-math: results stay exact.
    # -fopenmp links libgomp.so.1, which the loader resolves to the copy torch already has loaded: kernels share
    # torch's threads. Without OpenMP the same source builds single-threaded.
    common = ["-O3", *_target_flags(), "-fno-trapping-math", "-fno-math-errno", "-fPIC", "-shared"]
    last_error: Exception | None = None
    code, machine = source.read_bytes(), [platform.machine(), _cpu_model()]
    for flags in (common + ["-fopenmp"], common + ["-fopenmp-simd"]):
        digest = hashlib.sha256(code + " ".join(flags + machine).encode()).hexdigest()[:16]
        target = cache_root() / "native" / f"{name}-{digest}.so"
        try:
            if not target.is_file():
                _build(compiler, flags, source, target)
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as error:
            last_error = error
    warnings.warn(f"attnsparse: could not compile {source.name} ({last_error}); using the slower numpy path",
                  stacklevel=2)
    return None


def _build(compiler: str, flags: list[str], source: Path, target: Path) -> None:
    """Compile into a temporary name and rename: concurrent processes never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, target)


_CTYPES = {"p": ctypes.c_void_p, "n": ctypes.c_int64, "f": ctypes.c_float}


@cache
def function(library: str, name: str, signature: str) -> Callable[..., int] | None:
    """Function `name` of kernel `library` returning a C int, its arguments typed from `signature` (one letter
    each: p pointer, n int64, f float32); None when the kernel cannot be built."""
    lib = load(library)
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes = [_CTYPES[code] for code in signature]
    fn.restype = ctypes.c_int
    return fn


def forget() -> None:
    """Drop loaded kernels, so the next `load` follows the current ATTNSPARSE_NATIVE* settings (tests switch them)."""
    function.cache_clear()
    load.cache_clear()
