"""Build the C core `aqlm._C`.

Each SIMD file is compiled with its own instruction-set flags and everything else with none, so
the compiler cannot put AVX instructions into code that runs before CPU features are checked.
"""
import os
import sys

import numpy
from setuptools import Extension, setup
from setuptools.errors import CompileError
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ISA_FLAGS = {
    "_avx2.c": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.c": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "_avx512vnni.c": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"],
    "_avx512vbmi.c": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vbmi", "-mavx512vnni", "-mfma", "-mf16c"],
    "_avx512bf16.c": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c"],
    "_amx.c": ["-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
               "-mfma", "-mf16c"],
}
OPTIONAL_ISA_SUFFIXES = ("_amx.c", "_avx512bf16.c")  # older compilers (gcc < 11, clang < 12) lack these flags
BASE_FLAGS = ["-std=c11", "-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-unused-parameter"]
if os.environ.get("AQLM_DEBUG_BUILD"):
    BASE_FLAGS = [f for f in BASE_FLAGS if f != "-O3"] + ["-O0", "-g", "-fsanitize=address,undefined"]


def isa_flags(source: str) -> list:
    """Instruction-set flags for one source file (empty for portable files)."""
    for suffix, flags in ISA_FLAGS.items():
        if source.endswith(suffix):
            return flags
    return []


class BuildExtPerFileFlags(build_ext):
    """build_ext that compiles every source with BASE_FLAGS plus that file's ISA flags."""

    def build_extension(self, ext):
        objects = []
        for source in ext.sources:
            compile_args = dict(output_dir=self.build_temp, include_dirs=ext.include_dirs, depends=ext.depends)
            try:
                objects += self.compiler.compile([source], extra_postargs=BASE_FLAGS + isa_flags(source), **compile_args)
            except CompileError:
                if not source.endswith(OPTIONAL_ISA_SUFFIXES):
                    raise
                # A compiler without these flags builds the file's empty kernel table (never chosen).
                print(f"note: {source} built without {' '.join(isa_flags(source))}: this compiler lacks them")
                objects += self.compiler.compile([source], extra_postargs=BASE_FLAGS, **compile_args)
        ext_path = self.get_ext_fullpath(ext.name)
        self.compiler.link_shared_object(
            objects,
            ext_path,
            libraries=self.get_libraries(ext),
            library_dirs=ext.library_dirs,
            extra_postargs=ext.extra_link_args,
            export_symbols=self.get_export_symbols(ext),
            target_lang="c",
        )


class BuildPyWithData(build_py):
    """build_py that also copies the repository's data/ into the package as aqlm/_bundled_data.

    An editable install reads data/ in place (aqlm.paths looks there), so only real builds copy it.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not os.path.isdir("data"):
            return
        self.copy_tree("data", os.path.join(self.build_lib, "aqlm", "_bundled_data"))


if sys.platform != "linux":
    raise RuntimeError("aqlm's C core is built and tested on Linux only (gcc or clang with OpenMP)")

csrc = sorted(os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".c"))
headers = sorted(os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".h"))

setup(
    ext_modules=[
        Extension(
            "aqlm._C",
            sources=csrc,
            depends=headers,
            include_dirs=["csrc", numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_23_API_VERSION")],
            extra_link_args=["-fopenmp"] + (["-fsanitize=address,undefined"] if os.environ.get("AQLM_DEBUG_BUILD") else []),
        )
    ],
    cmdclass={"build_ext": BuildExtPerFileFlags, "build_py": BuildPyWithData},
)
