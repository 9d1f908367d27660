"""Weights in the residual basis reproduce the model's own forward computation."""
from __future__ import annotations

import pytest
import torch

from residual_bandwidth import BandwidthInputError, capture_residuals
from residual_bandwidth.weights import (all_layer_weights, attention_write, factored_svd, layer_weights,
                                        mlp_activations, mlp_write, normalize_residual)
from references import attention_patterns

PROMPT = "The capital of France is Paris, and the river is the Seine."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(tokenizer, attention_bias=False, mlp_bias=False, seed=0):
    """A random Llama with grouped-query attention (4 query heads share 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                      attention_bias=attention_bias, mlp_bias=mlp_bias, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm gains and biases, so folding them is actually tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def randomize_gpt2_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def check_forward(model, tok, layers, rtol=1e-4):
    """attn_out and mlp_out recomputed from the extracted weights equal the captured ones."""
    cap = capture_residuals(model, tok, [PROMPT], progress=False)
    pats = attention_patterns(model, tok, PROMPT, layers)
    for L in layers:
        lw = layer_weights(model, L)
        x_hat = normalize_residual(model, cap.get("resid_pre", L), L, "attn")
        ref = cap.get("attn_out", L)
        got = attention_write(lw, x_hat, pats[L])
        assert (got - ref).norm() <= rtol * ref.norm(), f"attention write, layer {L}"
        per_head = attention_write(lw, x_hat, pats[L], per_head=True)
        bias = lw.b_O if lw.b_O is not None else 0
        assert torch.allclose(per_head.sum(0) + bias, got, atol=1e-5 * ref.abs().max())
        x_hat2 = normalize_residual(model, cap.get("resid_mid", L), L, "mlp")
        ref2 = cap.get("mlp_out", L)
        assert (mlp_write(lw, x_hat2) - ref2).norm() <= rtol * ref2.norm(), f"MLP write, layer {L}"


def test_llama_weights_reproduce_forward_on_embedded_model(embedded):
    check_forward(embedded.model, embedded.tokenizer, [0, 14, 29])


def test_gpt2_weights_reproduce_forward_with_layernorm_folded(tiny_gpt2):
    import copy
    model, tok = tiny_gpt2
    model = randomize_gpt2_norms(copy.deepcopy(model))
    check_forward(model, tok, [0, 1, 2])


def test_gqa_llama_with_biases_reproduces_forward(embedded):
    model = tiny_llama(embedded.tokenizer, attention_bias=True, mlp_bias=True)
    check_forward(model, embedded.tokenizer, [0, 1])
    lw = layer_weights(model, 0)
    assert lw.kv_head == [0, 0, 1, 1]
    assert torch.equal(lw.W_K[0], lw.W_K[1]) and torch.equal(lw.W_V[2], lw.W_V[3])
    assert not torch.equal(lw.W_V[1], lw.W_V[2])


def test_shapes_and_circuits(embedded):
    lw = layer_weights(embedded.model, 3)
    H, d, dh, dm = 9, 576, 64, 1536
    assert lw.W_Q.shape == lw.W_K.shape == lw.W_V.shape == (H, d, dh)
    assert lw.W_O.shape == (H, dh, d) and lw.W_in.shape == lw.W_gate.shape == (d, dm)
    assert lw.W_out.shape == (dm, d)
    assert lw.W_OV.shape == lw.W_QK.shape == (H, d, d)
    assert torch.allclose(lw.W_OV[4], lw.W_V[4] @ lw.W_O[4])
    assert torch.allclose(lw.W_QK[4], lw.W_Q[4] @ lw.W_K[4].T)
    assert torch.linalg.matrix_rank(lw.W_OV[4].double(), rtol=1e-4) <= dh
    # the RMSNorm gain is folded into the reading weights
    q_raw = embedded.model.model.layers[3].self_attn.q_proj.weight.detach().T[:, 4 * dh:5 * dh]
    g = embedded.model.model.layers[3].input_layernorm.weight.detach()
    assert torch.allclose(lw.W_Q[4], g[:, None] * q_raw)


def test_one_token_input_is_the_ov_circuit(tiny_gpt2, embedded):
    """With one token every head attends to itself: attn_out = x_hat sum_h W_OV[h] + bias terms."""
    import copy
    gpt2 = randomize_gpt2_norms(copy.deepcopy(tiny_gpt2[0]))
    for model, tok in ((gpt2, tiny_gpt2[1]), (embedded.model, embedded.tokenizer)):
        cap = capture_residuals(model, tok, ["Hello"], kinds=["resid_pre", "attn_out"], layers=[1],
                                progress=False)
        assert cap.n_rows == 1
        lw = layer_weights(model, 1)
        x_hat = normalize_residual(model, cap.get("resid_pre", 1), 1)
        want = x_hat @ lw.W_OV.sum(0)
        if lw.b_V is not None:
            want = want + torch.einsum("he,hed->d", lw.b_V, lw.W_O)
        if lw.b_O is not None:
            want = want + lw.b_O
        ref = cap.get("attn_out", 1)
        assert (want - ref).norm() <= 1e-4 * ref.norm()


def test_gpt2_qk_circuit_gives_the_attention_pattern(tiny_gpt2):
    """GPT-2 has no rotary embedding, so W_Q / W_K (with biases) reproduce the pattern exactly."""
    import copy
    model, tok = tiny_gpt2
    model = randomize_gpt2_norms(copy.deepcopy(model))
    cap = capture_residuals(model, tok, [PROMPT], kinds=["resid_pre"], layers=[2], progress=False)
    pat = attention_patterns(model, tok, PROMPT, [2])[2]
    lw = layer_weights(model, 2)
    x_hat = normalize_residual(model, cap.get("resid_pre", 2), 2)
    q = torch.einsum("td,hde->hte", x_hat, lw.W_Q) + lw.b_Q[:, None]
    k = torch.einsum("td,hde->hte", x_hat, lw.W_K) + lw.b_K[:, None]
    T = x_hat.shape[0]
    scores = lw.attn_scale * q @ k.transpose(1, 2)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    assert torch.allclose(torch.softmax(scores, -1), pat, atol=1e-5)


def test_swiglu_activation_uses_gate_and_up(embedded):
    lw = layer_weights(embedded.model, 2)
    x = torch.randn(5, 576)
    act = mlp_activations(lw, x)
    want = torch.nn.functional.silu(x @ lw.W_gate) * (x @ lw.W_in)
    assert torch.allclose(act, want, atol=1e-5)


def test_factored_svd_matches_dense(rng):
    left = torch.tensor(rng.normal(size=(3, 40, 6)))
    right = torch.tensor(rng.normal(size=(3, 6, 40)))
    U, S, V = factored_svd(left, right)
    dense = left @ right
    assert torch.allclose(U @ torch.diag_embed(S) @ V.transpose(1, 2), dense, atol=1e-10)
    assert torch.allclose(S, torch.linalg.svdvals(dense)[:, :6], atol=1e-10)
    assert torch.allclose(U.transpose(1, 2) @ U, torch.eye(6, dtype=U.dtype).expand(3, 6, 6), atol=1e-10)


def test_unsupported_model_and_bad_layers(embedded):
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=100))
    with pytest.raises(BandwidthInputError, match="not supported.*Supported"):
        layer_weights(bert, 0)
    with pytest.raises(BandwidthInputError, match="layer 30 is out of range"):
        layer_weights(embedded.model, 30)
    with pytest.raises(BandwidthInputError, match="layers"):
        all_layer_weights(embedded.model, ["3"])
    with pytest.raises(BandwidthInputError, match="sublayer"):
        normalize_residual(embedded.model, torch.zeros(2, 576), 0, "ffn")
    lw = layer_weights(embedded.model, 2)
    with pytest.raises(BandwidthInputError, match=r"pattern \(layer 2\): expected \[9, 4, 4\]"):
        attention_write(lw, torch.zeros(4, 576), torch.zeros(9, 4, 5))
    with pytest.raises(BandwidthInputError, match=r"x_hat \(layer 2\)"):
        attention_write(lw, torch.zeros(4, 64), torch.zeros(9, 4, 4))
    with pytest.raises(BandwidthInputError, match="LayerWeights"):
        mlp_write(embedded.model, torch.zeros(4, 576))
