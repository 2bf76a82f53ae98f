# Two commands set everything up on a fresh machine with Python 3.11:
#   make demo   virtual environment + install + full pipeline on the bundled CT + report
#   make test   the same environment + test extras + the whole pytest suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e '.[test,review]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vertebral-fracture demo -o demo-output

test: $(VENV)/.installed-test
	# the review app's browser tests drive Debian's chromium (never Playwright's download), and the DICOM SEG and SR
	# are checked by dicom3tools' validator (dciodvfy); as root, install what is missing
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="chromium"; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && apt-get install -y -qq $$missing >/dev/null) || echo "install of$$missing failed: their tests will skip"; \
		else echo "$$missing missing and not root: their tests will skip"; fi; \
	fi
	$(VENV)/bin/ruff check VertebralFractureLib VertebralFracture Testing benchmarks
	$(PY) -m pytest -q Testing

clean:
	rm -rf $(VENV) demo-output
