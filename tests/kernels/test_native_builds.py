"""The C files on the CPUs and compilers users have: built with gcc and with clang, for this CPU (-march=native),
for the AVX2 level (x86-64-v3) and for plain x86-64, each build checked against PyTorch by test_native.py's
tests. A compiler that is missing is said in the skip reason (Debian: apt install clang)."""

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

X86 = platform.machine().lower() in ("x86_64", "amd64")
BUILD = ("import json\nfrom tinylm.kernels import native\n"
         "print(json.dumps({name: [native.load_library(name).tinylm_clang, *native.load_library(name).tinylm_build]\n"
         "                  for name in native.SOURCES}))\n")


@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_the_c_files_build_and_match_pytorch(compiler, march, tmp_path):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed here (Debian: apt install {compiler}), so its build is unchecked")
    if march != "native" and not X86:
        pytest.skip(f"-march={march} is an x86-64 level and this is {platform.machine()}")
    env = {**os.environ, "CC": compiler, "TINYLM_MARCH": march, "TINYLM_CACHE": str(tmp_path), "OMP_NUM_THREADS": "2"}
    built = subprocess.run([sys.executable, "-c", BUILD], cwd=ROOT, env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    # this compiler at this level (OpenMP where it links)
    for name, (clang, *flags) in json.loads(built.stdout).items():
        assert flags[0] == compiler and f"-march={march}" in flags, (name, flags)
        assert clang == (compiler == "clang")  # known by its version, not its name: faster_here's rule reads it
    # every test of test_native.py but the one that times builds into a cache of its own (the session's cache of
    # conftest.py, fresh: built again with this compiler and level)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not cached_per_machine",
                           os.path.join(ROOT, "tests", "kernels", "test_native.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and "skipped" not in summary and "passed" in summary, done.stdout[-3000:]
