# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODULE ?= ../shared/data/modules/mobilenet_v2_035_224
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test demo bench sample-data clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# pytest exits 5 when it collected no test: a run that tested nothing is a failure here.
test: install
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

demo: install
	$(BIN)/retrain train sample_data --module $(MODULE) --output $(DEMO_OUT) --overwrite

# Benchmarks on ../shared/data (not part of `make test`): a table of ratios, JSON in bench/results/.
# `make bench BENCH_ARGS="--quick"` for a smoke run; `--only baseline --images DIR` for other data.
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

sample-data: install
	$(BIN)/python scripts/make_sample_data.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
