# Set-up and checks. `make demo` and `make test` are the two commands of the README.
PYTHON ?= python
# A CPU build of torch installed first, so that the package's torch range installs nothing more.
# On a GPU machine use: make install TORCH_SPEC="torch"  (or install your CUDA torch first).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast bench gpu-bundle

install:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) recipes/train.py --recipe megadoc_stitch

test: install
	$(PYTHON) -m pytest -x -q

test-fast:
	$(PYTHON) -m pytest -x -q -m "not slow"

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
