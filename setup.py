"""Build orz_fast and its C++ extension ``orz_fast._C`` (never optional)."""

import shutil
import sysconfig

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.errors import CompileError


class BuildExtRequired(build_ext):
    """build_ext that fails loudly, naming the compiler, when the C++ build fails."""

    def build_extensions(self):
        compiler = self.compiler.compiler_cxx[0] if getattr(self.compiler, "compiler_cxx", None) else "c++"
        if shutil.which(compiler) is None:
            raise CompileError(
                f"orz_fast needs a C++17 compiler to build orz_fast._C, and '{compiler}' was not found "
                f"(CXX={sysconfig.get_config_var('CXX')!r}). Install g++ (Debian: apt-get install g++) and retry."
            )
        super().build_extensions()


ext_modules = [
    Pybind11Extension(
        "orz_fast._C",
        sorted(["csrc/packing.cpp"]),
        cxx_std=17,
        extra_compile_args=["-O3", "-ffp-contract=off"],
    )
]

setup(
    packages=find_packages(include=["orz_fast", "orz_fast.*"]),
    # the demo-real task's prompt files (python -m orz_fast.data.demo_real writes them)
    package_data={"orz_fast.data": ["demo_real/*.jsonl"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtRequired},
)
