"""A measured compression curve: what does the model lose if the residual keeps only k directions?

The seed lesson attached invented latency multipliers ("+30 % at critical utilization") to its
utilization numbers. Here the cost of narrowing the stream is *measured*:

1. **Fit.** Capture ``resid_post[L]`` (the output of block L, i.e. ``resid_pre[L+1]``) on calibration
   prompts and compute its principal directions: ``mu`` = mean row, ``v_1, v_2, ...`` the
   eigenvectors of the covariance ``(X - mu)^T (X - mu) / n`` by decreasing variance (float64). With
   fewer tokens than ``d_model`` the directions beyond ``n - 1`` carry no calibration variance and
   their order is arbitrary.
2. **Project during the forward pass.** A forward hook on block L replaces its output by
   ``mu + (x - mu) P_k P_k^T`` with ``P_k = [v_1 .. v_k]``: every token's residual keeps only its
   component in the top-k subspace (plus the mean). Later blocks run on the projected stream. The
   hook is removed afterwards, also when the forward pass raises.

   Massive activations (``skip_massive=True``, the default): rows whose norm is at least
   ``massive_ratio`` (4) times the median row norm are left out of the fit and pass the hook
   unchanged. Such a row (SmolLM2: the first token, ~100x the median norm, one coordinate) would
   otherwise *be* the first principal direction and pull ``mu`` far off the other tokens, so the fit
   would describe one token; and projecting it onto directions fitted without it destroys the
   attention sink the model relies on. The curve then measures the bandwidth the ordinary tokens
   need. ``skip_massive=False`` projects and fits every row.
3. **Measure on held-out prompts** (not used for the fit; 24 short texts, about 500 tokens on the
   embedded model's tokenizer): the mean next-token cross-entropy
   ``loss = mean_t -log q(x_{t+1} | x_<=t)`` and ``KL(p || q) = mean_t sum_v p_v (log p_v - log q_v)``
   between the unmodified model ``p`` and the projected one ``q``, both over real (unpadded) positions;
   ``delta_loss = loss - base_loss``, with a 95 % percentile-bootstrap interval over held-out
   *sequences* (:func:`bootstrap_delta`; paired, since both losses are on the same tokens).
4. **Baseline.** The same with a random k-dimensional subspace (orthonormalised Gaussian, same
   ``mu``), averaged over ``n_random`` draws (each draw's ``delta_loss`` is kept): how much of the effect is "any k directions" rather
   than "the top-k principal directions".

At ``k = d_model`` the projection is the identity and the model is unchanged (a test checks this).

``smallest_k[L]`` is the smallest tested ``k`` whose PCA ``delta_loss <= tolerance`` holds for it *and
every larger tested k* (so one lucky point below a noisy bump does not count); ``None`` if no
tested k qualifies. The default tolerance is **0.05 nats** of next-token loss (under 2 % of the
embedded model's 2.9 nats on the held-out prompts). The loss can even drop a little under a
projection while the predictions still change, so ``smallest_k_kl`` applies the same rule and
tolerance to the KL divergence (the stricter criterion: "the model barely changed").
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .capture import architecture_of, check_layers, forward_batches, model_dims
from .metrics import principal_directions
from .outliers import DEFAULT_MASSIVE_RATIO, massive_mask
from .validation import BandwidthInputError, check_int, check_positive, check_prompts, check_run

DEFAULT_TOLERANCE = 0.05

# Calibration and held-out text: short, varied, written for this course (no data set download).
CALIBRATION_PROMPTS = [
    "The transformer architecture revolutionized natural language processing by introducing attention mechanisms.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out at 02:56 UTC on July 21.",
    "Why does ice float on water? Because solid water is less dense than liquid water.",
    "She opened the old wooden door slowly, and the smell of rain and pine filled the room.",
    "To make bread, mix flour, water, salt and yeast, knead the dough and let it rise for two hours.",
    "The stock market fell sharply on Monday after the central bank raised interest rates again.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "for i in range(10):\n    print(i * i)",
    "My favourite colours are blue, green and a deep shade of orange.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
    "Dear Sir or Madam, I am writing to apply for the position of junior data analyst.",
    "A triangle has three sides, and the sum of its interior angles is 180 degrees.",
    "After the concert, the crowd walked slowly through the narrow streets of the old town.",
    "Q: What is 12 times 12? A: 144. Q: What is 7 plus 8? A: 15.",
    "The museum opens at nine in the morning and closes at five in the evening, except on Mondays.",
    "Elephants are the largest land animals, and they can live for more than sixty years.",
    "import numpy as np\nx = np.linspace(0, 1, 100)\ny = np.sin(2 * np.pi * x)",
    "He said he would call back later, but the phone never rang that night.",
    "The recipe calls for two eggs, a cup of sugar and half a cup of melted butter.",
    "Rain is expected tomorrow across the north, with sunny spells in the south by the afternoon.",
    "The committee will publish its final report on the new railway line next spring.",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "Once upon a time, a small fox lived at the edge of a great forest with her three cubs.",
    "The human heart has four chambers and pumps blood through the lungs and the rest of the body.",
    "Please remember to bring your passport, your ticket and a copy of the hotel booking.",
    "The Pacific Ocean is larger than all of the land on Earth put together.",
    "x = [3, 1, 2]\nx.sort()\nassert x == [1, 2, 3]",
    "The referee blew the whistle, and the home team celebrated a narrow two-to-one victory.",
    "Light travels about 300,000 kilometres per second in a vacuum.",
    "Our meeting has been moved from Tuesday at ten to Thursday at half past two.",
    "Shakespeare wrote Hamlet, Macbeth and many other plays around the year 1600.",
    "If it rains, the picnic will be held indoors in the school hall instead.",
    "The new phone has a larger screen, a faster processor and a battery that lasts two days.",
    "Bees visit flowers to collect nectar, and in doing so they carry pollen from plant to plant.",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y",
    "The river flooded the valley in the spring, and the farmers had to move their animals uphill.",
    "I would like a cup of tea with milk and no sugar, please.",
    "The population of the city grew from one million in 1950 to almost five million today.",
    "Gravity keeps the planets in orbit around the Sun and the Moon in orbit around the Earth.",
]
HELDOUT_PROMPTS = [
    "The library was quiet except for the sound of pages turning and a clock ticking on the wall.",
    "The boiling point of water decreases as altitude increases, because air pressure is lower.",
    "def square(x):\n    return x * x\n\nprint(square(4))",
    "Tokyo is the capital of Japan, and Canberra is the capital of Australia.",
    "When the train finally arrived, the passengers hurried onto the crowded platform.",
    "The students solved the equation 3x + 5 = 20 and found that x equals 5.",
    "Every autumn the swallows leave the village and fly south to spend the winter in Africa.",
    "while queue:\n    node = queue.pop(0)\n    for child in node.children:\n        queue.append(child)",
    "The doctor advised him to drink more water, sleep eight hours a night and walk every day.",
    "Copper is a good conductor of electricity, which is why it is used in most household wiring.",
    "The bakery on the corner sells fresh croissants every morning until they run out around ten.",
    "In chess, the queen can move any number of squares along a row, a column or a diagonal.",
    "The hikers reached the summit just before sunset and watched the valley turn gold below them.",
    "Water molecules are made of two hydrogen atoms bonded to one oxygen atom.",
    "Thank you for your order. Your parcel will be delivered within three working days.",
    "The orchestra tuned their instruments while the audience slowly found their seats.",
    "Most spiders have eight eyes, but many of them still see the world quite poorly.",
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp.",
    "A leap year has 366 days, and February then has 29 days instead of 28.",
    "The city council voted to close the main street to cars on Sundays during the summer.",
    "She packed a map, a torch, some sandwiches and a warm jumper for the long walk.",
    "Sound travels faster in water than in air, and faster still in steel.",
    "The farmer checked the fences after the storm and found two of the gates blown open.",
    "numbers = [4, 8, 15, 16, 23, 42]\ntotal = sum(numbers)\nprint(total / len(numbers))",
]


def random_subspace(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """An orthonormal ``[d, k]`` basis of a uniformly random k-dimensional subspace (QR of a Gaussian)."""
    q, r = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@contextlib.contextmanager
def project_residual(model: torch.nn.Module, layer: int, mu: torch.Tensor, basis: torch.Tensor,
                     massive_ratio: float | None = None):
    """Within the ``with`` block, block ``layer``'s output ``x`` is replaced by ``mu + (x - mu) B B^T``.

    ``basis``: ``[d_model, k]`` with orthonormal columns. With ``massive_ratio``, rows whose norm is at
    least that many times the median row norm of their sequence pass unchanged. The hook is always
    removed on exit.
    """
    arch = architecture_of(model)
    (layer,) = check_layers(model, [layer], name="layer")
    d = model_dims(model)["d_model"]
    if basis.ndim != 2 or basis.shape[0] != d or mu.shape != (d,):
        raise BandwidthInputError(f"basis/mu (layer {layer}): expected [{d}, k] and [{d}], got "
                                  f"{tuple(basis.shape)} and {tuple(mu.shape)}")
    if massive_ratio is not None:
        massive_ratio = check_positive(massive_ratio, "massive_ratio")
    block = arch.blocks(model)[layer]

    def hook(mod, args, out):
        x = out[0] if isinstance(out, (tuple, list)) else out
        m, b = mu.to(x.device, x.dtype), basis.to(x.device, x.dtype)
        y = m + ((x - m) @ b) @ b.T
        if massive_ratio is not None:
            loud = massive_mask(x.norm(dim=-1, keepdim=True), massive_ratio, dim=-2)   # [batch, T, 1]
            y = torch.where(loud, x, y)
        if isinstance(out, tuple):
            return (y, *out[1:])
        if isinstance(out, list):
            return [y, *out[1:]]
        return y

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _logprobs(model, batches) -> list[torch.Tensor]:
    """Log-probabilities ``[B, T-1, vocab]`` predicting tokens 1..T-1 of each batch."""
    return [torch.log_softmax(model(**enc, use_cache=False).logits[:, :-1].float(), dim=-1) for enc in batches]


def _per_sequence(batches, logp, base_logp=None) -> torch.Tensor:
    """``[n_sequences, 3]``: summed next-token loss, summed KL(base || this) (0 without ``base_logp``)
    and the number of real predicted positions, per held-out sequence."""
    out = []
    for i, enc in enumerate(batches):
        target = enc["input_ids"][:, 1:]
        mask = (enc["attention_mask"][:, 1:] * enc["attention_mask"][:, :-1]).bool()
        lp = logp[i]
        nll = (-lp.gather(-1, target[..., None])[..., 0] * mask).double().sum(1)
        kl = ((base_logp[i].exp() * (base_logp[i] - lp)).sum(-1) * mask).double().sum(1) \
            if base_logp is not None else torch.zeros_like(nll)
        out.append(torch.stack([nll, kl, mask.sum(1).double()], 1))
    return torch.cat(out)


def _loss_and_kl(per_seq: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss and mean KL(base || this) over real positions, from :func:`_per_sequence`."""
    t = per_seq.sum(0)
    return float(t[0] / t[2]), float(t[1] / t[2])


def bootstrap_delta(per_seq: torch.Tensor, base_per_seq: torch.Tensor, n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``delta_loss`` over held-out *sequences*.

    ``per_seq``/``base_per_seq``: :func:`_per_sequence` of the modified and the unmodified model on the
    same sequences. Each resample draws sequences with replacement and recomputes
    ``delta = sum(nll) / sum(n) - sum(nll_base) / sum(n)`` (paired: the same tokens on both sides).
    Resampling whole sequences, not tokens, keeps the correlation of tokens within a text.
    """
    g = torch.Generator().manual_seed(seed)
    m = per_seq.shape[0]
    idx = torch.randint(0, m, (n_boot, m), generator=g)
    nll, nll0, n = per_seq[:, 0][idx].sum(1), base_per_seq[:, 0][idx].sum(1), per_seq[:, 2][idx].sum(1)
    d = (nll - nll0) / n
    lo, hi = torch.quantile(d, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=d.dtype))
    return float(lo), float(hi)


@dataclass
class CompressionCurve:
    """The measured curve (module docstring). ``rows``: one dict per (layer, k, subspace)."""
    layers: list[int]
    ks: list[int]
    base_loss: float
    tolerance: float
    rows: list[dict]
    explained_variance: dict
    n_random: int
    d_model: int
    n_calibration_tokens: int
    n_heldout_tokens: int
    skip_massive: bool = True
    massive_ratio: float = DEFAULT_MASSIVE_RATIO
    notes: list[str] = field(default_factory=list)
    smallest_k: dict = field(init=False)          # the rule of the module docstring, per layer
    smallest_k_random: dict = field(init=False)   # the same for the random baseline ({} without one)
    smallest_k_kl: dict = field(init=False)       # the same rule on the KL divergence

    def __post_init__(self):
        self.smallest_k = {L: _smallest_k(self.rows, L, "pca", self.tolerance) for L in self.layers}
        self.smallest_k_random = ({L: _smallest_k(self.rows, L, "random", self.tolerance) for L in self.layers}
                                  if self.n_random else {})
        self.smallest_k_kl = {L: _smallest_k(self.rows, L, "pca", self.tolerance, key="kl") for L in self.layers}
        if self.n_calibration_tokens <= self.d_model:
            self.notes.append(f"{self.n_calibration_tokens} calibration tokens <= d_model {self.d_model}: principal "
                              f"directions beyond {self.n_calibration_tokens - 1} carry no calibration variance "
                              "(their order is arbitrary)")

    def records(self) -> list[dict]:
        """``{layer, k, subspace ("pca"|"random"), loss, kl, delta_loss}`` (random: mean over draws)."""
        return [{k: r[k] for k in ("layer", "k", "subspace", "loss", "kl", "delta_loss")} for r in self.rows]

    def interval_records(self) -> list[dict]:
        """``records()`` plus the 95 % bootstrap interval of ``delta_loss`` over held-out sequences
        (``delta_loss_lo``, ``delta_loss_hi``) and, for random subspaces, every draw's ``delta_loss``."""
        keys = ("layer", "k", "subspace", "loss", "kl", "delta_loss", "delta_loss_lo", "delta_loss_hi", "draws_delta_loss")
        return [{k: r.get(k) for k in keys} for r in self.rows]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "ks": self.ks, "base_loss": self.base_loss,
                "tolerance": self.tolerance, "tolerance_unit": "nats of next-token loss (absolute)",
                "records": self.records(), "intervals": self.interval_records(), "random_kl_std": [r.get("kl_std") for r in self.rows],
                **{name: {str(k): v for k, v in getattr(self, name).items()}   # JSON keys are strings
                   for name in ("smallest_k", "smallest_k_random", "smallest_k_kl", "explained_variance")},
                "explained_variance_note": ("share of the fitted calibration rows' centred energy in "
                                            "the top-k subspace, per k in ks"),
                "skip_massive": self.skip_massive, "massive_ratio": self.massive_ratio, "n_random": self.n_random,
                "d_model": self.d_model, "n_calibration_tokens": self.n_calibration_tokens,
                "n_heldout_tokens": self.n_heldout_tokens, "notes": self.notes}


def _explained(x, mu, V, ks) -> list[float]:
    """Share of the fitted rows' centred energy inside the top-k subspace, for each k."""
    coords = (x.double() - mu) @ V
    total = float(coords.pow(2).sum())
    return [float(coords[:, :k].pow(2).sum()) / total for k in ks]


def _smallest_k(rows, layer, subspace, tolerance, key="delta_loss"):
    pts = sorted((r["k"], r[key]) for r in rows if r["layer"] == layer and r["subspace"] == subspace)
    best = None
    for k, dl in reversed(pts):
        if dl > tolerance:
            break
        best = k
    return best


def _check_ks(ks, d: int) -> list[int]:
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = [ks]
    if not isinstance(ks, Sequence) or len(ks) == 0:
        raise BandwidthInputError("ks: expected a non-empty list of subspace dimensions")
    return sorted({check_int(k, f"ks (each k of d_model={d})", 1, d) for k in ks})


def _heldout_batches(model, tokenizer, prompts, batch_size):
    """The held-out prompts' encoded batches and how many next-token predictions they hold."""
    batches = [enc for _, enc, _ in forward_batches(model, tokenizer, prompts, batch_size, max_length=None)]
    n = sum(int((e["attention_mask"][:, 1:] * e["attention_mask"][:, :-1]).sum()) for e in batches)
    if n == 0:
        raise BandwidthInputError("heldout_prompts: every prompt is a single token; nothing to predict")
    return batches, n


def _row(L, k, subspace, seq, loss, kl, base_seq, base_loss, seed, **extra) -> dict:
    """One row of the curve: loss, KL and delta_loss with its bootstrap interval over sequences."""
    lo, hi = bootstrap_delta(seq, base_seq, seed=seed)
    return {"layer": L, "k": k, "subspace": subspace, "loss": loss, "kl": kl, "delta_loss": loss - base_loss,
            "delta_loss_lo": lo, "delta_loss_hi": hi, **extra}


def _random_row(L, k, draws, base_seq, base_loss, seed) -> dict:
    """The random baseline's row: loss and KL averaged over the draws, the interval from the
    per-sequence mean over draws, each draw's delta_loss and the KL spread across draws."""
    t = torch.tensor([(loss, kl) for _, loss, kl in draws], dtype=torch.float64)
    seq = torch.stack([sq for sq, _, _ in draws]).mean(0)
    return _row(L, k, "random", seq, float(t[:, 0].mean()), float(t[:, 1].mean()), base_seq, base_loss, seed,
                draws_delta_loss=[float(v) - base_loss for v in t[:, 0]],
                kl_std=float(t[:, 1].std()) if len(draws) > 1 else None)


def compression_curve(run, layers, ks, heldout_prompts: Sequence[str] | None = None, n_random: int = 2,
                      tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, skip_massive: bool = True,
                      progress: bool = True) -> CompressionCurve:
    """Measure loss and KL when block L's output is projected onto k directions (module docstring).

    ``run``: a :class:`~residual_bandwidth.run.ResidualRun` whose prompts are the calibration
    prompts (e.g. ``ResidualRun(model, tokenizer, CALIBRATION_PROMPTS, kinds=["resid_post"],
    erasure=False)``); the fit reads its capture (``resid_post`` at ``layers``). ``layers``: block
    indices; ``ks``: subspace dimensions in ``1..d_model``; ``n_random``: random subspaces per
    (layer, k) (0 to skip the baseline); ``skip_massive``: leave rows at or above the run's massive
    ratio out of the fit and the projection. Default held-out prompts: the built-in ones;
    tolerance 0.05 nats.
    """
    model, massive_ratio = check_run(run, "a ResidualRun of the calibration prompts").model, run.massive_ratio
    layers, d = check_layers(model, layers), model_dims(model)["d_model"]
    ks, tolerance = _check_ks(ks, d), check_positive(tolerance, "tolerance")
    heldout = check_prompts(heldout_prompts if heldout_prompts is not None else HELDOUT_PROMPTS)
    keep_ratio = massive_ratio if skip_massive else None
    check_int(n_random, "n_random", low=0)
    cap = run.capture
    for L in layers:
        cap.get("resid_post", L)   # names a missing layer or kind
    batches, n_heldout = _heldout_batches(model, run.tokenizer, heldout, run.batch_size)
    base_logp = _logprobs(model, batches)
    base_seq = _per_sequence(batches, base_logp)
    base_loss, _ = _loss_and_kl(base_seq)
    gen = torch.Generator().manual_seed(seed)
    rows, explained = [], {}
    from tqdm.auto import tqdm
    bar = tqdm(total=len(layers) * len(ks) * (1 + n_random), desc="compression curve", disable=not progress)

    def measure(L, mu, P):   # (per-sequence losses, loss, KL) with block L's output projected onto P
        with project_residual(model, L, mu, P, keep_ratio):
            seq = _per_sequence(batches, _logprobs(model, batches), base_logp)
        bar.update(1)
        return (seq, *_loss_and_kl(seq))

    try:
        for L in layers:
            x = cap.get("resid_post", L)
            if skip_massive:
                x = x[~massive_mask(x.norm(dim=1), massive_ratio)]
            mu, V, _ = principal_directions(x, name="calibration residuals", layer=L)
            explained[L] = _explained(x, mu, V, ks)
            for k in ks:
                rows.append(_row(L, k, "pca", *measure(L, mu, V[:, :k]), base_seq, base_loss, seed))
                if n_random and k == d:
                    # a d-dimensional subspace is the whole space: every random draw is the identity
                    rows.append({**rows[-1], "subspace": "random", "kl_std": 0.0,
                                 "draws_delta_loss": [rows[-1]["delta_loss"]] * n_random})
                    bar.update(n_random)
                elif n_random:
                    draws = [measure(L, mu, random_subspace(d, k, gen)) for _ in range(n_random)]
                    rows.append(_random_row(L, k, draws, base_seq, base_loss, seed))
    finally:
        bar.close()
    return CompressionCurve(
        layers=layers, ks=ks, base_loss=base_loss, tolerance=tolerance, rows=rows,
        explained_variance=explained, n_random=n_random, d_model=d, n_calibration_tokens=cap.n_rows,
        n_heldout_tokens=n_heldout, skip_massive=bool(skip_massive), massive_ratio=massive_ratio)
