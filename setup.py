"""Builds the unlearn_ext C++ (and, where possible, CUDA) extensions.

Environment variables:
  UNLEARN_EXT_BUILD_CPU=0     skip the C++ CPU extension (pure-Python install: torch backend)
  UNLEARN_EXT_BUILD_CUDA=auto build the CUDA extension when torch has CUDA and nvcc is found;
                        =1    require it (fail if it cannot be built); =0 skip it
  UNLEARN_EXT_SANITIZE=1      build the C++ CPU extension with AddressSanitizer and
                              UndefinedBehaviorSanitizer (`make test-sanitize`; not for use)
"""
import glob
import os
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    return os.environ.get(name, default).strip().lower()


def sanitizer_flags():
    """ASan + UBSan, every UB check fatal (no recovery: a report fails the run), frame
    pointers for readable stacks; the product's -O3, so the code checked is the code shipped."""
    if _flag("UNLEARN_EXT_SANITIZE", "0") != "1":
        return []
    return ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g",
            "-fno-wrapv"]  # Python's -fwrapv would define signed overflow and hide it from UBSan


def cpu_extension():
    sanitize = sanitizer_flags()
    # torch's CPU wheels for Linux use OpenMP for intra-op threads (elsewhere: its native pool,
    # which needs no flag).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    sources = ["csrc/bindings.cpp", "csrc/cpu/dispatch.cpp", "csrc/cpu/grad_pool.cpp"] + sorted(glob.glob("csrc/cpu/row_kernels_*.cpp"))
    return cpp_extension.CppExtension(
        "unlearn_ext._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # -fopenmp: at::parallel_for is a header template that splits rows across threads only
        # where _OPENMP is defined; without it every call ran on one thread. The runtime is
        # torch's own libgomp.so.1 (already loaded by torch under that soname), not a second one.
        # -fopenmp-simd: honour `#pragma omp simd` (vectorised reductions) where -fopenmp is off.
        # -fno-trapping-math: lets the compiler turn the clamps and selects of the kernels'
        # exp into vector blends (with traps assumed, every comparison stays a branch and no
        # loop vectorises). NaN and inf semantics are kept (no -ffast-math).
        extra_compile_args=["-O3", *openmp, "-fopenmp-simd", "-fno-math-errno",
                            "-fno-trapping-math", *sanitize],
        extra_link_args=[*openmp, *sanitize],
    )


def cuda_extension():
    """The CUDA extension, or None when it should not or cannot be built."""
    mode = _flag("UNLEARN_EXT_BUILD_CUDA", "auto")
    sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if mode == "0" or not sources:
        return None
    import torch

    have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if not have_cuda:
        if mode == "1":
            raise RuntimeError("UNLEARN_EXT_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")
        return None
    return cpp_extension.CUDAExtension(
        "unlearn_ext._C_cuda",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # No --use_fast_math: the kernels call the fast exponential where it is accurate
        # enough (csrc/cuda/row_thread.h) and keep the precise log, log1p and expm1 of the
        # per-row statistics.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )


ext_modules = []
if _flag("UNLEARN_EXT_BUILD_CPU", "1") != "0":
    ext_modules.append(cpu_extension())
cuda = cuda_extension()
if cuda is not None:
    ext_modules.append(cuda)

setup(ext_modules=ext_modules, cmdclass={"build_ext": cpp_extension.BuildExtension})
