# The two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s4l-installed

.PHONY: venv test demo lint serve bench clean images images-clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (s4l needs Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned to releases available from the local wheel store here.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/s4l demo

serve: $(STAMP)
	$(VENV)/bin/s4l serve --model $${S4L_MODEL:-demo-out/model.onnx}

# Every container image (serve, serve-gpu, train) on a private engine, from a local Debian base;
# writes the measured sizes and times into docker/README.md. See docker/build.sh.
images: $(STAMP)
	docker/build.sh images

images-clean:
	docker/build.sh clean

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build *.egg-info .pytest_cache
