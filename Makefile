# ringlab: the two commands of the README (figures, test), and two more.
#   make figures   set up, then execute every notebook with papermill and rewrite figures/ (and its index.html)
#   make test      set up, then run the whole test suite
#   make bench     set up, then run every benchmark (BENCH_ARGS=--quick for a smoke test)
#   make mutants   plant the known bugs of tools/mutants.py in a copy; every one must fail a test
# Each creates (or refreshes, when pyproject.toml changes) a virtual environment in .venv.
#
# TORCH picks the torch build. The default, torch==2.13.0, is the CPU wheel on the CI and
# workbench machines. On a GPU machine install a CUDA torch first, e.g.
#   make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup browser test mutants figures bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[workbench,test,hf]"
	touch $@

# Chromium renders PNG, PDF and SVG figures (kaleido) and runs the browser tests (Playwright).
browser:
	@sh tools/ensure-chromium

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# About 3 minutes on 2 cores; CI runs it after the tests.
mutants: setup
	$(BIN)/python tools/mutants.py

figures: setup browser
	$(BIN)/ringlab figures

bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs test-artifacts .pytest_cache .hypothesis
