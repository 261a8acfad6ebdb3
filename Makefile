# Two commands: `make demo` (the main job) and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench docs venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so no dependency can pull a CUDA build of several GB.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,viz,lra,hf,docs,longdoc,native]"
	touch $(STAMP)

venv: $(STAMP)

# This machine's calibration first (once per machine: ~15 s, and ~40 s to compile the fused tile step), then
# the quick Long Range Arena suite (generated ListOps + Pathfinder, every attention variant, speed/memory
# table: results/lra/report.md and .html), then the quick legal benchmark on the ScanCode LicenseDB (retrieval
# and classification, every system: results/longdoc/quick/report.md and .html). 12-15 minutes on 2 cores.
demo: $(STAMP)
	$(VENV)/bin/longattn calibrate --no-progress
	$(VENV)/bin/longattn lra suite --quick --out results/lra
	$(VENV)/bin/longattn longdoc run --quick --out results/longdoc

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/longattn bench --out results/bench

# The documentation as a browsable site in site/ (open site/index.html), the API reference included.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) results site .pytest_cache
