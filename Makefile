# verimesh developer commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install system-deps test test-fast demo demo-mesh lint format bench fixtures circuits redteam regress regress-quick gpu-check clean

install: system-deps $(VENV)/.installed

# System packages the tests need, by their Debian names: postgresql (initdb and pg_ctl, on PATH or in
# /usr/lib/postgresql/<version>/bin) for the ledger's PostgreSQL tests, chromium (/usr/bin/chromium) for the
# browser tests. Only what is missing is installed, with apt-get as root or through sudo: where both are
# present this does nothing and needs no network.
system-deps:
	@missing=""; \
	if ! { command -v initdb && command -v pg_ctl; } >/dev/null 2>&1; then \
		pg=""; for d in /usr/lib/postgresql/*/bin; do [ -x "$$d/initdb" ] && [ -x "$$d/pg_ctl" ] && pg=1; done; \
		[ -n "$$pg" ] || missing="postgresql"; \
	fi; \
	[ -x /usr/bin/chromium ] || missing="$${missing:+$$missing }chromium"; \
	[ -n "$$missing" ] || exit 0; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "make system-deps: $$missing missing; install them (Debian package names) with your package manager" >&2; \
		exit 1; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else \
		echo "make system-deps: $$missing missing and no sudo; as root run: apt-get update && apt-get install -y $$missing" >&2; \
		exit 1; \
	fi; \
	echo "make system-deps: installing $$missing (apt-get)"; \
	$$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing

# torch is pinned (==2.13.0) in the dev extra: that takes the CPU wheel; a range pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash fixtures/demo.sh

# A coordinator and five nodes on loopback (one cheating, one dying; a 3-way split), narrated.
demo-mesh: install
	PATH="$(abspath $(BIN)):$$PATH" bash fixtures/demo_mesh.sh

# Lint, formatting, types, and the layer contract (tools/check_layers.py: imports run one way).
lint: install
	$(BIN)/ruff check verimesh tests fixtures tools .ci
	$(BIN)/ruff format --check verimesh tests fixtures tools .ci
	$(BIN)/mypy
	$(BIN)/python tools/check_layers.py

format: install
	$(BIN)/ruff format verimesh tests fixtures tools .ci
	$(BIN)/ruff check --fix verimesh tests fixtures tools .ci

fixtures: install
	$(BIN)/python fixtures/make_fixtures.py

# The reviewed circuit specs of the fixtures, built against the committed test-only SRS so that
# their verifying-key digests reproduce anywhere (tests/integration/test_committed_circuits.py).
TEST_SRS := fixtures/srs/kzg15.test-only.srs
circuits: install
	@test -f $(TEST_SRS) || $(BIN)/verimesh srs new --logrows 15 -o $(TEST_SRS)
	rm -rf circuits/mlp circuits/mlp-chain
	$(BIN)/verimesh circuit build fixtures/mlp.onnx --input fixtures/mlp.input.npy --srs $(TEST_SRS) -o circuits/mlp
	$(BIN)/verimesh circuit build fixtures/mlp.onnx --input fixtures/mlp.input.npy --srs $(TEST_SRS) --steps 2 \
		-o circuits/mlp-chain

# The full red-team run over the fixtures; its report and plot go to docs/.
redteam: install
	$(BIN)/verimesh redteam fixtures/mlp.onnx fixtures/rescnn.onnx fixtures/transformer.onnx --trials 200 \
		--honest 1000 --markdown docs/redteam.md --json bench-out/redteam.json --plot docs/redteam.png

# The project's proof regression suite (docs/ci.md): every case as written, and the quick profile
# that .ci/run runs after the tests. Reports (JUnit, JSON, markdown) go to bench-out/.
REGRESS := $(BIN)/verimesh regress fixtures/suite.toml --jobs 2
regress: install
	@mkdir -p bench-out
	$(REGRESS) --junit bench-out/regress.xml --json bench-out/regress.json --markdown bench-out/regress.md

regress-quick: install
	@mkdir -p bench-out
	$(REGRESS) --profile quick --junit bench-out/regress.xml --json bench-out/regress.json --markdown bench-out/regress.md

# Every docs/design.md §8 target and the step-cost check: builds the ResNet-50-size, recurrent and
# encoder models (100, 30 and 50 MB, not committed) once, then writes bench-out/bench.json and the
# generated part of docs/benchmarks.md (the analysis around it is kept).
bench: install
	@test -f bench-out/resnet50.onnx || $(BIN)/python fixtures/make_fixtures.py --resnet50 bench-out
	@test -f bench-out/recurrent.onnx || $(BIN)/python fixtures/make_fixtures.py --recurrent bench-out
	@test -f bench-out/encoder.onnx || $(BIN)/python fixtures/make_fixtures.py --encoder bench-out
	@test -f bench-out/lm-large.onnx || $(BIN)/python fixtures/make_fixtures.py --lm-large bench-out
	$(BIN)/verimesh bench --json bench-out/bench.json --markdown docs/benchmarks.md

# The CUDA path on a machine with a GPU (.ci/gpu_check.py: onnxruntime-gpu, or a PyTorch-on-CUDA estimate where
# onnxruntime is the CPU build). Downloads nothing and needs no `make install` where the dependencies are already
# importable (a GPU machine's own Python); writes bench-out/gpu-check.json. Exit 4: no GPU here.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) .ci/gpu_check.py --json bench-out/gpu-check.json

clean:
	rm -rf $(VENV) bench-out demo-out .pytest_cache .mypy_cache .ruff_cache .hypothesis
