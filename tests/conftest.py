"""Shared fixtures: the embedded model (loaded once per session) and a tiny random GPT-2."""
from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch

from residual_bandwidth import capture_residuals, load_model

PROMPTS = [
    "The transformer architecture revolutionized natural language processing by introducing "
    "attention mechanisms.",
    "The capital of France is Paris.",
    "def add(a, b):\n    return a + b",
    "Water boils at one hundred degrees Celsius at sea level.",
]


@pytest.fixture(scope="session")
def embedded():
    return load_model("embedded")


@pytest.fixture(scope="session")
def embedded_capture(embedded):
    return capture_residuals(embedded.model, embedded.tokenizer, PROMPTS, batch_size=4, progress=False)


@pytest.fixture(scope="session")
def tiny_gpt2(embedded):
    """A randomly initialised GPT-2 (3 layers, d_model 64) sharing the embedded model's tokenizer,
    so the GPT-2 code path is tested offline."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=256,
                     vocab_size=len(embedded.tokenizer))
    return GPT2LMHeadModel(cfg).eval(), embedded.tokenizer


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a test module (restored afterwards). On a shared 2-core machine,
    two OpenMP threads competing with other processes made the small-tensor tests 4-50x slower.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_orthogonal(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: the real-browser test (JupyterLab in headless Chromium, "
                                       "about 1.5-3 minutes); deselect with -m 'not browser'")


@pytest.fixture(scope="session")
def executed_source(tmp_path_factory):
    """The lesson's source notebook executed once per test session with papermill on the embedded
    model (shared by tests/test_lesson.py and tests/test_lesson_claims.py)."""
    from pathlib import Path

    import nbformat
    import papermill as pm

    from residual_bandwidth.course import load_lesson
    meta = load_lesson()
    source = Path(__file__).resolve().parents[1] / "solutions" / meta.lesson_id / meta.notebook
    os.environ.setdefault("RESIDUAL_BANDWIDTH_STATIC", "1")
    out = tmp_path_factory.mktemp("pm") / "executed.ipynb"
    pm.execute_notebook(str(source), str(out), parameters={"MODEL": "embedded"}, kernel_name="python3",
                        progress_bar=False, cwd=str(source.parent))
    return nbformat.read(out, 4)
