"""Quality of generated 8x8 digits, judged by a small classifier trained on real digits.

    python -m kve_fast.models.quality --n 256 --steps 50 --grid /tmp/digits_grid.png

Metrics for a batch of generated digits in [0, 1], shaped (N, 1, 8, 8):

* ``confidence``: mean max class probability of the classifier;
* ``accepted``: share with max probability >= ``accept_threshold`` (0.9);
* ``classes_covered`` (of 10) and the class histogram of the classifier's argmax;
* ``fd``: Frechet distance between the classifier's hidden-layer features of the generated digits and
  of held-out real digits (half A of the held-out split), next to ``fd_floor``: the same distance for
  as many held-out real digits (from the disjoint half B), averaged over a few subsets. The floor is the
  value a perfect generator would score at that sample size (the estimate is biased upwards for small N).

The classifier (an sklearn MLP, one hidden layer of 32 ReLUs) is fit on a stratified half of the 1,797
digits; its accuracy on the other half is ``heldout_accuracy``. Everything is deterministic given the
seeds. scikit-learn is imported lazily, inside functions only.

Digits are drawn with ``sample_digits``: kve_fast's pipeline, bit-exact with diffusers' reference
sampler (tests/test_digits_model.py checks that on this model).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
import torch

ACCEPT_THRESHOLD = 0.9


# ----------------------------------------------------------------------------------------------------
# Sampling


def sample_digits(model: str = "digits", n: int = 256, seed: int = 0, num_inference_steps: int = 50,
                  **call) -> torch.Tensor:
    """``n`` digits in [0, 1], (n, 1, 8, 8), from kve_fast's pipeline (bit-exact with the reference
    sampler) with one ``torch.Generator`` seeded ``seed``; ``model`` is a name, a folder or a UNet."""
    import kve_fast

    if isinstance(model, torch.nn.Module):
        pipe = kve_fast.KarrasVePipeline(model, kve_fast.KarrasVeScheduler())
    else:
        pipe = kve_fast.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(n, num_inference_steps, torch.Generator().manual_seed(seed), output_type="pt", **call).images
    return images.cpu()


# ----------------------------------------------------------------------------------------------------
# The judge: a classifier on real digits


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as float32 (N, 64) in [0, 1] and int labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


@dataclass
class DigitJudge:
    """An MLP digit classifier plus held-out real features for Frechet distances."""

    clf: object
    heldout_accuracy: float
    real_a: np.ndarray  # held-out real digits, half A (the reference set), (Na, 64)
    real_b: np.ndarray  # held-out real digits, half B (for the floor), (Nb, 64)
    seed: int = 0
    _stats_a: tuple = field(default=None, repr=False)

    def features(self, x64: np.ndarray) -> np.ndarray:
        """Hidden-layer (ReLU) activations of the MLP."""
        h = x64.astype(np.float64) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
        return np.maximum(h, 0.0)

    def proba(self, x64: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(x64.astype(np.float64))

    def stats_a(self):
        if self._stats_a is None:
            self._stats_a = _mean_cov(self.features(self.real_a))
        return self._stats_a

    def fd_to_real(self, x64: np.ndarray) -> float:
        return frechet_distance(_mean_cov(self.features(x64)), self.stats_a())

    def fd_floor(self, n: int, repeats: int = 5) -> float:
        """Mean FD of ``n`` real held-out digits (half B) to half A, over ``repeats`` seeded subsets."""
        rng = np.random.default_rng(self.seed + 7)
        n = min(n, len(self.real_b))
        vals = [self.fd_to_real(self.real_b[rng.choice(len(self.real_b), n, replace=False)]) for _ in range(repeats)]
        return float(np.mean(vals))


_JUDGES: dict = {}


def fit_judge(seed: int = 0) -> DigitJudge:
    """Fit (once per process and seed) the classifier on a stratified half of the digits."""
    if seed in _JUDGES:
        return _JUDGES[seed]
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = real_digits()
    x_tr, x_ho, y_tr, y_ho = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    x_a, x_b = train_test_split(x_ho, test_size=0.5, stratify=y_ho, random_state=seed + 1)
    clf = MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-3, max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_tr.astype(np.float64), y_tr)
    acc = float((clf.predict(x_ho.astype(np.float64)) == y_ho).mean())
    judge = DigitJudge(clf=clf, heldout_accuracy=acc, real_a=x_a, real_b=x_b, seed=seed)
    _JUDGES[seed] = judge
    return judge


def _mean_cov(f: np.ndarray):
    f = np.asarray(f, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(stats1, stats2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions."""
    mu1, s1 = stats1
    mu2, s2 = stats2
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------------------------------
# Metrics


def evaluate_images(images: torch.Tensor | np.ndarray, judge: DigitJudge | None = None,
                    accept_threshold: float = ACCEPT_THRESHOLD) -> dict:
    """Quality metrics of generated digits (N, 1, 8, 8) in [0, 1]."""
    judge = judge or fit_judge()
    x = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
        raise ValueError(f"expected (N, 1, 8, 8) images, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or inf")
    x64 = x.reshape(len(x), 64)
    p = judge.proba(x64)
    conf = p.max(axis=1)
    hist = np.bincount(p.argmax(axis=1), minlength=10)
    return {
        "n": int(len(x)),
        "confidence": float(conf.mean()),
        "accepted": float((conf >= accept_threshold).mean()),
        "classes_covered": int((hist > 0).sum()),
        "class_histogram": hist.tolist(),
        "fd": judge.fd_to_real(x64),
        "fd_floor": judge.fd_floor(len(x)),
        "heldout_accuracy": judge.heldout_accuracy,
    }


def real_baseline(n: int, judge: DigitJudge | None = None) -> dict:
    """The metrics of ``n`` held-out real digits (half B), for comparison."""
    judge = judge or fit_judge()
    x = judge.real_b[:n].reshape(-1, 1, 8, 8)
    return evaluate_images(x, judge)


def format_table(rows: dict[str, dict]) -> str:
    cols = [("confidence", "{:.3f}"), ("accepted", "{:.3f}"), ("classes_covered", "{:d}/10"),
            ("fd", "{:.3f}"), ("fd_floor", "{:.3f}")]
    head = f"{'':<24}" + "".join(f"{c:>16}" for c, _ in cols) + "   class histogram"
    lines = [head]
    for name, r in rows.items():
        lines.append(f"{name:<24}" + "".join(f"{fmt.format(r[c]):>16}" for c, fmt in cols) + f"   {r['class_histogram']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Sample digits with kve_fast and print quality metrics.")
    p.add_argument("--model", default="digits", help="bundled model name or a local folder")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="num_inference_steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None, help="save a PNG grid of the samples here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    judge = fit_judge(0)
    t0 = time.perf_counter()
    images = sample_digits(args.model, args.n, args.seed, args.steps)
    dt = time.perf_counter() - t0
    if args.grid:
        from ..images import make_grid

        arrays = (images[:256].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        make_grid(arrays, 16, 4).save(args.grid)
    res = evaluate_images(images, judge)
    print(f"classifier held-out accuracy: {judge.heldout_accuracy:.4f} "
          f"(MLP 64-32-10 on {len(judge.real_a) + len(judge.real_b)} held-out real digits)")
    print(f"{args.n} digits x {args.steps} steps in {dt:.2f}s ({args.threads} thread(s))")
    print(format_table({"generated": res, "real held-out (half B)": real_baseline(args.n, judge)}))
    if args.grid:
        print(f"grid saved to {args.grid}")


if __name__ == "__main__":
    main()
