# Two entry points: `make demo` and `make test`. Both set up everything on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dpdiff-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install data demo test pretrain clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# animal-mnist pins old numpy/matplotlib it does not need: its data file is all we use
	$(PY) -m pip install -q --no-deps animal-mnist==0.4
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST (the private benchmark set) from Debian; without apt the loader falls back to the hub.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then echo "fashion-mnist: present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "warning: could not install dataset-fashion-mnist; the hub copy will be used"; \
	else echo "warning: no root/apt: run 'apt-get install dataset-fashion-mnist' or rely on the hub"; fi

# the demo's own folder is replaced on every run (use --output_dir elsewhere to keep results)
demo: install data
	rm -rf dpdiff-output
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no recipes/finetune_lora.py --config recipes/configs/finetune_lora.yaml

test: install data
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 tests

pretrain: install data
	HF_HUB_OFFLINE=1 $(PY) recipes/pretrain_public.py --output_dir dpdiff/presets/tiny-sd

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
