"""Honest student answers for tests/test_fair_grading.py, written independently of the solutions.

For every item: correct answers written differently (numpy, scikit-learn, eigvalsh of the
covariance, float32) and plausible mistakes. ``expect`` is the item score the real pipeline must
give (4 = full, 1 = visible tests pass but hidden tests fail, 0 = the visible tests already catch
it); ``says`` is a fragment the visible test's message must contain when it catches the mistake
(the cause, named), ``prop`` a fragment of the hidden-test property the feedback must name.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    item: str
    name: str
    code: str
    expect: int
    says: str = ""       # visible message fragment (expect == 0)
    prop: str = ""       # hidden property fragment (expect == 1)


CK1 = "checkpoint_1"
CK2 = "checkpoint_2"
CK3 = "checkpoint_3"
Q1 = "summative_q1"
Q2 = "summative_q2"
Q3 = "summative_q3"

ANSWERS = [
    # ---- checkpoint 1 -------------------------------------------------------------------------------
    Answer(CK1, "numpy", '''
def analyze_bandwidth(residual_states, p=0.95):
    X = np.concatenate([np.asarray(s, dtype=np.float64) for s in residual_states])
    X = X - X.mean(axis=0)
    var = np.linalg.svd(X, compute_uv=False) ** 2
    r = int(np.searchsorted(np.cumsum(var) / var.sum(), p - 1e-12)) + 1
    n, d = X.shape
    return {"effective_rank": r, "utilization_available": r / min(n, d), "utilization_d_model": r / d,
            "total_dimensions": d}
''', 4),
    Answer(CK1, "sklearn", '''
def analyze_bandwidth(residual_states, p=0.95):
    X = torch.cat([torch.as_tensor(s) for s in residual_states]).double().numpy()
    r = int(PCA(n_components=p, svd_solver="full").fit(X).n_components_)
    n, d = X.shape
    return dict(effective_rank=r, utilization_available=r / min(n, d), utilization_d_model=r / d, total_dimensions=d)
''', 4),
    Answer(CK1, "eigvalsh_float32", '''
def analyze_bandwidth(residual_states, p=0.95):
    X = torch.cat([torch.as_tensor(s).float() for s in residual_states])
    C = torch.cov(X.T)
    lam = torch.linalg.eigvalsh(C).flip(0).clamp_min(0)
    share = torch.cumsum(lam, 0) / lam.sum()
    r = int((share < p).sum()) + 1
    n, d = X.shape
    return {"effective_rank": r, "utilization_available": r / min(n, d), "utilization_d_model": r / d,
            "total_dimensions": d}
''', 4),
    Answer(CK1, "sigma_not_variance", '''
def analyze_bandwidth(residual_states, p=0.95):
    X = torch.cat([torch.as_tensor(s).double() for s in residual_states])
    s = torch.linalg.svdvals(X - X.mean(0))
    r = int((torch.cumsum(s, 0) / s.sum() < p).sum()) + 1
    n, d = X.shape
    return {"effective_rank": r, "utilization_available": r / min(n, d), "utilization_d_model": r / d, "total_dimensions": d}
''', 0, says="principal directions hold 95% of the variance"),
    Answer(CK1, "no_centring", '''
def analyze_bandwidth(residual_states, p=0.95):
    X = torch.cat([torch.as_tensor(s).double() for s in residual_states])
    lam = torch.linalg.svdvals(X) ** 2
    r = int((torch.cumsum(lam, 0) / lam.sum() < p).sum()) + 1
    n, d = X.shape
    return {"effective_rank": r, "utilization_available": r / min(n, d), "utilization_d_model": r / d, "total_dimensions": d}
''', 0, says="centre the pooled rows"),
    Answer(CK1, "percentages", '''
def analyze_bandwidth(residual_states, p=0.95):
    X = torch.cat([torch.as_tensor(s).double() for s in residual_states])
    lam = torch.linalg.svdvals(X - X.mean(0)) ** 2
    r = int((torch.cumsum(lam, 0) / lam.sum() < p).sum()) + 1
    n, d = X.shape
    return {"effective_rank": r, "utilization_available": 100 * r / min(n, d), "utilization_d_model": 100 * r / d,
            "total_dimensions": d}
''', 0, says="not a percentage"),
    Answer(CK1, "available_is_d", '''
def analyze_bandwidth(residual_states, p=0.95):
    X = torch.cat([torch.as_tensor(s).double() for s in residual_states])
    lam = torch.linalg.svdvals(X - X.mean(0)) ** 2
    r = int((torch.cumsum(lam, 0) / lam.sum() < p).sum()) + 1
    d = X.shape[1]
    return {"effective_rank": r, "utilization_available": r / d, "utilization_d_model": r / d, "total_dimensions": d}
''', 0, says="min(n, d)"),
    Answer(CK1, "ignores_p", '''
def analyze_bandwidth(residual_states, p=0.95):
    X = torch.cat([torch.as_tensor(s).double() for s in residual_states])
    lam = torch.linalg.svdvals(X - X.mean(0)) ** 2
    r = int((torch.cumsum(lam, 0) / lam.sum() < 0.95).sum()) + 1
    n, d = X.shape
    return {"effective_rank": r, "utilization_available": r / min(n, d), "utilization_d_model": r / d, "total_dimensions": d}
''', 1, prop="another threshold p"),
    # ---- checkpoint 2 -------------------------------------------------------------------------------
    Answer(CK2, "numpy_mean_median", '''
def find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0):
    A = np.asarray(torch.as_tensor(X).double())
    norms = np.linalg.norm(A, axis=1)
    ratio = norms / np.median(norms)
    typ = ratio < loud_ratio
    centre = A[typ].mean(axis=0)
    _, s, vt = np.linalg.svd(A[typ] - centre, full_matrices=False)
    coords = (A - centre) @ vt[s > 1e-9 * s.max()].T
    sq = coords ** 2
    pr = sq.sum(axis=1) ** 2 / (sq ** 2).sum(axis=1)
    spread = pr / np.median(pr[typ])
    out = []
    for i in range(len(A)):
        if ratio[i] >= massive_ratio:
            sev = "massive"
        elif ratio[i] >= loud_ratio and spread[i] >= 1:
            sev = "critical" if ratio[i] * spread[i] >= critical_score else "warning"
        else:
            continue
        out.append({"position": i, "norm_ratio": float(ratio[i]), "spread": float(spread[i]), "severity": sev})
    return out
''', 4),
    Answer(CK2, "float32", '''
def find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0):
    X = torch.as_tensor(X).float()
    e = X.norm(dim=1) / X.norm(dim=1).median()
    t = e < loud_ratio
    m = X[t].mean(0)
    u, s, vh = torch.linalg.svd(X[t] - m, full_matrices=False)
    c = ((X - m) @ vh[s > 1e-6 * s[0]].T) ** 2
    pr = c.sum(1) ** 2 / (c * c).sum(1)
    sp = pr / pr[t].median()
    res = []
    for i in range(len(X)):
        ei, si = float(e[i]), float(sp[i])
        sev = "massive" if ei >= massive_ratio else (
            ("critical" if ei * si >= critical_score else "warning") if ei >= loud_ratio and si >= 1 else None)
        if sev:
            res.append(dict(position=i, norm_ratio=ei, spread=si, severity=sev))
    return res
''', 4),
    Answer(CK2, "mean_not_median", '''
def find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0):
    X = torch.as_tensor(X).double()
    e = X.norm(dim=1) / X.norm(dim=1).mean()
    t = e < loud_ratio
    m = X[t].mean(0)
    _, s, vh = torch.linalg.svd(X[t] - m, full_matrices=False)
    c = ((X - m) @ vh[s > 1e-9 * s[0]].T) ** 2
    pr = c.sum(1) ** 2 / (c * c).sum(1)
    sp = pr / pr[t].median()
    res = []
    for i in range(len(X)):
        ei, si = float(e[i]), float(sp[i])
        sev = "massive" if ei >= massive_ratio else (
            ("critical" if ei * si >= critical_score else "warning") if ei >= loud_ratio and si >= 1 else None)
        if sev:
            res.append(dict(position=i, norm_ratio=ei, spread=si, severity=sev))
    return res
''', 0, says="MEDIAN row norm"),
    Answer(CK2, "pr_of_abs_coordinates", '''
def find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0):
    X = torch.as_tensor(X).double()
    e = X.norm(dim=1) / X.norm(dim=1).median()
    t = e < loud_ratio
    m = X[t].mean(0)
    _, s, vh = torch.linalg.svd(X[t] - m, full_matrices=False)
    c = ((X - m) @ vh[s > 1e-9 * s[0]].T).abs()
    pr = c.sum(1) ** 2 / (c * c).sum(1)
    sp = pr / pr[t].median()
    res = []
    for i in range(len(X)):
        ei, si = float(e[i]), float(sp[i])
        sev = "massive" if ei >= massive_ratio else (
            ("critical" if ei * si >= critical_score else "warning") if ei >= loud_ratio and si >= 1 else None)
        if sev:
            res.append(dict(position=i, norm_ratio=ei, spread=si, severity=sev))
    return res
''', 0, says="SQUARED coordinates"),
    Answer(CK2, "pca_on_all_rows", '''
def find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0):
    X = torch.as_tensor(X).double()
    e = X.norm(dim=1) / X.norm(dim=1).median()
    t = e < loud_ratio
    m = X.mean(0)
    _, s, vh = torch.linalg.svd(X - m, full_matrices=False)
    c = ((X - m) @ vh[s > 1e-9 * s[0]].T) ** 2
    pr = c.sum(1) ** 2 / (c * c).sum(1)
    sp = pr / pr[t].median()
    res = []
    for i in range(len(X)):
        ei, si = float(e[i]), float(sp[i])
        sev = "massive" if ei >= massive_ratio else (
            ("critical" if ei * si >= critical_score else "warning") if ei >= loud_ratio and si >= 1 else None)
        if sev:
            res.append(dict(position=i, norm_ratio=ei, spread=si, severity=sev))
    return res
''', 0, says="it is crowded"),
    Answer(CK2, "typical_rows_not_centred", '''
def find_crowded_positions(X, loud_ratio=2.0, massive_ratio=4.0, critical_score=4.0):
    X = torch.as_tensor(X).double()
    e = X.norm(dim=1) / X.norm(dim=1).median()
    t = e < loud_ratio
    _, s, vh = torch.linalg.svd(X[t], full_matrices=False)
    c = (X @ vh[s > 1e-9 * s[0]].T) ** 2
    pr = c.sum(1) ** 2 / (c * c).sum(1)
    sp = pr / pr[t].median()
    res = []
    for i in range(len(X)):
        ei, si = float(e[i]), float(sp[i])
        sev = "massive" if ei >= massive_ratio else (
            ("critical" if ei * si >= critical_score else "warning") if ei >= loud_ratio and si >= 1 else None)
        if sev:
            res.append(dict(position=i, norm_ratio=ei, spread=si, severity=sev))
    return res
''', 0, says="centred on their own mean"),
    # ---- checkpoint 3 -------------------------------------------------------------------------------
    Answer(CK3, "own_rank_numpy", '''
def utilization_alert(state, warning=0.75, critical=0.9, p=0.95):
    A = np.asarray(torch.as_tensor(state).double())
    n, d = A.shape
    var = np.linalg.svd(A - A.mean(0), compute_uv=False) ** 2
    r = int(np.searchsorted(np.cumsum(var) / var.sum(), p - 1e-12)) + 1
    u = r / d
    if n - 1 < d:
        return {"effective_rank": r, "utilization_d_model": u, "level": "insufficient_data"}
    level = "critical" if u >= critical else ("warning" if u >= warning else "ok")
    return {"effective_rank": r, "utilization_d_model": u, "level": level}
''', 4),
    Answer(CK3, "n_less_than_d", '''
def utilization_alert(state, warning=0.75, critical=0.9, p=0.95):
    n, d = state.shape
    r = variance_rank(state, p)
    u = r / d
    level = ("insufficient_data" if n < d else "critical" if u >= critical else "warning" if u >= warning else "ok")
    return {"effective_rank": r, "utilization_d_model": u, "level": level}
''', 0, says="n - 1 < d, not n < d"),
    Answer(CK3, "strict_comparison", '''
def utilization_alert(state, warning=0.75, critical=0.9, p=0.95):
    n, d = state.shape
    r = variance_rank(state, p)
    u = r / d
    level = ("insufficient_data" if n - 1 < d else "critical" if u > critical else "warning" if u > warning else "ok")
    return {"effective_rank": r, "utilization_d_model": u, "level": level}
''', 0, says="compare with >="),
    Answer(CK3, "warning_checked_first", '''
def utilization_alert(state, warning=0.75, critical=0.9, p=0.95):
    n, d = state.shape
    r = variance_rank(state, p)
    u = r / d
    if n - 1 < d:
        level = "insufficient_data"
    elif u >= warning:
        level = "warning"
    elif u >= critical:
        level = "critical"
    else:
        level = "ok"
    return {"effective_rank": r, "utilization_d_model": u, "level": level}
''', 0, says="expected 'critical'"),
    Answer(CK3, "ignores_p", '''
def utilization_alert(state, warning=0.75, critical=0.9, p=0.95):
    n, d = state.shape
    r = variance_rank(state)
    u = r / d
    level = ("insufficient_data" if n - 1 < d else "critical" if u >= critical else "warning" if u >= warning else "ok")
    return {"effective_rank": r, "utilization_d_model": u, "level": level}
''', 1, prop="another p"),
    # ---- summative Q1 -------------------------------------------------------------------------------
    Answer(Q1, "numpy", '''
def effective_rank_family(X):
    A = np.asarray(torch.as_tensor(X).double())
    s = np.linalg.svd(A - A.mean(0), compute_uv=False)
    v = s ** 2
    q = s[s > 0] / s.sum()
    return {"participation_ratio": float(v.sum() ** 2 / (v ** 2).sum()), "stable_rank": float(v.sum() / v.max()),
            "entropy_rank": float(np.exp(-(q * np.log(q)).sum()))}
''', 4),
    Answer(Q1, "eigvalsh_of_covariance", '''
def effective_rank_family(X):
    X = torch.as_tensor(X).double()
    lam = torch.linalg.eigvalsh(torch.cov(X.T)).clamp_min(0)
    s = lam.sqrt()
    q = s[s > 0] / s.sum()
    return {"participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()), "stable_rank": float(lam.sum() / lam.max()),
            "entropy_rank": float(torch.exp(-(q * q.log()).sum()))}
''', 4),
    Answer(Q1, "float32", '''
def effective_rank_family(X):
    X = torch.as_tensor(X).float()
    s = torch.linalg.svdvals(X - X.mean(0))
    lam = s * s
    q = s / s.sum()
    q = q[q > 0]
    return {"participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()), "stable_rank": float(lam.sum() / lam.max()),
            "entropy_rank": float(torch.exp(-(q * torch.log(q)).sum()))}
''', 4),
    Answer(Q1, "ranks_on_sigma", '''
def effective_rank_family(X):
    X = torch.as_tensor(X).double()
    s = torch.linalg.svdvals(X - X.mean(0))
    q = s[s > 0] / s.sum()
    return {"participation_ratio": float(s.sum() ** 2 / (s ** 2).sum()), "stable_rank": float(s.sum() / s.max()),
            "entropy_rank": float(torch.exp(-(q * q.log()).sum()))}
''', 0, says="needs the variances lambda = sigma^2"),
    Answer(Q1, "entropy_of_variances", '''
def effective_rank_family(X):
    X = torch.as_tensor(X).double()
    lam = torch.linalg.svdvals(X - X.mean(0)) ** 2
    q = lam[lam > 0] / lam.sum()
    return {"participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()), "stable_rank": float(lam.sum() / lam.max()),
            "entropy_rank": float(torch.exp(-(q * q.log()).sum()))}
''', 0, says="p_k = sigma_k / sum(sigma)"),
    Answer(Q1, "no_centring", '''
def effective_rank_family(X):
    X = torch.as_tensor(X).double()
    s = torch.linalg.svdvals(X)
    lam = s ** 2
    q = s[s > 0] / s.sum()
    return {"participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()), "stable_rank": float(lam.sum() / lam.max()),
            "entropy_rank": float(torch.exp(-(q * q.log()).sum()))}
''', 0, says="subtract the mean row"),
    Answer(Q1, "drops_small_values", '''
def effective_rank_family(X):
    X = torch.as_tensor(X).double()
    s = torch.linalg.svdvals(X - X.mean(0))
    s = s[s > 0.05 * s[0]]            # "the rest is noise"
    lam = s ** 2
    q = s / s.sum()
    return {"participation_ratio": float(lam.sum() ** 2 / (lam ** 2).sum()), "stable_rank": float(lam.sum() / lam.max()),
            "entropy_rank": float(torch.exp(-(q * q.log()).sum()))}
''', 1, prop=""),
    # ---- summative Q2 -------------------------------------------------------------------------------
    Answer(Q2, "numpy_chan", '''
class RunningCovariance:
    def __init__(self, d):
        self.n, self._mean, self._m2 = 0, np.zeros(d), np.zeros((d, d))

    def update(self, batch):
        b = np.asarray(torch.as_tensor(batch).double()).reshape(-1, self._mean.size)
        k = len(b)
        mb = b.mean(axis=0)
        diff = mb - self._mean
        tot = self.n + k
        self._m2 = self._m2 + (b - mb).T @ (b - mb) + np.outer(diff, diff) * self.n * k / tot
        self._mean = self._mean + diff * k / tot
        self.n = tot
        return self

    @property
    def mean(self):
        return torch.from_numpy(self._mean)

    @property
    def cov(self):
        return torch.from_numpy(self._m2 / (self.n - 1))
''', 4),
    Answer(Q2, "divides_by_n", '''
class RunningCovariance:
    def __init__(self, d):
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.M = torch.zeros(d, d, dtype=torch.float64)

    def update(self, batch):
        batch = torch.as_tensor(batch).double()
        k = batch.shape[0]
        mb = batch.mean(0)
        delta = mb - self.mean
        tot = self.n + k
        self.M = self.M + (batch - mb).T @ (batch - mb) + torch.outer(delta, delta) * self.n * k / tot
        self.mean = self.mean + delta * k / tot
        self.n = tot
        return self

    @property
    def cov(self):
        return self.M / self.n
''', 0, says="divides by n"),
    Answer(Q2, "textbook_sums", '''
class RunningCovariance:
    def __init__(self, d):
        self.n = 0
        self.s = torch.zeros(d, dtype=torch.float64)
        self.ss = torch.zeros(d, d, dtype=torch.float64)

    def update(self, batch):
        batch = torch.as_tensor(batch).double()
        self.n += batch.shape[0]
        self.s += batch.sum(0)
        self.ss += batch.T @ batch
        return self

    @property
    def mean(self):
        return self.s / self.n

    @property
    def cov(self):
        return (self.ss - self.n * torch.outer(self.mean, self.mean)) / (self.n - 1)
''', 0, says="merge centred batch statistics"),
    Answer(Q2, "float32_statistics", '''
class RunningCovariance:
    def __init__(self, d):
        self.n = 0
        self.mean = torch.zeros(d)
        self.M = torch.zeros(d, d)

    def update(self, batch):
        batch = torch.as_tensor(batch).float()
        k = batch.shape[0]
        mb = batch.mean(0)
        delta = mb - self.mean
        tot = self.n + k
        self.M = self.M + (batch - mb).T @ (batch - mb) + torch.outer(delta, delta) * self.n * k / tot
        self.mean = self.mean + delta * k / tot
        self.n = tot
        return self

    @property
    def cov(self):
        return self.M / (self.n - 1)
''', 0, says="large mean"),
    Answer(Q2, "forgets_the_merge_term", '''
class RunningCovariance:
    def __init__(self, d):
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.M = torch.zeros(d, d, dtype=torch.float64)

    def update(self, batch):
        batch = torch.as_tensor(batch).double()
        k = batch.shape[0]
        mb = batch.mean(0)
        tot = self.n + k
        self.M = self.M + (batch - mb).T @ (batch - mb)
        self.mean = self.mean + (mb - self.mean) * k / tot
        self.n = tot
        return self

    @property
    def cov(self):
        return self.M / (self.n - 1)
''', 0, says="cov differs"),
    # ---- summative Q3 -------------------------------------------------------------------------------
    Answer(Q3, "numpy_big_matrix", '''
def eraser_share(W_V, W_O):
    wov = np.asarray(torch.as_tensor(W_V).double()) @ np.asarray(torch.as_tensor(W_O).double())
    lam = np.linalg.eigvals(wov)
    return float(np.abs(lam[lam.real < 0]).sum() / np.abs(lam).sum())


def write_read_projection(write, read):
    w = np.asarray(torch.as_tensor(write).double())
    r = np.asarray(torch.as_tensor(read).double())
    return float(np.mean(np.einsum("td,td->t", w, r) / np.einsum("td,td->t", r, r)))
''', 4),
    Answer(Q3, "float32_small_matrix", '''
def eraser_share(W_V, W_O):
    lam = torch.linalg.eigvals(torch.as_tensor(W_O).float() @ torch.as_tensor(W_V).float())
    neg = lam.real < 0
    return float(lam.abs()[neg].sum() / lam.abs().sum())


def write_read_projection(write, read):
    write, read = torch.as_tensor(write).double(), torch.as_tensor(read).double()
    return float(torch.mean(torch.sum(write * read, dim=1) / torch.sum(read ** 2, dim=1)))
''', 4),
    Answer(Q3, "eigvalsh", '''
def eraser_share(W_V, W_O):
    lam = torch.linalg.eigvalsh(torch.as_tensor(W_O).double() @ torch.as_tensor(W_V).double())
    return float(lam.abs()[lam < 0].sum() / lam.abs().sum())


def write_read_projection(write, read):
    write, read = torch.as_tensor(write).double(), torch.as_tensor(read).double()
    return float(((write * read).sum(-1) / read.pow(2).sum(-1)).mean())
''', 0, says="not eigvalsh"),
    Answer(Q3, "real_parts", '''
def eraser_share(W_V, W_O):
    lam = torch.linalg.eigvals(torch.as_tensor(W_O).double() @ torch.as_tensor(W_V).double()).real
    return float(lam[lam < 0].abs().sum() / lam.abs().sum())


def write_read_projection(write, read):
    write, read = torch.as_tensor(write).double(), torch.as_tensor(read).double()
    return float(((write * read).sum(-1) / read.pow(2).sum(-1)).mean())
''', 0, says="weigh each by |lambda|"),
    Answer(Q3, "ratio_of_sums", '''
def eraser_share(W_V, W_O):
    lam = torch.linalg.eigvals(torch.as_tensor(W_O).double() @ torch.as_tensor(W_V).double())
    return float(lam.abs()[lam.real < 0].sum() / lam.abs().sum())


def write_read_projection(write, read):
    write, read = torch.as_tensor(write).double(), torch.as_tensor(read).double()
    return float((write * read).sum() / read.pow(2).sum())
''', 0, says="not a ratio of sums"),
    Answer(Q3, "norm_not_squared", '''
def eraser_share(W_V, W_O):
    lam = torch.linalg.eigvals(torch.as_tensor(W_O).double() @ torch.as_tensor(W_V).double())
    return float(lam.abs()[lam.real < 0].sum() / lam.abs().sum())


def write_read_projection(write, read):
    write, read = torch.as_tensor(write).double(), torch.as_tensor(read).double()
    return float(((write * read).sum(-1) / read.norm(dim=-1)).mean())
''', 0, says="projection should be -1"),
]
