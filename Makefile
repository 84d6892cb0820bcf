# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv if absent, install torch==2.13.0 FIRST (a local CPU build; a looser requirement
# would pull a multi-GB CUDA build), then the project with its extras.

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
JFE     := $(BIN)/jfe
STAMP   := $(VENV)/.jfe-installed
RUNS    ?= runs
DATA    ?= $(RUNS)/minibeir
export JFE_CACHE ?= $(HOME)/.cache/jfe

.PHONY: onnx-parity venv assets browser-deps minibeir pretrain test test-slow test-all lint demo demo-seeds ablations reproduce shipped-weights rerank bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray,onnx,openvino,sentence-transformers,lancedb,distributed]'
	touch $(STAMP)

# The two small icon sets the pretraining-corpus tests build from; `make pretrain` fetches the whole corpus.
assets: venv
	$(JFE) assets fetch
	$(JFE) assets fetch iconify_game_icons iconify_maki

# The browser test drives Debian's Chromium; install it from the distribution, never a download of its own.
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

# Built once: the build writes its README last, so a complete build is a file target (`make clean` or
# deleting $(DATA) rebuilds it); a second `make demo` then skips straight to cached work.
minibeir: $(DATA)/README.md

$(DATA)/README.md: | assets
	$(JFE) data build-minibeir --out $(DATA)
	$(JFE) data validate $(DATA)

# The stage-1 pretraining corpus (docs/pretrain.md): ~0.5 GB of packages, built once like MiniBEIR.
PRETRAIN ?= $(RUNS)/pretrain
pretrain: $(PRETRAIN)/README.md

$(PRETRAIN)/README.md: | minibeir
	$(JFE) assets fetch --pretrain
	$(JFE) data build-pretrain --out $(PRETRAIN) --minibeir $(DATA)
	$(JFE) data validate $(PRETRAIN)

test: assets browser-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: assets
	$(BIN)/python -m pytest -m "slow" -q

test-all: assets browser-deps
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

# The demo's trained models become what the names mean (`jfe models list`: trained, tag demo).
# PRECISION=fp32 gives the same numbers on every CPU; auto computes in bf16 where the CPU has it (faster).
PRECISION ?= auto
DEMO_MODELS := jfe-mini:jfe-mini two-tower:two-tower-mini late-fusion-sf:late-fusion-sf-mini late-fusion-ff:late-fusion-ff-mini
demo: minibeir
	$(JFE) demo --data $(DATA) --out $(RUNS)/demo --precision $(PRECISION)
	for pair in $(DEMO_MODELS); do $(JFE) models register $${pair#*:} $(RUNS)/demo/models/$${pair%%:*}/final \
	  --tag demo || exit 1; done

# The demo again with more seeds (seed 0 is the demo itself, reused when done): how much of the result is noise.
SEEDS ?= 1 2
demo-seeds: demo
	for s in $(SEEDS); do $(JFE) demo --data $(DATA) --out $(RUNS)/demo-seed$$s --seed $$s --precision $(PRECISION) || exit 1; done
	for p in local global; do $(JFE) seeds-report --out $(RUNS)/demo-seeds/$$p \
	  $(foreach m,jfe-mini two-tower late-fusion-sf late-fusion-ff,$(RUNS)/demo/eval/$$p/$(m) \
	  $(foreach s,$(SEEDS),$(RUNS)/demo-seed$(s)/eval/$$p/$(m))) || exit 1; done

ablations: minibeir
	$(JFE) demo --data $(DATA) --out $(RUNS)/ablations --ablations --precision $(PRECISION)

# The comparison at convergence (not part of the demo): learning curves of the four models to a plateau, 3 seeds
# at that budget, bootstrap CIs. The published run (README) trains every model with configs/reproduce: stage 1
# the long alignment (600 x 128 caption pairs, heads only) on MiniBEIR's own pairs, stage 2 with the top 5
# MobileNetV2 modules trained; 480-step curves. STAGE1_DATA=corpus trains stage 1 on $(CORPUS) instead (built
# first). Report under $(RUNS)/reproduce/report, copied into docs/results.
CORPUS ?= $(PRETRAIN)
STAGE1_DATA ?= minibeir
REPRODUCE_ARGS ?= --configs configs/reproduce --stage1-steps 600 --curve-steps 480 --val-every 120 \
  --set val_max_queries=384 --set val_max_pool=200
reproduce: minibeir $(if $(filter corpus,$(STAGE1_DATA)),pretrain)
	$(JFE) reproduce --data $(DATA) --corpus $(CORPUS) --stage1-data $(STAGE1_DATA) --out $(RUNS)/reproduce \
	  --publish docs/results --precision $(PRECISION) $(REPRODUCE_ARGS)

# The trained weights inside the package (src/jfe/models/weights): jfe-mini and the two-tower trained with the
# reproduce recipe for 3 seeds, compacted (fp16, low-rank tower deltas), trained vs compact R@5 measured over the
# seeds (docs/results/shipped_weights.md), seed 0 installed. About 1.5 h on 2 cores.
shipped-weights: minibeir
	$(JFE) ship-weights --data $(DATA) --out $(RUNS)/ship --install src/jfe/models/weights \
	  --publish docs/results/shipped_weights.md

# Reranking (docs/results/rerank.md): the two-tower's training lists mined, jfe-mini-rerank and the late-fusion
# reranker trained on them for 3 seeds, both measured after the two-tower on MiniBEIR test (local and global pools)
# with bootstrap CIs. About 2 h on 2 cores.
rerank: minibeir
	$(JFE) rerank-study --data $(DATA) --out $(RUNS)/rerank --precision $(PRECISION) --publish docs/results/rerank.md

# ONNX Runtime vs PyTorch: R@5 parity per category on MiniBEIR (jfe-mini and two-tower-mini, both pools)
onnx-parity: minibeir
	$(BIN)/python benchmarks/onnx_parity.py --data $(DATA) --out $(RUNS)/onnx_parity

bench: venv
	$(BIN)/python benchmarks/backends.py --out $(RUNS)/bench/backends.json
	$(BIN)/python benchmarks/encode_throughput.py --out $(RUNS)/bench/encode_throughput.json
	$(BIN)/python benchmarks/search_latency.py --out $(RUNS)/bench/search_latency.json
	$(BIN)/python benchmarks/train_throughput.py --out $(RUNS)/bench/train_throughput.json
	$(BIN)/python benchmarks/serve_load.py --out $(RUNS)/bench/serve_load.json

clean:
	rm -rf $(RUNS) .pytest_cache .ruff_cache
