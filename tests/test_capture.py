"""Residual capture: the block identities hold on real weights, padding never leaks, hooks go away."""
from __future__ import annotations

import pytest
import torch

from residual_bandwidth import BandwidthInputError, ResidualCapture, capture_residuals, hook_name, load_model
from residual_bandwidth.capture import architecture_of, model_dims
from conftest import PROMPTS


def assert_identities(cap, atol_rel=1e-5):
    for L in cap.layers:
        pre, mid, post = (cap.get(k, L) for k in ("resid_pre", "resid_mid", "resid_post"))
        scale = post.abs().max()
        assert torch.allclose(pre + cap.get("attn_out", L), mid, atol=atol_rel * scale), f"resid_mid, layer {L}"
        assert torch.allclose(mid + cap.get("mlp_out", L), post, atol=atol_rel * scale), f"resid_post, layer {L}"
        if L + 1 in cap.layers:
            assert torch.equal(post, cap.get("resid_pre", L + 1)), f"resid_post[{L}] != resid_pre[{L + 1}]"


def test_identities_on_embedded_model(embedded_capture):
    cap = embedded_capture
    assert cap.n_layers == 30 and cap.d_model == 576
    assert_identities(cap)


def test_identities_on_random_gpt2(tiny_gpt2):
    model, tok = tiny_gpt2
    cap = capture_residuals(model, tok, PROMPTS, batch_size=3, progress=False)
    assert cap.n_layers == 3 and cap.d_model == 64
    assert_identities(cap)


def test_resid_post_of_last_layer_is_before_final_norm(embedded, embedded_capture):
    """HF's hidden_states[-1] has the final norm applied; our resid_post does not.

    A separate model instance: output_hidden_states=True makes transformers leave its own
    output-capturing hooks on the model, which would disturb hook-counting tests elsewhere."""
    own = load_model("embedded")
    enc = own.tokenizer(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        hs = own.model(**enc, output_hidden_states=True).hidden_states
    rows = embedded_capture.prompt_index == 1
    assert torch.allclose(embedded_capture.get("resid_pre", 0)[rows], hs[0][0], atol=1e-5)
    assert torch.allclose(embedded_capture.get("resid_post", 10)[rows], hs[11][0], rtol=1e-4, atol=1e-3)
    final_norm = own.model.model.norm
    assert torch.allclose(final_norm(embedded_capture.get("resid_post", 29)[rows]), hs[30][0], rtol=1e-4, atol=1e-3)


def test_padding_never_enters(embedded, embedded_capture):
    """Each prompt captured alone equals its rows in the padded batch; row count = real tokens."""
    n_tokens = sum(len(embedded.tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert embedded_capture.n_rows == n_tokens
    for i, p in enumerate(PROMPTS):
        alone = capture_residuals(embedded.model, embedded.tokenizer, p, kinds=["resid_post"], progress=False)
        rows = embedded_capture.prompt_index == i
        assert alone.n_rows == int(rows.sum())
        for L in (0, 15, 29):
            a, b = alone.get("resid_post", L), embedded_capture.get("resid_post", L)[rows]
            assert torch.allclose(a, b, atol=1e-4 * a.abs().max()), (i, L)


def test_tokens_and_positions_line_up(embedded, embedded_capture):
    cap = embedded_capture
    rows = (cap.prompt_index == 1).nonzero().flatten().tolist()
    assert [int(cap.position[r]) for r in rows] == list(range(len(rows)))
    assert "".join(cap.tokens[r] for r in rows) == PROMPTS[1]


def test_hooks_removed_even_after_an_error(tiny_gpt2):
    model, tok = tiny_gpt2
    boom = model.transformer.h[1].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_residuals(model, tok, ["hello world"], progress=False)
    finally:
        boom.remove()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_layer_and_kind_selection(tiny_gpt2):
    model, tok = tiny_gpt2
    cap = capture_residuals(model, tok, ["one two three"], kinds=["resid_mid"], layers=[2], progress=False)
    assert list(cap.acts) == ["blocks.2.hook_resid_mid"]
    with pytest.raises(BandwidthInputError, match="was not captured"):
        cap.get("resid_pre", 2)
    with pytest.raises(BandwidthInputError, match="out of range"):
        capture_residuals(model, tok, ["x"], layers=[3], progress=False)
    with pytest.raises(BandwidthInputError, match="kind"):
        capture_residuals(model, tok, ["x"], kinds=["resid_middle"], progress=False)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(BandwidthInputError, match=r"model type 'bert' is not supported.*Supported: \["):
        architecture_of(bert)


def test_model_dims(embedded, tiny_gpt2):
    assert model_dims(embedded.model) == {"model_type": "llama", "d_model": 576, "n_layers": 30, "n_heads": 9,
                                          "n_kv_heads": 3, "d_head": 64, "d_mlp": 1536, "vocab_size": 49152}
    d = model_dims(tiny_gpt2[0])
    assert (d["d_model"], d["n_layers"], d["d_mlp"], d["d_head"]) == (64, 3, 256, 16)


def test_from_hook_dict_and_from_list():
    b, t, d = 2, 5, 8
    cache = {hook_name("resid_pre", 0): torch.randn(b, t, d), hook_name("resid_post", 0): torch.randn(b, t, d),
             "blocks.0.attn.hook_pattern": torch.randn(b, 2, t, t)}
    cap = ResidualCapture.from_hook_dict(cache)
    assert cap.n_rows == b * t and cap.kinds == ["resid_pre", "resid_post"]
    assert cap.prompt_index.tolist() == [0] * t + [1] * t and cap.position.tolist() == list(range(t)) * 2
    assert torch.equal(cap.get("resid_pre", 0), cache["blocks.0.hook_resid_pre"].reshape(-1, d))
    listed = ResidualCapture.from_list([torch.randn(6, d) for _ in range(3)])
    assert listed.layers == [0, 1, 2] and listed.kinds == ["resid_post"]
    with pytest.raises(BandwidthInputError, match="no key of the form"):
        ResidualCapture.from_hook_dict({"embed": torch.randn(3, 4)})
    with pytest.raises(BandwidthInputError, match="6 positions but layer 0 has 5"):
        ResidualCapture.from_list([torch.randn(5, d), torch.randn(6, d)])
    with pytest.raises(BandwidthInputError, match="d_model"):
        ResidualCapture.from_hook_dict({hook_name("resid_pre", 0): torch.randn(4, 8),
                                        hook_name("resid_pre", 1): torch.randn(4, 9)})


def test_missing_tokenizer_is_named(tiny_gpt2):
    model, _ = tiny_gpt2
    with pytest.raises(BandwidthInputError, match="tokenizer: expected a Hugging Face tokenizer.*NoneType"):
        capture_residuals(model, None, ["hello"], progress=False)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "512"])
def test_max_length_must_be_a_positive_int(tiny_gpt2, bad):
    model, tok = tiny_gpt2
    with pytest.raises(BandwidthInputError, match="max_length: expected a positive int"):
        capture_residuals(model, tok, ["hello world"], max_length=bad, progress=False)


def test_prompts_longer_than_the_context_are_clamped_and_named(tiny_gpt2):
    """A prompt longer than the model's position embeddings (tiny GPT-2: 256) used to end in torch's
    embedding IndexError; it is truncated to the model's maximum, with a warning naming the limit."""
    model, tok = tiny_gpt2
    long_prompt = "the cat sat on the mat and " * 60
    assert len(tok(long_prompt)["input_ids"]) > 256
    with pytest.warns(UserWarning, match="maximum of 256 positions.*max_length=2048"):
        cap = capture_residuals(model, tok, [long_prompt, "short"], kinds=["resid_post"],
                                max_length=2048, progress=False)
    assert int((cap.prompt_index == 0).sum()) == 256
    assert cap.get("resid_post", 0).shape == (256 + len(tok("short")["input_ids"]), 64)


def test_torch_threads_sets_and_restores_and_none_touches_nothing(monkeypatch):
    from residual_bandwidth.capture import torch_threads
    calls, real, before = [], torch.set_num_threads, torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    with torch_threads(None):
        pass
    assert calls == []                                   # the monitor's single_thread=False path
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert calls == [1, before] and torch.get_num_threads() == before
    with pytest.raises(ValueError), torch_threads(1):
        raise ValueError("restored on errors too")
    assert torch.get_num_threads() == before
