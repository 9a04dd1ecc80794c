#!/usr/bin/env python3
"""Print the CMAKE_ARGS that build llama-cpp-python's ggml for the CPU this runs on.

    CMAKE_ARGS="$(python3 tools/cmake_args.py)" pip install --no-cache-dir -e .
    python3 tools/cmake_args.py --exec pip install ...   # the same, for tools without a shell (tox)

Standalone on purpose (standard library only, Python 3.6+): it runs before anything is installed.
The README's install command, .ci/run and tox.ini all take their flags from here, so there is
one place that decides them.

Why not ggml's default (GGML_NATIVE=ON, i.e. -march=native): on Xeon VMs whose guest kernel
does not enable AMX tiles, -march=native emits AMX instructions that die with SIGILL at first
use. Why not one fixed flag list: AVX-512 code dies the same way on the many x86-64 CPUs without
it. So every ggml x86 switch is set explicitly, ON only where /proc/cpuinfo lists what it needs,
and AMX is always OFF.

Overrides, strongest first: REFRACT_CMAKE_ARGS (printed as given), then a CMAKE_ARGS already in
the environment (the user's own choice is kept as is).

GPU builds: ``--cuda`` (first argument) adds the CUDA backend to the CPU flags; so does
REFRACT_CUDA=1 where nvcc is found (on PATH, or in CUDA_HOME / CUDA_PATH); REFRACT_CUDA=1
without an nvcc is refused rather than quietly giving a CPU-only build. Every flash-attention
kernel for quantized K/V pairs is compiled (GGML_CUDA_FA_ALL_QUANTS): without it a pair the
default build lacks runs its attention on the CPU or converts K and V to f16, and the audit
would measure that instead of the cache asked for.

    CMAKE_ARGS="$(python3 tools/cmake_args.py --cuda)" pip install --no-cache-dir llama-cpp-python
"""

from __future__ import print_function

import os
import platform
import sys

# ggml option -> the /proc/cpuinfo flags it needs. Order is the order printed.
X86_SWITCHES = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    # ggml's GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw.
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
)
# Kept OFF even where the CPU lists them: the AMX ones trap where the guest kernel has not
# enabled tile state, and the AVX-512/AVX extensions stay off so that builds on different
# AVX-512 machines compute the same ggml code paths (numbers are compared across runs).
ALWAYS_OFF = ("GGML_AVX_VNNI", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
              "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
X86_MACHINES = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")
# Added to the CPU flags for a CUDA build.
CUDA_SWITCHES = ("-DGGML_CUDA=ON", "-DGGML_CUDA_FA_ALL_QUANTS=ON")


def find_nvcc(environ):
    """The nvcc a CUDA build would use, or None: on PATH, else under CUDA_HOME or CUDA_PATH."""
    for folder in environ.get("PATH", "").split(os.pathsep):
        if folder and os.access(os.path.join(folder, "nvcc"), os.X_OK):
            return os.path.join(folder, "nvcc")
    for name in ("CUDA_HOME", "CUDA_PATH"):
        root = environ.get(name, "").strip()
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def wants_cuda(argv, environ):
    """(CUDA build?, problem or None): asked by --cuda, or by REFRACT_CUDA=1 with nvcc found."""
    if argv[:1] == ["--cuda"]:
        return True, None
    if environ.get("REFRACT_CUDA", "").strip().lower() in ("1", "on", "yes", "true"):
        if find_nvcc(environ) is None:
            return False, ("REFRACT_CUDA=1 but no nvcc on PATH, CUDA_HOME or CUDA_PATH: install the CUDA toolkit "
                           "(or pass --cuda to print the flags anyway)")
        return True, None
    return False, None


def cpu_flags(cpuinfo_text):
    """The flags every processor lists (their intersection: on hybrid CPUs the cores differ,
    and a thread may run on any of them). None when the text has no x86 'flags' line."""
    common = None
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags = set(value.split())
            common = flags if common is None else common & flags
    return common


def choose(cpuinfo_text, machine):
    """(cmake arguments, one-line reason) for this CPU description."""
    args = ["-DGGML_NATIVE=OFF"]
    if machine.lower() not in X86_MACHINES:
        return args, "%s: portable build (GGML_NATIVE=OFF)" % machine
    flags = cpu_flags(cpuinfo_text)
    if flags is None:
        flags = set()
        reason = "x86 CPU flags unknown (no readable /proc/cpuinfo): portable build without SIMD extensions"
    else:
        reason = None
    enabled = []
    for option, needs in X86_SWITCHES:
        on = all(flag in flags for flag in needs)
        args.append("-D%s=%s" % (option, "ON" if on else "OFF"))
        if on:
            enabled.append(option[len("GGML_"):])
    args.extend("-D%s=OFF" % option for option in ALWAYS_OFF)
    if reason is None:
        amx = " (AMX listed by the CPU, kept off)" if any(f.startswith("amx") for f in flags) else ""
        reason = "x86-64 build with %s; AMX off%s" % (", ".join(enabled) or "no SIMD extensions", amx)
    return args, reason


def resolve(environ, cuda=False):
    """(CMAKE_ARGS value, reason): an override from the environment, or the choice for this CPU
    (with the CUDA backend when ``cuda``)."""
    for name in ("REFRACT_CMAKE_ARGS", "CMAKE_ARGS"):
        value = environ.get(name, "").strip()
        if value:
            return value, "using %s from the environment as given" % name
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
    except OSError:
        text = ""
    args, reason = choose(text, platform.machine())
    if cuda:
        args = args + list(CUDA_SWITCHES)
        reason += "; CUDA backend with every quantized flash-attention kernel"
    return " ".join(args), reason


def main(argv=None, environ=None):
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    cuda, problem = wants_cuda(argv, environ)
    if problem:
        print("cmake_args: " + problem, file=sys.stderr)
        return 2
    if argv[:1] == ["--cuda"]:
        argv = argv[1:]
    value, reason = resolve(environ, cuda)
    print("cmake_args: " + reason, file=sys.stderr)
    if argv[:1] == ["--exec"] and len(argv) > 1:
        env = dict(environ, CMAKE_ARGS=value)
        print("cmake_args: CMAKE_ARGS=%s" % value, file=sys.stderr)
        os.execvpe(argv[1], argv[1:], env)
    if argv:
        print("usage: cmake_args.py [--cuda] [--exec COMMAND ARGS...]", file=sys.stderr)
        return 2
    print(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
