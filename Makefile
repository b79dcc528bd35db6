# Set-up and checks. `make demo` and `make test` are the two commands of the README.
PYTHON ?= python
# A CPU build of torch installed first, so that the package's torch range installs nothing more.
# On a GPU machine use: make install TORCH_SPEC="torch"  (or install your CUDA torch first).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast bench

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
