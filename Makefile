# DeepRegistration — the two commands of the README:
#   make demo   set up .venv, register the bundled sample pair, write outputs + report.png
#   make test   set up .venv with the test dependencies and run the whole pytest suite
# Other targets: make benchmark (engine vs ANTs SyN vs elastix), make clean.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch 2.13.0 is pinned so pip takes the CPU build (a plain 'torch' pulls a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
SAMPLE := DeepRegistration/Resources/SampleData
DEMO_OUT ?= demo-output

.PHONY: demo test benchmark clean venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/deepregistration register $(SAMPLE)/fixed.nii.gz $(SAMPLE)/moving.nii.gz -o $(DEMO_OUT) --overwrite \
	    --fixed-labels $(SAMPLE)/fixed_labels.nii.gz --moving-labels $(SAMPLE)/moving_labels.nii.gz \
	    --fixed-landmarks $(SAMPLE)/fixed_landmarks.csv --moving-landmarks $(SAMPLE)/moving_landmarks.csv
	@echo "report image: $(DEMO_OUT)/report.png"

test: $(VENV)/.installed
	$(PY) -m pytest Testing -q -p no:cacheprovider

$(VENV)/.benchmark: $(VENV)/.installed
	$(PIP) install -q -e ".[benchmark]"
	touch $@

benchmark: $(VENV)/.benchmark
	$(PY) benchmarks/run_benchmark.py --out benchmarks/results

clean:
	rm -rf $(DEMO_OUT) benchmarks/results .pytest_cache
