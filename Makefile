# The two commands of the README. Both set up .venv on first use (and again when the
# dependencies change), so a fresh clone needs nothing but python3.11 and make.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

.PHONY: demo test test-fast lint bench setup clean chromium nginx

# The demo's sites keep their privacy ledgers outside runs/demo, one per data set (see the
# README): a second `make demo` composes with the first and is refused, the budget being spent.
# For a fresh budget: FEDSLM_LEDGERS=$$(mktemp -d) make demo
demo: $(STAMP)
	$(VENV)/bin/fedslm simulate configs/demo.yaml --out runs/demo --overwrite
	$(VENV)/bin/fedslm report runs/demo
	$(VENV)/bin/fedslm verify runs/demo --keys runs/demo/sites

test: $(STAMP) chromium nginx
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest

# The unit tier alone (under a minute): pure logic, no training, no process started. While
# developing; `make test` (all three tiers) is what CI runs. docs/testing.md lists the tiers.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -m unit

# The privacy report is rendered in Debian's headless Chromium by one test. Installed here when
# this runs as root with apt (CI, a fresh machine); otherwise that test says why it skipped.
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the report rendering test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "note: /usr/bin/chromium is missing; the report rendering test will be skipped"; \
	  fi; }

# The reverse proxy tests run nginx in front of a real SuperLink. Installed here like chromium
# (nginx-light where the release still has it, else nginx); otherwise those tests say why they
# skipped. The tests start their own nginx from a generated config: nothing uses /etc/nginx.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's nginx for the reverse proxy tests"; \
	    apt-get update -qq && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
	      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }; \
	  else \
	    echo "note: nginx is missing; the reverse proxy tests will be skipped"; \
	  fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run_all

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	# torch first and exactly: a looser spec would pull the multi-GB CUDA build
	$(VENV)/bin/pip install --quiet -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

clean:
	rm -rf $(VENV) runs
