# Two commands for a newcomer: `make demo` (install + the whole job on embedded defaults)
# and `make test` (install + the test suite against local Redis and PostgreSQL).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install demo test lint clean-demo

$(BIN)/bonexray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,report,dev]'
	touch $@

install: $(BIN)/bonexray

# Synthesise a small archive, train briefly on the CPU, export, classify it, print results.
demo: install
	rm -rf $(DEMO)
	$(BIN)/bonexray synth $(DEMO)/data --studies 120 --seed 0
	$(BIN)/bonexray train $(DEMO)/data --out $(DEMO)/run --epochs 2 --image-size 96 --batch-size 16
	$(BIN)/bonexray export $(DEMO)/run/best.pt --out $(DEMO)/model.onnx
	$(BIN)/bonexray run $(DEMO)/data/valid --model $(DEMO)/model.onnx --db sqlite:///$(DEMO)/bonexray.db
	$(BIN)/bonexray results --db sqlite:///$(DEMO)/bonexray.db --limit 20

test: install
	$(BIN)/ruff check bonexray tests benchmarks
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check bonexray tests benchmarks
	$(BIN)/mypy bonexray

clean-demo:
	rm -rf $(DEMO)
