# lmstrain: `make demo` trains the demo model on synthetic data, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test test-slow clean-demo bench-pipeline bench-lms bench-sim bench-maxres \
        bench-overhead bench-distribute bench-recompute bench-lean-norm bench-update-order \
        bench-peers bench-study bench-report bench-all

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

demo_data/.complete: | install
	$(BIN)/lmstrain synth demo_data --cases 24 --shape 64 64 64 --seed 0
	touch $@

demo: install demo_data/.complete
	$(BIN)/lmstrain fit configs/demo.yaml

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

# Benchmarks write bench/results/*.json; each figure says how it was measured.
bench-pipeline: install
	$(BIN)/python scripts/bench_pipeline.py --out bench/results/pipeline.json

bench-lms: install
	$(BIN)/python scripts/lms_effect.py

bench-sim: install
	$(BIN)/python scripts/validate_simulator.py --out bench/results/simulator_accuracy.json
	$(BIN)/python scripts/validate_model.py --out bench/results/simulator_mobilenetv2.json

# Sweeps resume: delete bench/results/maxres-* to measure again from scratch.
bench-maxres: install
	$(BIN)/lmstrain maxres configs/demo.yaml --device-memory 256MiB --sizes 40:160:8 \
		--batch-sizes 1 --out bench/results/maxres-cpu --resume
	$(BIN)/lmstrain maxres configs/demo.yaml --set model.split_concat=true \
		--device-memory 256MiB --sizes 40:160:8 --batch-sizes 1 \
		--out bench/results/maxres-cpu-split --resume
	$(BIN)/lmstrain maxres configs/demo.yaml --set model.split_concat=true \
		--set model.norm=instance_lean --device-memory 256MiB --sizes 40:160:8 \
		--batch-sizes 1 --out bench/results/maxres-cpu-split-lean --resume
	$(BIN)/lmstrain maxres configs/brats2021_isensee.yaml --mode simulate --executor gpu \
		--device-memory 16GiB,32GiB,40GiB,80GiB --sizes 128:512:16 \
		--out bench/results/maxres-sim --resume
	$(BIN)/lmstrain maxres configs/brats2021_isensee.yaml --mode simulate --executor gpu \
		--set model.split_concat=true --set model.norm=instance_lean \
		--device-memory 16GiB --sizes 128:512:16 \
		--out bench/results/maxres-sim-split-lean --resume

bench-overhead: install
	$(BIN)/python scripts/bench_overhead.py --out bench/results/overhead.json

bench-distribute: install
	$(BIN)/python scripts/bench_distribute.py --out bench/results/distribute.json

bench-recompute: install
	$(BIN)/python scripts/bench_recompute.py --out bench/results/recompute.json

bench-lean-norm: install
	$(BIN)/python scripts/bench_lean_norm.py --out bench/results/lean_norm.json

bench-update-order: install
	$(BIN)/python scripts/bench_update_order.py --out bench/results/update_order.json

# Resumes: delete bench/results/peers to measure again from scratch.
bench-peers: install
	$(BIN)/python scripts/bench_peers.py --out bench/results/peers

bench/data/study-fine/.complete: | install
	$(BIN)/lmstrain synth bench/data/study-fine --cases 40 --shape 128 128 128 --seed 1 \
		--detail fine
	touch $@

# Resumes: delete bench/results/study to train again from scratch.
bench-study: install bench/data/study-fine/.complete
	$(BIN)/lmstrain study configs/study.yaml --sizes 32,48,64 --device-memory 256MiB \
		--out bench/results/study --resume

bench-report: install
	$(BIN)/python scripts/bench_report.py

bench-all: bench-pipeline bench-lms bench-sim bench-maxres bench-overhead bench-distribute \
           bench-recompute bench-lean-norm bench-update-order bench-peers bench-study
	$(MAKE) bench-report

clean-demo:
	rm -rf demo_data runs/demo-*
