# Two commands do all set-up on a fresh machine with Python >= 3.11 and pip:
#   make demo   -- installs into .venv, then runs the flagship experiments and prints the report path
#   make test   -- installs into .venv, then runs the test suite
VENV ?= .venv
PYTEST_ARGS ?= -n auto
# Hypothesis profile of tests/conftest.py: "ci" draws the same examples every run and keeps no
# example database; HYPOTHESIS_PROFILE=dev explores fresh examples.
HYPOTHESIS_PROFILE ?= ci

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/guided-descent run

test: setup
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
