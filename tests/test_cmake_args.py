"""tools/cmake_args.py: the llama-cpp-python build flags chosen from /proc/cpuinfo, checked on
flag sets recorded from real machines (tests/data/cpuinfo/)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "cmake_args.py"
CPUINFO = Path(__file__).resolve().parent / "data" / "cpuinfo"

_spec = importlib.util.spec_from_file_location("cmake_args", SCRIPT)
cmake_args = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cmake_args)


def _switches(name, machine="x86_64"):
    args, reason = cmake_args.choose((CPUINFO / name).read_text(), machine)
    assert args[0] == "-DGGML_NATIVE=OFF", args
    switches = {}
    for arg in args:
        key, _, value = arg[len("-D"):].partition("=")
        assert key not in switches, f"{key} given twice"
        switches[key] = value
    return switches, reason


def _on(switches):
    return {key for key, value in switches.items() if value == "ON"}


AMX_AND_EXTENSIONS = {"GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_AVX512_VBMI",
                      "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI"}
AVX2_LEVEL = {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C"}


def test_avx2_only_cpu_gets_no_avx512():
    switches, reason = _switches("zen2_avx2_only.txt")
    assert _on(switches) == AVX2_LEVEL
    assert switches["GGML_AVX512"] == "OFF"
    assert "AVX512" not in reason


def test_avx512_without_amx_this_epyc():
    switches, reason = _switches("epyc_avx512_no_amx.txt")
    assert _on(switches) == AVX2_LEVEL | {"GGML_AVX512"}
    assert "AMX listed" not in reason


def test_avx512_with_amx_keeps_amx_off():
    switches, reason = _switches("xeon_sapphire_rapids_amx.txt")
    assert _on(switches) == AVX2_LEVEL | {"GGML_AVX512"}
    # Every AMX switch is given explicitly as OFF, not left to ggml's default.
    assert all(switches[key] == "OFF" for key in AMX_AND_EXTENSIONS)
    assert "AMX listed by the CPU, kept off" in reason


def test_cpu_without_avx_gets_a_plain_build():
    switches, reason = _switches("qemu64_no_avx.txt")
    # ggml turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C ON by default when GGML_NATIVE=OFF, so a CPU
    # without them must have each switched off explicitly.
    assert _on(switches) == set()
    assert set(switches) >= AVX2_LEVEL | {"GGML_AVX512"} | AMX_AND_EXTENSIONS
    assert "no SIMD extensions" in reason


def test_avx512f_without_the_subsets_ggml_needs():
    switches, _ = _switches("knl_avx512f_without_bw.txt")
    assert switches["GGML_AVX512"] == "OFF"
    assert switches["GGML_AVX2"] == "ON"


def test_processors_disagreeing_take_the_common_flags():
    one = (CPUINFO / "epyc_avx512_no_amx.txt").read_text()
    other = (CPUINFO / "zen2_avx2_only.txt").read_text()
    args, _ = cmake_args.choose(one + "\n" + other, "x86_64")
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_AVX2=ON" in args


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64"])
def test_non_x86_gets_a_portable_build_with_no_x86_switches(machine):
    args, reason = cmake_args.choose("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n", machine)
    assert args == ["-DGGML_NATIVE=OFF"]
    assert machine in reason


def test_unreadable_cpuinfo_on_x86_turns_every_extension_off():
    args, reason = cmake_args.choose("", "x86_64")
    assert not [a for a in args if a.endswith("=ON")]
    assert "unknown" in reason


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "REFRACT_CMAKE_ARGS")}
    env.update(env_extra)
    # Plain interpreter, no site-packages, no PYTHONPATH: it runs before anything is installed.
    return subprocess.run([sys.executable, "-S", "-E", str(SCRIPT)], env=env, capture_output=True, text=True, check=True)


def test_script_prints_one_line_for_this_machine():
    done = _run({})
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("-DGGML_NATIVE=OFF")
    assert "AMX_TILE=ON" not in lines[0] and "GGML_NATIVE=ON" not in lines[0]
    assert done.stderr.startswith("cmake_args: ")


def test_users_cmake_args_win_and_refract_override_wins_over_both():
    assert _run({"CMAKE_ARGS": "-DGGML_CUDA=on"}).stdout.strip() == "-DGGML_CUDA=on"
    both = _run({"CMAKE_ARGS": "-DGGML_CUDA=on", "REFRACT_CMAKE_ARGS": "-DGGML_NATIVE=ON"})
    assert both.stdout.strip() == "-DGGML_NATIVE=ON"
    assert "REFRACT_CMAKE_ARGS" in both.stderr


def test_every_install_path_takes_its_flags_from_the_script():
    """README, .ci/run, tox.ini and the CI workflow example must not hard-code an instruction set again."""
    for name in ("README.md", ".ci/run", "tox.ini", "examples/github-actions/refract.yml"):
        text = (ROOT / name).read_text()
        assert "tools/cmake_args.py" in text, name
        # (a bindings-only install, -DLLAMA_BUILD=OFF, compiles nothing and needs no CPU flags)
        assert re.search(r"CMAKE_ARGS\s*=\s*[\"']?-D(?!LLAMA_BUILD=OFF)", text) is None, name


def test_exec_runs_a_command_with_the_chosen_flags():
    """tox's install_command goes through --exec (tox runs no shell to expand $(...))."""
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "REFRACT_CMAKE_ARGS")}
    printed = _run({}).stdout.strip()
    done = subprocess.run([sys.executable, "-S", "-E", str(SCRIPT), "--exec", sys.executable, "-c",
                           "import os; print(os.environ['CMAKE_ARGS'])"],
                          env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == printed
    env["REFRACT_CMAKE_ARGS"] = "-DGGML_NATIVE=OFF -DGGML_AVX=OFF"
    done = subprocess.run([sys.executable, "-S", "-E", str(SCRIPT), "--exec", sys.executable, "-c",
                           "import os; print(os.environ['CMAKE_ARGS'])"],
                          env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "-DGGML_NATIVE=OFF -DGGML_AVX=OFF"


def test_unknown_arguments_are_refused():
    done = subprocess.run([sys.executable, "-S", "-E", str(SCRIPT), "--avx512"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr and done.stdout == ""


def _run_args(args, env_extra, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "REFRACT_CMAKE_ARGS", "REFRACT_CUDA")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-S", "-E", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          check=check)


def test_cuda_flag_adds_the_cuda_backend_to_the_cpu_flags():
    cpu = _run_args([], {}).stdout.split()
    cuda = _run_args(["--cuda"], {}).stdout.split()
    assert cuda == cpu + ["-DGGML_CUDA=ON", "-DGGML_CUDA_FA_ALL_QUANTS=ON"]
    assert "CUDA backend" in _run_args(["--cuda"], {}).stderr


def test_refract_cuda_needs_an_nvcc(tmp_path):
    done = _run_args([], {"REFRACT_CUDA": "1", "PATH": str(tmp_path), "CUDA_HOME": "", "CUDA_PATH": ""}, check=False)
    assert done.returncode == 2 and done.stdout == "" and "no nvcc" in done.stderr
    # A CUDA toolkit (here a stand-in nvcc) under CUDA_HOME: the user opted in and it is there.
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    done = _run_args([], {"REFRACT_CUDA": "1", "PATH": str(tmp_path), "CUDA_HOME": str(tmp_path / "cuda")})
    assert "-DGGML_CUDA=ON" in done.stdout.split()
    # Without the opt-in, an nvcc on the machine changes nothing.
    done = _run_args([], {"PATH": str(tmp_path / "cuda" / "bin")})
    assert "-DGGML_CUDA=ON" not in done.stdout.split()


def test_cuda_with_exec_passes_the_cuda_flags():
    done = _run_args(["--cuda", "--exec", sys.executable, "-c", "import os; print(os.environ['CMAKE_ARGS'])"], {})
    assert done.stdout.split()[-2:] == ["-DGGML_CUDA=ON", "-DGGML_CUDA_FA_ALL_QUANTS=ON"]


def test_user_overrides_still_win_over_cuda():
    assert _run_args(["--cuda"], {"REFRACT_CMAKE_ARGS": "-DGGML_VULKAN=ON"}).stdout.strip() == "-DGGML_VULKAN=ON"
