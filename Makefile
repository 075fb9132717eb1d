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

# Synthesise a small archive (metal hardware as the abnormal sign: learnt in CPU minutes),
# train on the CPU, export, classify the validation studies, print results and metrics.
demo: install
	rm -rf $(DEMO)
	$(BIN)/bonexray synth $(DEMO)/data --studies 300 --seed 1 --image-size 80 --signs hardware
	$(BIN)/bonexray train $(DEMO)/data --out $(DEMO)/run --epochs 6 --image-size 64 --batch-size 16
	$(BIN)/bonexray export $(DEMO)/run/best.pt --out $(DEMO)/model.onnx
	$(BIN)/bonexray run $(DEMO)/data/valid --model $(DEMO)/model.onnx --db sqlite:///$(DEMO)/bonexray.db
	$(BIN)/bonexray results --db sqlite:///$(DEMO)/bonexray.db --order -score --limit 15
	$(BIN)/bonexray evaluate --db sqlite:///$(DEMO)/bonexray.db

test: install
	$(BIN)/ruff check bonexray tests benchmarks
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check bonexray tests benchmarks
	$(BIN)/mypy bonexray

clean-demo:
	rm -rf $(DEMO)
