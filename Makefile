# The two commands of README.md:
#   make serve  - set everything up and run resticd on https://127.0.0.1:8000
#   make test   - set everything up, type-check and run the test suite

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
VAR := var
PORT ?= 8000

.PHONY: serve test check typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A development install: the dependencies from setup.py, and the checkout
# itself on sys.path (a .pth file), so that the resticd package and the twistd
# plugin in twisted/plugins/ are used in place; Twisted finds plugins by
# scanning sys.path for twisted/plugins/ directories. No build/ is made or read.
$(STAMP): setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -c 'import site, sys; open(site.getsitepackages()[0] + "/resticd-checkout.pth", "w").write(sys.argv[1] + "\n")' "$(CURDIR)"
	rm -f $(VENV)/.installed-*
	touch $@

$(VAR)/tls/cert.pem: | $(STAMP)
	$(BIN)/python -m resticd.certs $(VAR)/tls >/dev/null

serve: $(STAMP) $(VAR)/tls/cert.pem
	@mkdir -p $(VAR)/data
	@echo
	@echo "resticd is starting on https://127.0.0.1:$(PORT) (no authentication). Try:"
	@echo
	@echo "  restic -r rest:https://127.0.0.1:$(PORT)/myrepo --cacert $(CURDIR)/$(VAR)/tls/cert.pem init"
	@echo
	$(BIN)/twistd --nodaemon --pidfile= resticd --path $(VAR)/data --no-auth \
		--tls-cert $(VAR)/tls/cert.pem --tls-key $(VAR)/tls/key.pem \
		--listen tcp:$(PORT):interface=127.0.0.1

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/ruff check --quiet --select F resticd tests twisted bench

test: $(STAMP) typecheck
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(VAR) build dist *.egg-info .mypy_cache .pytest_cache .hypothesis
