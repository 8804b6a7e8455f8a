# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
MODULE ?= $(DATA)/modules/mobilenet_v2_035_224
DEMO_OUT ?= demo_out
DEMO_PHOTOS ?= 20
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

# The point of the tool: 20 photos of cats and 20 of dogs, tested on the 1,000 held-out ones, then one prediction.
demo: install
	$(BIN)/python scripts/demo_photos.py $(DATA)/cats_and_dogs_filtered/train $(DEMO_OUT)/photos $(DEMO_PHOTOS)
	$(BIN)/retrain train $(DEMO_OUT)/photos --module $(MODULE) --test-dir $(DATA)/cats_and_dogs_filtered/validation \
		--output $(DEMO_OUT)/model --overwrite
	$(BIN)/retrain predict $(DEMO_OUT)/model/model_int8.tflite $(DATA)/cats_and_dogs_filtered/validation/dogs/dog.2000.jpg

# Benchmarks on ../shared/data (not part of `make test`): a table of ratios, JSON in bench/results/.
# `make bench BENCH_ARGS="--quick"` for a smoke run; `--only baseline --images DIR` for other data.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

sample-data: install
	$(BIN)/python scripts/make_sample_data.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
