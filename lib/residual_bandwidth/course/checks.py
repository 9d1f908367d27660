"""The visible tests of the lesson's exercises (as ARENA's ``tests.py``): each test cell of the
notebook is one call, e.g. ``seed_states = checks.checkpoint_1(analyze_bandwidth)``.

Every function calls the student's code on fixed inputs, checks *properties* (invariances, known
worked examples, limits) and raises an ``AssertionError`` whose message names the likely cause and
the fix. While the exercise still raises ``NotImplementedError`` it says "not attempted yet" and
returns, so Run All goes on. Each returns the inputs the cell's hidden part reads (nbgrader's hidden
tests call the answer again on them, so an unsolved exercise scores 0 there).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..metrics import compute_metrics


def check(condition, message):
    """Fail with a message that explains what is wrong and what to try."""
    if not bool(condition):
        raise AssertionError(message)


def close(a, b, rel=1e-5, abs_=1e-8):
    """|a - b| <= max(abs_, rel * max(|a|, |b|)); never close when either side is inf or nan."""
    a, b = float(a), float(b)
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


NOT_ATTEMPTED = object()


def attempt(fn, *args, **kwargs):
    """Call `fn`; return NOT_ATTEMPTED if it still raises NotImplementedError (the exercise stub)."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        return NOT_ATTEMPTED


def not_attempted(title, names):
    """Say that an exercise is not attempted yet, without stopping Run All.

    One line goes to stderr as well: nbgrader's Validate (and its grading) counts a test cell with
    stderr output as not passed, so Validate lists every exercise still to do instead of reporting
    success on an untouched notebook. While grading, the hidden part of the same test cell calls the
    answer again, so an unsolved exercise scores 0."""
    import sys
    from IPython.display import Markdown, display
    display(Markdown(f"**{title}: not attempted yet.** `{names}` still raises `NotImplementedError`. "
                     "Replace `raise NotImplementedError()` in the exercise cell above with your code, "
                     "run that cell, then run this one again."))
    print(f"{title}: not attempted yet ({names} still raises NotImplementedError)", file=sys.stderr)


def seed_checkpoint_1_data(seed=0):
    """Checkpoint 1's data, as in the claims you will meet: 4 layers x 20 tokens, ranks 10..25 in 64 dims, + noise."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(20, 10 + 5 * i, generator=g) @ torch.randn(10 + 5 * i, 64, generator=g)
            + 0.1 * torch.randn(20, 64, generator=g) for i in range(4)]


def seed_rank(x):
    """The rank recipe you will meet in the wild: cumulative *sigma* (not sigma^2), no centring."""
    s = torch.linalg.svdvals(torch.as_tensor(x).double())
    return int((torch.cumsum(s, 0) < 0.95 * s.sum()).sum()) + 1


def variance_rank(state, p=0.95):
    """The variance-threshold rank r_p of one centred [positions, d_model] state (for Checkpoint 3).

    The library's reference computation, so Checkpoint 3 does not depend on your Checkpoint 1."""
    return compute_metrics(torch.as_tensor(state).double(), variance_threshold=p).variance_rank


def _pca_rank(x, p=0.95) -> int:
    from sklearn.decomposition import PCA
    return int(PCA(n_components=p, svd_solver="full").fit(torch.as_tensor(x).double().numpy()).n_components_)


def inputs(item: str):
    """The inputs of ``item``'s test cells, built without calling the student's code, so the cells'
    hidden parts have them even when a visible test fails. The check functions below start from them."""
    g = torch.Generator().manual_seed({"checkpoint_1": 0, "checkpoint_2": 2, "checkpoint_3": 3, "summative_q1": 5,
                                       "summative_q2": 7, "summative_q3": 9}[item])
    if item == "checkpoint_1":
        return seed_checkpoint_1_data(0)
    if item == "checkpoint_2":
        return _crowded_inputs()
    if item == "checkpoint_3":
        return torch.randn(15, 48, generator=g), g   # the shape of the claim you will meet (15 positions, 48 dims)
    if item == "summative_q1":
        return _with_spectrum([2.0, 1.0, 1.0], 40, 16, g), g
    if item == "summative_q2":
        return torch.randn(30, 5, generator=g, dtype=torch.float64) * 3 + 1, g
    d, dh = 24, 6
    U = torch.linalg.qr(torch.randn(d, dh, generator=g, dtype=torch.float64))[0]   # an orthonormal d_head subspace
    read = torch.randn(50, d, generator=g, dtype=torch.float64)
    return U, -U.T, read, g                       # W_OV = -U U^T: deletes that subspace; the residual it reads


def checkpoint_1(analyze_bandwidth):
    """Checkpoint 1's data, the same data with a mean, and one layer alone."""
    seed_states = inputs("checkpoint_1")
    res = attempt(analyze_bandwidth, seed_states)
    if res is NOT_ATTEMPTED:
        not_attempted("Checkpoint 1", "analyze_bandwidth")
        return seed_states
    keys = {"effective_rank", "utilization_available", "utilization_d_model", "total_dimensions"}
    check(isinstance(res, dict) and keys <= set(res), f"return a dict with the four keys; got {res!r}")
    pooled = torch.cat(seed_states).double()
    expected, got = _pca_rank(pooled), res["effective_rank"]
    hint = (" That is the number of the common recipe (cumulative sigma, uncentred): square the singular values (variance is sigma^2) and centre."
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
    one, r1 = analyze_bandwidth(seed_states[:1]), _pca_rank(seed_states[0])
    check(one["effective_rank"] == r1, f"one layer of 20 positions: effective_rank = {one['effective_rank']}, expected {r1}")
    check(close(one["utilization_available"], r1 / 20),
          f"one layer of 20 positions: utilization_available = {one['utilization_available']}, expected {r1}/20 "
          "(divide by min(n, d): n = 20 positions < d = 64)")
    print("Checkpoint 1 visible tests passed.")
    return seed_states


def _crowded_inputs():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(201, 32, generator=g, dtype=torch.float64)          # typical tokens
    typical_norm = float(X.norm(dim=1).median())
    _, _, vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    even = vh.sum(0) / vh.sum(0).norm()       # equal weight on every principal direction
    X[10] = X.mean(0) + 3.0 * typical_norm * even                       # loud AND spread: crowded
    X[20] = X.mean(0) + 3.0 * typical_norm * vh[0]                      # loud, one direction only
    X[30] = 50.0 * typical_norm * torch.nn.functional.one_hot(torch.tensor(5), 32).double()  # massive
    X[40] = 30.0 * typical_norm * torch.nn.functional.one_hot(torch.tensor(9), 32).double()  # massive
    # 201 rows, 4 loud ones, 197 typical: odd counts, so every definition of the median agrees here
    return X, g


def checkpoint_2(find_crowded_positions):
    """One crowded row, one loud-but-one-dimensional row, two massive rows. Returns ``(X, g)``."""
    from ..bottlenecks import layer_scores
    X, g = inputs("checkpoint_2")
    found = attempt(find_crowded_positions, X)
    if found is NOT_ATTEMPTED:
        not_attempted("Checkpoint 2", "find_crowded_positions")
        return X, g
    found = {r["position"]: r for r in found}
    ref = layer_scores(X)
    check(found.get(30, {}).get("severity") == "massive", f"row 30 is 50x the typical norm: 'massive'. Got {found.get(30)}")
    check(10 in found, "row 10 is 3x the typical norm and spread evenly over every principal direction: it is crowded, "
                       "but it was not reported")
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
    return X, g


def checkpoint_3(utilization_alert):
    """Too few positions (n < d and n == d), every direction used, few used, exactly at a threshold.
    Returns ``(short, g)``."""
    short, g = inputs("checkpoint_3")
    res = attempt(utilization_alert, short)
    if res is NOT_ATTEMPTED:
        not_attempted("Checkpoint 3", "utilization_alert")
        return short, g
    check(res["level"] == "insufficient_data",
          f"15 positions cannot span 48 dimensions, so the level must be 'insufficient_data', got {res['level']!r}")
    square = torch.randn(48, 48, generator=g)
    check(utilization_alert(square)["level"] == "insufficient_data",
          "48 positions in 48 dimensions: centred, they span at most 47 directions, so the level must be "
          "'insufficient_data' (the test is n - 1 < d, not n < d)")
    busy = torch.randn(2000, 48, generator=g)                     # every direction used equally
    res, r = utilization_alert(busy), variance_rank(busy)
    check(res["effective_rank"] == r, f"effective_rank {res['effective_rank']} != variance_rank(state) = {r}")
    check(close(res["utilization_d_model"], r / 48), f"utilization_d_model should be {r}/48, got {res['utilization_d_model']}")
    check(res["level"] == "critical",
          f"{r} of 48 directions hold 95% of the variance ({r / 48:.0%}): expected 'critical', got {res['level']!r}")
    quiet = torch.randn(400, 48, generator=g) @ torch.diag(torch.cat([torch.ones(8), 0.01 * torch.ones(40)]))
    check(utilization_alert(quiet)["level"] == "ok", "8 of 48 directions used should be 'ok'")
    at = utilization_alert(quiet, warning=variance_rank(quiet) / 48, critical=1.0)["level"]
    check(at == "warning", f"utilization equals the warning threshold exactly, so the alert must fire ('warning'), "
                           f"got {at!r}: compare with >=, not >")
    print("Checkpoint 3 visible tests passed.")
    return short, g


def _with_spectrum(sig, n: int, d: int, g) -> torch.Tensor:
    """An ``n x d`` matrix whose centred singular values are ``sig``, plus a mean row."""
    A = torch.randn(n, len(sig), generator=g, dtype=torch.float64)
    U = torch.linalg.qr(A - A.mean(0))[0]                 # orthonormal columns with mean 0
    V = torch.linalg.qr(torch.randn(d, len(sig), generator=g, dtype=torch.float64))[0]
    return U @ torch.diag(torch.as_tensor(sig, dtype=torch.float64)) @ V.T \
        + 3.0 * torch.linspace(1.0, 2.0, d, dtype=torch.float64)


#: Q1's worked example, by hand: centred singular values sigma = (2, 1, 1), so lambda = (4, 1, 1).
#: PR = (4 + 1 + 1)^2 / (16 + 1 + 1) = 36 / 18 = 2; stable rank = 6 / 4 = 1.5; entropy rank with
#: p = sigma / sum(sigma) = (1/2, 1/4, 1/4): H = (1/2) ln 2 + (1/2) ln 4 = (3/2) ln 2, exp(H) = 2^(3/2).
Q1_EXAMPLE = {"participation_ratio": 2.0, "stable_rank": 1.5, "entropy_rank": 2 ** 1.5}
#: the same example through known mistakes: the formulas on sigma (PR 4^2 / 6, stable 4 / 2), the
#: entropy of p = lambda / sum(lambda) = (2/3, 1/6, 1/6), and the entropy itself instead of exp(H)
Q1_MISTAKES = {
    "participation_ratio": {16 / 6: " That is the formula applied to sigma: it needs the variances lambda = sigma^2."},
    "stable_rank": {2.0: " That is the formula applied to sigma: it needs the variances lambda = sigma^2."},
    "entropy_rank": {
        math.exp(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 6)):
            " That uses p_k = lambda_k / sum(lambda); this lesson's entropy rank (Roy & Vetterli) uses "
            "p_k = sigma_k / sum(sigma).",
        1.5 * math.log(2): " That is the entropy itself: the effective rank is exp(entropy)."},
}


def _q1_values(res, what: str) -> dict:
    check(isinstance(res, dict), f"{what}: return a dict; got {res!r}")
    for key in Q1_EXAMPLE:
        check(isinstance(res.get(key), (int, float, np.floating, np.integer)) and math.isfinite(float(res[key])),
              f"{what}: return a dict with a finite number under {key!r}; got {res!r}")
    return {k: float(res[k]) for k in Q1_EXAMPLE}


def summative_q1(effective_rank_family):
    """Properties of the effective-rank family: the mean row and the basis do not matter, a worked
    example with known values, k equal directions give k, and stable <= PR <= entropy rank <= rank.
    Returns ``(X, g)``."""
    X, g = inputs("summative_q1")
    res = attempt(effective_rank_family, X)
    if res is NOT_ATTEMPTED:
        not_attempted("Q1", "effective_rank_family")
        return X, g
    got = _q1_values(res, "effective_rank_family(X)")
    centred = _q1_values(effective_rank_family(X - X.mean(0)), "effective_rank_family(X - mean)")
    for key in Q1_EXAMPLE:
        check(close(got[key], centred[key], rel=1e-4),
              f"{key} changed when the mean row was removed ({got[key]:.6g} -> {centred[key]:.6g}): the ranks "
              "describe the spread around the mean, so subtract the mean row first")
    for key, want in Q1_EXAMPLE.items():
        why = next((w for value, w in Q1_MISTAKES[key].items() if close(got[key], value, rel=1e-4)), "")
        check(close(got[key], want, rel=1e-4),
              f"{key}: got {got[key]:.6g} for centred singular values (2, 1, 1); worked by hand it is {want:.6g}.{why}")
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    rot = _q1_values(effective_rank_family(X @ Q), "effective_rank_family(X @ Q)")
    for key in Q1_EXAMPLE:
        check(close(rot[key], got[key], rel=1e-4), f"{key} changed when the basis was rotated (X -> X Q)")
    flat = _q1_values(effective_rank_family(_with_spectrum([1.5] * 5, 30, 16, g)), "five equal directions")
    for key, v in flat.items():
        check(close(v, 5.0, rel=1e-4), f"five directions of equal variance: every effective rank is 5, {key} = {v:.6g}")
    W = torch.randn(30, 12, generator=g, dtype=torch.float64) * torch.linspace(3.0, 0.2, 12, dtype=torch.float64)
    r = _q1_values(effective_rank_family(W), "a random layer")
    check(r["stable_rank"] <= r["participation_ratio"] * (1 + 1e-9) <= r["entropy_rank"] * (1 + 1e-9) <= 12 + 1e-9,
          f"expected stable rank <= participation ratio <= entropy rank <= 12 directions, got {r}")
    print("Q1 visible tests passed.")
    return X, g


def summative_q2(RunningCovariance):
    """Two updates, one row at a time, and a large mean. Returns ``(data, g)``."""
    data, g = inputs("summative_q2")
    rc = attempt(lambda: RunningCovariance(5).update(data[:12]).update(data[12:]))
    if rc is NOT_ATTEMPTED:
        not_attempted("Q2", "RunningCovariance.update")
        return data, g
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
    return data, g


def _q3_eraser_share(eraser_share, eraser, copier, g):
    from ..memory import neg_share
    check(close(eraser_share(*eraser), 1.0), f"W_OV = -projection: share should be 1, got {eraser_share(*eraser)}")
    check(close(eraser_share(*copier), 0.0, abs_=1e-9), "W_OV = +projection: share should be 0")
    d, dh = copier[0].shape
    W_V = torch.randn(d, dh, generator=g, dtype=torch.float64)
    W_O = torch.randn(dh, d, generator=g, dtype=torch.float64)
    ref = float(neg_share(torch.linalg.eigvals(W_O @ W_V)))
    check(close(eraser_share(W_V, W_O), ref, rel=1e-4),
          f"a random head: got {eraser_share(W_V, W_O)}, expected {ref:.6g}. W_OV is not symmetric, so its "
          "eigenvalues are complex: use torch.linalg.eigvals (not eigvalsh) and weigh each by |lambda|")


def _q3_projection(write_read_projection, proj, read, U, g):
    check(close(proj, -1.0), f"writing -read deletes it: projection should be -1, got {proj}")
    loud = read * torch.linspace(0.2, 5.0, 50, dtype=torch.float64)[:, None]      # tokens of very different norms
    w = torch.randn(50, read.shape[1], generator=g, dtype=torch.float64)
    want = float(((w * loud).sum(-1) / loud.pow(2).sum(-1)).mean())
    check(close(write_read_projection(w, loud), want, rel=1e-4),
          f"tokens of different norms: got {write_read_projection(w, loud)}, expected {want:.6g}: take each token's "
          "<w_t, r_t> / ||r_t||^2, then the mean over tokens (not a ratio of sums)")
    check(close(write_read_projection(read @ (U @ U.T), read),
                float(((read @ U).pow(2).sum(1) / read.pow(2).sum(1)).mean())),
          "write = the read's projection onto a subspace")


def summative_q3(eraser_share, write_read_projection):
    """An exact eraser and copier, a random head; writes of -read, of tokens of different norms and of a
    projection. Returns ``(eraser_V, eraser_O, read, g)``."""
    eraser_V, eraser_O, read, g = inputs("summative_q3")
    U = eraser_V
    share = attempt(eraser_share, eraser_V, eraser_O)
    proj = attempt(write_read_projection, -read, read)
    if share is NOT_ATTEMPTED:
        not_attempted("Q3, part 1", "eraser_share")
    else:
        _q3_eraser_share(eraser_share, (eraser_V, eraser_O), (U, U.T), g)
    if proj is NOT_ATTEMPTED:
        not_attempted("Q3, part 2", "write_read_projection")
    else:
        _q3_projection(write_read_projection, proj, read, U, g)
    if share is not NOT_ATTEMPTED and proj is not NOT_ATTEMPTED:
        print("Q3 visible tests passed.")
    return eraser_V, eraser_O, read, g
