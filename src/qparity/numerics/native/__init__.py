"""qparity's native kernels: C sources shipped with the package, built on first use with the machine's C compiler.

`int8_conv.c` holds an int8 convolution on AVX512-VNNI with the target's requantization rule fused into it
(numerics/fused_layer.py says when the integer runtime uses it), and XNNPACK's, TFLite's and ONNX Runtime's
elementwise adds (numerics/native_add.py). It is built with the compiler
named by $CC (else `cc`, `gcc`), for the instruction sets it needs rather than for this exact CPU, into
$QPARITY_CACHE_DIR (else $XDG_CACHE_HOME/qparity, else ~/.cache/qparity), once per source and compiler, and
loaded with ctypes, which releases the GIL during a call. No compiler, a CPU without those instructions, or
QPARITY_NATIVE=0 leave it unavailable: the integer runtime then computes the same codes without it, and
`unavailable_reason()` says why.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Optional

import torch

SOURCE = pathlib.Path(__file__).with_name("int8_conv.c")
# What the kernel's intrinsics need; -ffp-contract=off: no product is fused into an addition it was not
# written with (the rule has none, and a compiler must not make one).
FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math",
         "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni")
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"})


class Conv(ctypes.Structure):
    """int8_conv.c's `Conv`, field for field."""

    _fields_ = [
        ("src", ctypes.c_void_p), ("src_n", ctypes.c_int64), ("src_c", ctypes.c_int64),
        ("src_h", ctypes.c_int64), ("src_w", ctypes.c_int64), ("flip", ctypes.c_int),
        ("scratch", ctypes.c_void_p), ("weights", ctypes.c_void_p), ("offset", ctypes.c_void_p),
        ("scale", ctypes.c_void_p), ("out", ctypes.c_void_p),
        *((name, ctypes.c_int) for name in (
            "N", "C", "H", "W", "Cp", "pad_h", "pad_w", "pad_value", "OC", "KH", "KW", "OH", "OW",
            "stride_h", "stride_w", "dil_h", "dil_w", "zero_point", "lo", "hi", "band_rows")),
        ("band_bytes", ctypes.c_int64), ("rule", ctypes.c_int),
        *((name, ctypes.c_void_p) for name in ("multiplier", "addend", "shift", "sign_weight")),
    ]


class Add(ctypes.Structure):
    """int8_conv.c's `Add` (qparity_qs8_vadd's operands and constants)."""

    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("out", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("count", "zero_a", "zero_b", "multiplier_a", "multiplier_b",
                                                      "shift", "zero_out", "lo", "hi", "int32_sum"))]


class TfliteAdd(ctypes.Structure):
    """int8_conv.c's `TfliteAdd` (qparity_tflite_add's operands and constants)."""

    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("out", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in (
                    "count", "zero_a", "zero_b", "multiplier_a", "shift_a", "multiplier_b", "shift_b",
                    "multiplier_y", "shift_y", "zero_out", "lo", "hi"))]


class OrtAdd(ctypes.Structure):
    """int8_conv.c's `OrtAdd` (qparity_ort_add's operands and constants)."""

    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("out", ctypes.c_void_p), ("count", ctypes.c_int64),
                ("ratio_a", ctypes.c_float), ("ratio_b", ctypes.c_float), ("offset", ctypes.c_float),
                ("lo", ctypes.c_int32), ("hi", ctypes.c_int32), ("is_unsigned", ctypes.c_int32)]


# each entry point: (name, its argument structure)
ENTRY_POINTS = (("qparity_int8_conv", Conv), ("qparity_qs8_vadd", Add), ("qparity_tflite_add", TfliteAdd),
                ("qparity_ort_add", OrtAdd))


def call(function, arguments: ctypes.Structure, threads: int, label: str) -> None:
    """function(arguments, threads), recorded as `label` when PyTorch's profiler runs (it does not see a ctypes call:
    `qparity bench --profile` would count the kernel as Python)."""
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(label):
            function(arguments, threads)
    else:
        function(arguments, threads)


def int8_conv() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, or None where it is unavailable (`unavailable_reason`)."""
    library, _ = _load()
    return library


def unavailable_reason() -> str:
    """Why the native kernel does not run here ("" where it does)."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def _load():
    if os.environ.get("QPARITY_NATIVE", "1") == "0":
        return None, "turned off (QPARITY_NATIVE=0)"
    missing = CPU_FLAGS - _cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))} (the kernel sums u8 x s8 products with VNNI)"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    try:
        path = _build(compiler)
        library = ctypes.CDLL(str(path))
        for name, structure in ENTRY_POINTS:
            function, size = getattr(library, name), getattr(library, name + "_struct_size")
            function.argtypes, function.restype = [ctypes.POINTER(structure), ctypes.c_int], ctypes.c_int
            size.restype = ctypes.c_int
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        return None, f"the kernel did not build or load ({type(error).__name__}: {str(error).strip()[:300]})"
    if any(getattr(library, name + "_struct_size")() != ctypes.sizeof(structure) for name, structure in ENTRY_POINTS):
        return None, "the built kernel's argument layout differs from numerics/native's"
    return library, ""


def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.split(":", 1)[-1].split())


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str) -> pathlib.Path:
    """The shared library for this source, flags and compiler, compiled unless the cache has it. Written under a
    temporary name and renamed into place, so concurrent processes never load a half-written file."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join((SOURCE.read_text(), " ".join(FLAGS), compiler, version)).encode()).hexdigest()
    directory = _cache_directory()
    target = directory / f"int8_conv-{key[:20]}.so"
    if target.exists():
        return target
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", temporary], capture_output=True, text=True,
                                timeout=300)
        if result.returncode:
            raise subprocess.SubprocessError(result.stderr.strip()[-300:] or f"exit status {result.returncode}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _cache_directory() -> pathlib.Path:
    configured = os.environ.get("QPARITY_CACHE_DIR")
    base = pathlib.Path(configured) if configured else \
        pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "qparity"
    directory = base / "native"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    return pathlib.Path(tempfile.mkdtemp(prefix="qparity-native-"))
