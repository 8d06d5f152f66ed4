"""Build llama.cpp's ``llama-quantize`` and ``llama-imatrix`` for the llama.cpp rows of reproduce_table.py.

The tools come from the llama.cpp tree vendored in the llama-cpp-python source release, the same
version as the installed ``llama-cpp-python`` (the ``llamacpp`` extra), so that the files they
write are the files the Python package reads. The source release is downloaded from PyPI (or
given with ``--sdist``), built with CMake for this CPU, and the tools are left in
``<cache>/llamacpp/<version>/bin``; the script prints that directory. Then::

    export AQLM_LLAMACPP_BIN=<printed directory>
    python scripts/reproduce_table.py --rows llamacpp-Q4_1 llamacpp-IQ2_XS ...

The same directory holds ``libllama.so``: llama-cpp-python can use it instead of compiling its own
(``CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install llama-cpp-python==VERSION``, then
``export LLAMA_CPP_LIB_PATH=<printed directory>``). The build takes 10-20 minutes on 2 cores; a
finished build is reused.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

from aqlm.paths import cache_dir

PACKAGE = "llama-cpp-python"
TOOLS = ("llama-quantize", "llama-imatrix")
# GGML's options for the x86 SIMD extensions, by the /proc/cpuinfo flag that allows each. GGML_NATIVE
# (-march=native) is not used: on a Xeon with AMX its build died of SIGILL in llama-imatrix and
# crashed llama-cpp-python here; the explicit list leaves AMX out.
SIMD_OPTIONS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
                "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
                "avx512_bf16": "GGML_AVX512_BF16"}


def simd_options() -> list[str]:
    """``-DGGML_...=ON/OFF`` for each x86 extension this CPU has or lacks (from /proc/cpuinfo)."""
    from aqlm.kernel_choice import cpuinfo_field

    flags = set((cpuinfo_field("flags") or "").split())
    return ["-DGGML_NATIVE=OFF"] + [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in SIMD_OPTIONS.items()]


def installed_version() -> str:
    """The installed llama-cpp-python's version; SystemExit with a message when it is not installed."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"error: {PACKAGE} is not installed: pip install 'aqlm[llamacpp]' (or pass --version)") from None


def sdist_url(version: str) -> tuple[str, str]:
    """The file name and address of llama-cpp-python ``version``'s source release, from PyPI's
    simple index (its JSON form, PEP 691: the index that pip itself reads)."""
    request = urllib.request.Request(f"https://pypi.org/simple/{PACKAGE}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        index = json.load(response)
    name = f"{PACKAGE.replace('-', '_')}-{version}.tar.gz"
    urls = [item["url"] for item in index.get("files", []) if item.get("filename") == name]
    if not urls:
        raise SystemExit(f"error: PyPI has no source release {name} of {PACKAGE}")
    return name, urls[0]


def download_sdist(version: str, directory: Path) -> Path:
    """The source release of llama-cpp-python ``version`` from PyPI, downloaded into ``directory`` once."""
    try:
        name, url = sdist_url(version)
        target = directory / name
        if not target.is_file():
            partial = target.with_name(target.name + ".partial")
            print(f"downloading {url}", flush=True)
            urllib.request.urlretrieve(url, partial)
            partial.replace(target)
    except (OSError, ValueError) as error:  # urllib's URLError/HTTPError are OSErrors; ValueError: bad JSON
        raise SystemExit(f"error: cannot download the {PACKAGE} {version} source release from PyPI ({error}); "
                         "download it yourself and pass it with --sdist FILE") from None
    return target


def build(sdist: Path, work: Path, jobs: int) -> Path:
    """Extract ``sdist`` into ``work`` and build the tools; returns the directory holding them."""
    source = work / "source"
    if not source.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(work / "source.partial", filter="data")
        (work / "source.partial").replace(source)
    vendored = next(source.glob("*/vendor/llama.cpp"), None)
    if vendored is None:
        raise SystemExit(f"error: {sdist} holds no vendor/llama.cpp tree")
    build_dir = work / "build"
    options = ["-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_TYPE=Release", *simd_options(), "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
    subprocess.run(["cmake", "-S", str(vendored), "-B", str(build_dir), *options], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", *TOOLS, "llama", "-j", str(jobs)], check=True)
    return build_dir / "bin"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default=None, help=f"{PACKAGE} version (default: the installed one)")
    parser.add_argument("--sdist", type=Path, default=None, help="a downloaded source release (.tar.gz) to build")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    version = args.version or installed_version()
    work = cache_dir() / "llamacpp" / version
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = work / "build" / "bin"
    if not all((bin_dir / tool).is_file() for tool in TOOLS):
        sdist = args.sdist or download_sdist(version, work)
        if not sdist.is_file():
            raise SystemExit(f"error: --sdist {sdist} is not a file")
        bin_dir = build(sdist, work, args.jobs)
    print(bin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
