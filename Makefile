# One command sets up a fresh machine and runs: `make test`, `make demos`, `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demos demo loc-demo install clean ui-check ui-docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the declared dependencies change.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The demos' quality checks (minutes each) run apart: `make demos`; CI (.ci/run) runs both.
DEMO_TESTS := tests/test_loc_demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests $(addprefix --ignore=,$(DEMO_TESTS))

demos: $(STAMP)
	$(PY) -m pytest -q $(DEMO_TESTS)

demo: $(STAMP)
	$(PY) -m jobs.demo

loc-demo: $(STAMP)
	$(PY) -m jobs.loc_demo

# Not part of `make test`: the demo's runs in the MLflow UI, rendered by headless Chromium (Debian's
# package; Playwright drives it and downloads no browser); screenshots to demo-out/ui-check/, or, with
# `make ui-docs`, to the README's docs/images/.
ui-check: $(STAMP)
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium chromium-driver)
	$(PY) -m pip install -q playwright
	$(PY) -m jobs.ui_check $(UI_ARGS)

ui-docs:
	$(MAKE) ui-check UI_ARGS="--images docs/images"

clean:
	rm -rf $(VENV) .pytest_cache demo-out loc-demo-out
