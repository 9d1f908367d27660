"""Memory management: planted erasers are found at the top, and nothing is invented."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from residual_bandwidth import BandwidthInputError, ResidualCapture, ResidualRun, capture_residuals, hook_name
from residual_bandwidth.memory import (eigen_sign, energy_loss_directions, head_records, memory_management,
                                       neg_share, neuron_cosines, ov_eigenvalues, rank_candidates)
from residual_bandwidth.weights import layer_weights
from conftest import PROMPTS, random_orthogonal
from references import current_token_attention

HEAD_LAYER, HEAD, NEURON_LAYER, NEURON = 1, 2, 2, 7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _basis_orthogonal_to_ones(d, k, seed=0):
    """k orthonormal columns, all orthogonal to the all-ones vector (LayerNorm's centring removes it)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.cat([torch.ones(d, 1), torch.randn(d, k, generator=g)], dim=1)
    q, _ = torch.linalg.qr(m)
    return q[:, 1:]


@pytest.fixture(scope="module")
def planted_gpt2(tiny_gpt2):
    """The tiny random GPT-2 with an eraser head (W_OV = -s U U^T, attending to the current token)
    in layer 1 and an eraser neuron (W_out[n] = -gamma W_in[:, n]) in layer 2."""
    model, tok = tiny_gpt2
    model = copy.deepcopy(model)
    d, dh = 64, 16
    cap = capture_residuals(model, tok, PROMPTS, kinds=["resid_pre"], layers=[HEAD_LAYER], progress=False)
    sigma = float(cap.get("resid_pre", HEAD_LAYER).std(dim=1).median())
    basis = _basis_orthogonal_to_ones(d, 2 * dh + 1)
    U, U2, u = basis[:, :dh], basis[:, dh:2 * dh], basis[:, 2 * dh]
    sl = slice(HEAD * dh, (HEAD + 1) * dh)
    with torch.no_grad():
        attn = model.transformer.h[HEAD_LAYER].attn
        w, b = attn.c_attn.weight, attn.c_attn.bias               # Conv1D [d, 3d]: q | k | v
        w[:, sl] = 2.5 * U2                                       # q and k read the same subspace:
        w[:, d + sl.start:d + sl.stop] = 2.5 * U2                 # every token attends to itself
        w[:, 2 * d + sl.start:2 * d + sl.stop] = U                # v reads U ...
        for part in range(3):
            b[part * d + sl.start:part * d + sl.stop] = 0
        attn.c_proj.weight[sl, :] = -2 * sigma * U.T              # ... and writes -U: erases it
        mlp = model.transformer.h[NEURON_LAYER].mlp
        mlp.c_fc.weight[:, NEURON] = 2 * u
        mlp.c_fc.bias[NEURON] = 0
        mlp.c_proj.weight[NEURON] = -40 * sigma * u
    return model, tok


def test_definitions_on_known_spectra():
    pure_eraser = torch.tensor([-2.0, -1.0, -0.5], dtype=torch.complex128)
    assert float(neg_share(pure_eraser)) == pytest.approx(1.0)
    assert float(eigen_sign(pure_eraser)) == pytest.approx(-1.0)
    copier = -pure_eraser
    assert float(neg_share(copier)) == 0 and float(eigen_sign(copier)) == pytest.approx(1.0)
    mixed = torch.tensor([1.0, -3.0, 1j, -1j], dtype=torch.complex128)  # |.| = 1, 3, 1, 1
    assert float(neg_share(mixed)) == pytest.approx(3 / 6)
    assert float(eigen_sign(mixed)) == pytest.approx(-2 / 6)
    # random matrices: about half of the eigenvalue mass is negative
    g = torch.Generator().manual_seed(0)
    shares = [float(neg_share(torch.linalg.eigvals(torch.randn(64, 64, generator=g, dtype=torch.float64))))
              for _ in range(20)]
    assert 0.4 < np.mean(shares) < 0.6


def test_ov_eigenvalues_are_those_of_the_dense_matrix(embedded):
    lw = layer_weights(embedded.model, 11).to(torch.float64)
    small = ov_eigenvalues(lw)[6]
    dense = torch.linalg.eigvals(lw.W_OV[6])
    top = dense[torch.argsort(dense.abs(), descending=True)[:64]]
    assert torch.allclose(torch.sort(small.abs()).values, torch.sort(top.abs()).values, rtol=1e-6, atol=1e-9)
    assert torch.allclose(small.real.sum(), top.real.sum(), rtol=1e-6)
    assert torch.allclose(torch.trace(lw.W_OV[6]), small.real.sum(), rtol=1e-6)


def test_planted_eraser_head_and_neuron_found_at_the_top(planted_gpt2):
    model, tok = planted_gpt2
    rep = ResidualRun(model, tok, PROMPTS).memory()
    heads = {(r["layer"], r["head"]): r for r in rep.heads}
    planted = heads[(HEAD_LAYER, HEAD)]
    assert planted["neg_share"] > 0.99
    assert planted["current_token_attention"] > 0.8
    others = [r for k, r in heads.items() if k != (HEAD_LAYER, HEAD)]
    assert max(r["neg_share"] for r in others) < 0.9
    assert max(r["current_token_attention"] for r in others) < planted["current_token_attention"]
    assert float(rep.neuron_cos.min()) == pytest.approx(-1.0, abs=1e-5)
    assert float(torch.sort(rep.neuron_cos.reshape(-1)).values[1]) > -0.6   # the rest look random
    # the ranked list: both planted components on top, and top of their kind by weights and activations
    assert {r["component"] for r in rep.ranking[:2]} == {f"L{HEAD_LAYER}.H{HEAD}", f"L{NEURON_LAYER}.N{NEURON}"}
    by_kind = {}
    for r in rep.ranking:
        by_kind.setdefault(r["kind"], r)
    assert by_kind["head"]["component"] == f"L{HEAD_LAYER}.H{HEAD}"
    assert by_kind["neuron"]["component"] == f"L{NEURON_LAYER}.N{NEURON}"
    acts = [r["component"] for r in rep.ranking if r["kind"] == "activation"]
    assert set(acts[:3]) == {f"L{HEAD_LAYER}.H{HEAD}", f"L{HEAD_LAYER}.attn", f"L{NEURON_LAYER}.mlp"}
    # activation evidence: the planted head and neuron cancel what they read, nothing else does much
    er = rep.erasure
    i = er.layers.index(HEAD_LAYER)
    assert float(er.heads[i, HEAD]) < -0.2
    assert float(er.heads[i, HEAD]) < 3 * float(torch.cat([er.heads[i, :HEAD], er.heads[i, HEAD + 1:]]).min())
    j = er.layers.index(NEURON_LAYER)
    assert int(torch.argmin(er.neurons[j])) == NEURON and float(er.neurons[j, NEURON]) < -0.05
    for r in rep.ranking:
        assert set(r) == {"rank", "component", "kind", "layer", "index", "score", "evidence"}
        assert r["kind"] in ("head", "neuron", "activation") and 0 <= r["score"] <= 1


def test_unmodified_random_model_has_no_eraser(tiny_gpt2):
    model, tok = tiny_gpt2
    rep = ResidualRun(model, tok, PROMPTS[:2]).memory()
    assert max(r["neg_share"] for r in rep.heads) < 0.9
    assert float(rep.neuron_cos.min()) > -0.6
    assert max(r["score"] for r in rep.ranking) < 0.6


def _planted_llama(tokenizer):
    """A random GQA Llama (4 query heads, 2 KV heads): query head 3 erases with the value head it
    shares with head 2; SwiGLU neuron 5 of layer 0 writes minus its up direction."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    dh = 16
    U = _basis_orthogonal_to_ones(64, dh + 1, seed=3)
    with torch.no_grad():
        attn = model.model.layers[1].self_attn
        attn.v_proj.weight[dh:2 * dh] = U[:, :dh].T          # KV head 1 (used by query heads 2, 3)
        attn.o_proj.weight[:, 3 * dh:4 * dh] = -0.5 * U[:, :dh]
        mlp = model.model.layers[0].mlp
        u = U[:, dh]
        mlp.up_proj.weight[5] = u
        mlp.gate_proj.weight[5] = u
        mlp.down_proj.weight[:, 5] = -u
    return model


def test_gqa_llama_eraser_head_and_swiglu_neuron(embedded):
    model = _planted_llama(embedded.tokenizer)
    recs = head_records(model)
    rec = {(r["layer"], r["head"]): r for r in recs}
    assert rec[(1, 3)]["kv_head"] == 1 and rec[(1, 2)]["kv_head"] == 1 and rec[(0, 0)]["kv_head"] == 0
    assert rec[(1, 3)]["neg_share"] > 0.99
    assert rec[(1, 3)]["current_token_attention"] is None
    assert rec[(1, 2)]["neg_share"] < 0.9              # same value head, different output: no eraser
    assert len(rec[(1, 3)]["eig_real"]) == 16
    cos = neuron_cosines(model)
    assert float(cos[0, 5]) == pytest.approx(-1.0, abs=1e-6) and int(cos.argmin()) == 5
    ranking = rank_candidates(recs, cos, [0, 1], top_per_kind=3)
    assert ranking[0]["component"] in ("L1.H3", "L0.N5") and ranking[1]["component"] in ("L1.H3", "L0.N5")
    assert neuron_cosines(model, direction="gate")[0, 5] == pytest.approx(-1.0, abs=1e-6)


def test_erasure_components_add_up_on_embedded_model(embedded):
    """The attention projection is the sum of its heads' (no output bias in llama), the MLP's the
    sum of its neurons' - a check on the per-head / per-neuron bookkeeping."""
    er = ResidualRun(embedded.model, embedded.tokenizer, PROMPTS[:2], layers=[0, 20], kinds=["resid_post"]).erasure
    assert er.heads.shape == (2, 9) and er.neurons.shape == (2, 1536)
    assert torch.allclose(er.heads.sum(1), er.attn, rtol=1e-3, atol=1e-5)
    assert torch.allclose(er.neurons.sum(1), er.mlp, rtol=1e-3, atol=1e-5)
    labels = {r["label"] for r in er.records(neurons=2)}
    assert {"L0.attn", "L20.mlp", "L20.H8"} <= labels and sum(l.startswith("L0.N") for l in labels) == 2


def test_current_token_attention_leaves_out_position_zero(embedded):
    """Position 0 can only attend to itself: counting it would add 1 per prompt. The mean over t >= 1
    is the reference's; the version that counts position 0 is not."""
    prompts = ["Hi there", "A cat sat."]
    cta = ResidualRun(embedded.model, embedded.tokenizer, prompts, layers=[0, 1], kinds=["resid_post"]
                      ).erasure.current_attention
    assert cta.shape == (2, 9) and bool(((cta >= 0) & (cta <= 1)).all())
    ref = current_token_attention(embedded.model, embedded.tokenizer, prompts, layers=[0, 1])
    torch.testing.assert_close(cta, ref.float(), atol=1e-5, rtol=0)
    n = [len(embedded.tokenizer(p)["input_ids"]) for p in prompts]
    with_zero = (ref * (sum(n) - len(n)) + len(n)) / sum(n)   # position 0 attends to itself with weight 1
    assert float((cta - with_zero).abs().max()) > 1e-3


def test_attention_implementation_and_hooks_restored(embedded):
    model = embedded.model
    before = model.config._attn_implementation
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    ResidualRun(model, embedded.tokenizer, ["The cat sat on the mat."], layers=[3]).memory()
    assert model.config._attn_implementation == before
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


def test_energy_loss_directions_find_the_drained_direction(rng):
    d, n = 32, 200
    Q = torch.tensor(random_orthogonal(d, rng))
    Z, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(n, d))))      # uncorrelated columns
    pre = (Z * n**0.5 * torch.linspace(3, 1, d, dtype=torch.float64)) @ Q.T
    v = Q[:, 3]                                        # drain 90 % of the amplitude along v
    post = pre - 0.9 * (pre @ v)[:, None] * v[None, :]
    cap = ResidualCapture.from_hook_dict({hook_name("resid_pre", 0): pre.float(),
                                          hook_name("resid_post", 0): post.float()})
    recs = energy_loss_directions(cap, top_k=2)
    assert recs[0]["layer"] == 0 and recs[0]["rank"] == 1
    assert recs[0]["lost_fraction"] == pytest.approx(1 - 0.1**2, abs=1e-3)
    assert len(recs) == 1 or recs[1]["lost_energy"] < 1e-3 * recs[0]["lost_energy"]
    # basis-free: rotating both matrices changes nothing but the reading of top_dim
    R = torch.tensor(random_orthogonal(d, rng))
    cap_r = ResidualCapture.from_hook_dict({hook_name("resid_pre", 0): (pre @ R).float(),
                                            hook_name("resid_post", 0): (post @ R).float()})
    rotated = energy_loss_directions(cap_r, top_k=1)[0]
    assert rotated["lost_fraction"] == pytest.approx(recs[0]["lost_fraction"], rel=1e-4)
    with pytest.raises(BandwidthInputError, match=r"blocks\.0\.hook_resid_post was not captured"):
        energy_loss_directions({hook_name("resid_pre", 0): pre.float()})
    with pytest.raises(BandwidthInputError, match=r"blocks\.4\.hook_resid_pre was not captured"):
        energy_loss_directions(cap, layers=[0, 4])


def test_bad_input_is_named(embedded, tiny_gpt2):
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=100))
    with pytest.raises(BandwidthInputError, match="not supported"):
        ResidualRun(bert)
    with pytest.raises(BandwidthInputError, match="layer 40"):
        head_records(embedded.model, layers=[40])
    with pytest.raises(BandwidthInputError, match="gate"):
        neuron_cosines(tiny_gpt2[0], direction="gate")
    with pytest.raises(BandwidthInputError, match="tokenizer"):
        ResidualRun(embedded.model, prompts=["hi there"], layers=[0])
    with pytest.raises(BandwidthInputError, match="expected a ResidualRun"):
        memory_management(embedded.model)
    with pytest.raises(BandwidthInputError, match="empty prompt"):
        ResidualRun(embedded.model, embedded.tokenizer, ["  "], layers=[0])
    with pytest.raises(BandwidthInputError, match="single token"):
        ResidualRun(embedded.model, embedded.tokenizer, ["Hello"], layers=[0]).memory()
    with pytest.raises(BandwidthInputError, match="top_per_kind"):
        rank_candidates([], top_per_kind=0)


def test_one_batched_pass_gives_the_per_prompt_current_token_attention(embedded):
    """The run takes current-token attention from its one pass (batched, right padded, eager
    attention) instead of one forward pass per prompt (the tests' reference): the same numbers."""
    m, tok = embedded.model, embedded.tokenizer
    layers = [0, 9, 29]
    ref = current_token_attention(m, tok, PROMPTS[:5], layers)
    er = ResidualRun(m, tok, PROMPTS[:5], layers, kinds=["resid_post"], batch_size=5).erasure
    assert torch.allclose(er.current_attention, ref.float(), atol=1e-5)


def test_combined_ranking_needs_weight_and_activation_evidence(planted_gpt2, tiny_gpt2):
    """score = weight score x activation score: the planted eraser head and neuron (both kinds of
    evidence) lead; on the unmodified random model nothing scores high; without prompts it refuses."""
    from residual_bandwidth.memory import combined_ranking
    model, tok = planted_gpt2
    rep = ResidualRun(model, tok, PROMPTS).memory()
    ranked = combined_ranking(rep, top=5)
    assert {r["component"] for r in ranked[:2]} == {f"L{HEAD_LAYER}.H{HEAD}", f"L{NEURON_LAYER}.N{NEURON}"}
    for r in ranked:
        e = r["evidence"]
        assert r["score"] == pytest.approx(e["weight_score"] * e["activation_score"])
        assert e["activation_score"] == pytest.approx(min(1.0, max(0.0, -e["activation_projection"])))
        assert set(r) == {"rank", "component", "kind", "layer", "index", "score", "evidence"}
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    # a neuron with a perfect weight cosine but no activation evidence scores 0
    rep.erasure.neurons[rep.erasure.layers.index(NEURON_LAYER), NEURON] = 0.0
    again = {r["component"]: r["score"] for r in combined_ranking(rep, top=50)}
    assert again.get(f"L{NEURON_LAYER}.N{NEURON}", 0.0) == 0.0
    plain = ResidualRun(tiny_gpt2[0], tiny_gpt2[1], PROMPTS[:2]).memory()
    assert max(r["score"] for r in combined_ranking(plain)) < 0.1
    with pytest.raises(BandwidthInputError, match="activation evidence"):
        combined_ranking(memory_management(ResidualRun(model)))
    with pytest.raises(BandwidthInputError, match="top"):
        combined_ranking(rep, top=0)
