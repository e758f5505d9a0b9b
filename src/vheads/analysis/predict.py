"""The statistics of prediction, as pure functions on arrays: grouped folds, training-fold standardisation, an
L2-regularised logistic regression and a ridge regression (penalty chosen by inner cross-validation on the training
data alone), AUROC and its cluster bootstrap, leave-one-run-out.

No function here looks at evaluation data while fitting: `standardize` learns its means and scales from the training
rows, `cross_validate` fits each fold's model (penalty choice included) on the other folds only, and
`leave_one_out` fits each run's estimate on the other runs only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize

# Penalties tried for the logistic regression (on the summed log-loss of standardised features).
LOGISTIC_L2 = (1.0, 10.0, 100.0, 1000.0, 10000.0)
# Penalties tried for the ridge regression; inf is the intercept alone, i.e. the training runs' mean accuracy.
RIDGE_L2 = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, float("inf"))


def grouped_folds(groups: Sequence[object], k: int = 5, seed: int = 0, labels: np.ndarray | None = None) -> np.ndarray:
    """The fold (0..k-1) of every sample, all samples of one group (one image) in the same fold.

    Groups of one make-up (size, and with `labels` (0 / 1) how many of each class) are shuffled with `seed` and dealt
    round the folds, the largest first, each deal starting at the fold with the fewest samples of those classes so
    far: the folds get about the same number of samples, and of each class (stratified), so no fold's model learns a
    base rate that its test fold contradicts. ValueError when there are fewer groups than folds.
    """
    _, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(index.max()) + 1 if len(index) else 0
    if n_groups < k:
        raise ValueError(f"{n_groups} image group(s) cannot be cut into {k} folds")
    classes = np.zeros(len(index), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    counts = np.zeros((n_groups, int(classes.max()) + 1), dtype=np.int64)
    np.add.at(counts, (index, classes), 1)
    rng = np.random.default_rng(seed)
    makeups, kind = np.unique(counts, axis=0, return_inverse=True)
    kind = kind.reshape(-1)
    totals = np.maximum(counts.sum(axis=0), 1)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    filled = np.zeros((k, counts.shape[1]))
    for m in np.argsort(-makeups.sum(axis=1), kind="stable"):
        members = rng.permutation(np.flatnonzero(kind == m))
        order = np.argsort(filled @ (makeups[m] / totals), kind="stable")
        fold_of_group[members] = order[np.arange(len(members)) % k]
        filled += np.bincount(fold_of_group[members], minlength=k)[:, None] * makeups[m][None, :]
    return fold_of_group[index]


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices scaled with the training rows' means and standard deviations; a NaN (in either) becomes the
    training mean, i.e. 0. Columns with no value or no spread in the training rows are 0 everywhere."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    seen = ~np.isnan(train)
    count = seen.sum(axis=0)
    filled = np.where(seen, train, 0.0)
    mean = filled.sum(axis=0) / np.maximum(count, 1)
    filled += np.where(seen, 0.0, mean)
    std = filled.std(axis=0)
    inverse = np.where(std > 1e-12, 1.0 / np.where(std > 1e-12, std, 1.0), 0.0)
    filled -= mean
    filled *= inverse
    shown = np.where(np.isnan(test), 0.0, (test - mean) * inverse)
    return filled, shown


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, start: np.ndarray | None = None) -> np.ndarray:
    """Coefficients (intercept last) minimising the summed log-loss plus l2/2 |w|^2 (the intercept unpenalised).

    `x` [n, p] (standardised), `y` [n] of 0 / 1; L-BFGS from `start` (a warm start) or zero.
    """
    n, p = x.shape
    target = np.asarray(y, dtype=np.float64)
    l2 = float(l2)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        coef = w[:-1]
        z = x @ coef + w[-1]
        value = float(np.logaddexp(0.0, z).sum() - target @ z + 0.5 * l2 * coef @ coef)
        residual = _sigmoid(z) - target
        return value, np.append(x.T @ residual + l2 * coef, residual.sum())

    w0 = np.zeros(p + 1) if start is None else start
    if start is None:
        rate = np.clip(target.mean(), 1e-6, 1 - 1e-6)
        w0[-1] = np.log(rate / (1 - rate))
    result = optimize.minimize(loss, w0, jac=True, method="L-BFGS-B", options={"maxiter": 500, "gtol": 1e-6})
    return result.x


def predict_logistic(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The fitted probability of class 1 for every row of `x`."""
    return _sigmoid(np.asarray(x, dtype=np.float64) @ w[:-1] + w[-1])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood of 0 / 1 labels under probabilities `p`."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_path(x: np.ndarray, y: np.ndarray, l2s: Sequence[float]) -> list[np.ndarray]:
    """Logistic fits for every penalty of `l2s` (strongest first, each warm-starting the next), in the given order."""
    order = np.argsort(-np.asarray(l2s, dtype=np.float64))
    fits: dict[int, np.ndarray] = {}
    start = None
    for i in order:
        start = fits[int(i)] = fit_logistic(x, y, float(l2s[i]), start)
    return [fits[i] for i in range(len(l2s))]


Features = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class CrossValidated:
    """Out-of-fold probabilities of class 1, the fold of every sample and the penalty each fold's model chose."""

    p: np.ndarray
    fold: np.ndarray
    l2: list[float]


def choose_l2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, l2s: Sequence[float], inner: int = 3,
              seed: int = 0) -> float:
    """The penalty of `l2s` with the lowest grouped inner cross-validated log-loss on these (training) rows; ties go
    to the stronger penalty. Standardisation is refitted inside every inner fold."""
    if len(l2s) == 1:
        return float(l2s[0])
    folds = grouped_folds(groups, min(inner, len(np.unique(groups))), seed, labels=y)
    losses = np.zeros(len(l2s))
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        if len(np.unique(y[train])) < 2:
            continue
        xt, xv = standardize(x[train], x[test])
        for i, w in enumerate(fit_path(xt, y[train], l2s)):
            losses[i] += log_loss(y[test], predict_logistic(xv, w)) * test.sum()
    best = np.flatnonzero(losses <= losses.min() + 1e-9)
    return float(max(l2s[i] for i in best))


def cross_validate(features: Features, y: np.ndarray, folds: np.ndarray, groups: np.ndarray,
                   l2s: Sequence[float] = LOGISTIC_L2, seed: int = 0) -> CrossValidated:
    """Out-of-fold probabilities of a logistic regression: for each fold, `features(train_rows, test_rows)` builds
    the two matrices from the training rows alone (e.g. the heads chosen on them), the penalty is chosen by grouped
    inner cross-validation on the training rows, and the model fitted on them predicts the fold."""
    y = np.asarray(y, dtype=np.float64)
    p = np.full(len(y), np.nan)
    chosen = []
    for f in np.unique(folds):
        train, test = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        x_train, x_test = features(train, test)
        l2 = choose_l2(x_train, y[train], np.asarray(groups)[train], l2s, seed=seed)
        xt, xv = standardize(x_train, x_test)
        p[test] = predict_logistic(xv, fit_logistic(xt, y[train], l2))
        chosen.append(l2)
    return CrossValidated(p, np.asarray(folds), chosen)


def auroc(y: np.ndarray, score: np.ndarray, strata: np.ndarray | None = None) -> float:
    """Area under the ROC curve: the chance that a random positive (y = 1) scores above a random negative, ties
    counted half (Mann-Whitney); NaN without both classes.

    With `strata` (the folds) only pairs within one stratum are compared: each fold's model has its own intercept, so
    ranking one fold's samples against another's would measure the folds, not the samples (with uninformative
    figures it drives the pooled AUROC below 0.5, since a fold whose training part has more errors has fewer itself).
    """
    weights = np.ones((1, len(y)))
    return float(_stratified_auroc(np.asarray(y), np.asarray(score, dtype=np.float64), weights, strata)[0])


def _stratified_auroc(y: np.ndarray, score: np.ndarray, weights: np.ndarray,
                      strata: np.ndarray | None) -> np.ndarray:
    """AUROC under each row of sample weights [replicates, n], pairs compared within strata only."""
    if strata is None:
        strata = np.zeros(len(y), dtype=np.int64)
    num = np.zeros(weights.shape[0])
    den = np.zeros(weights.shape[0])
    for stratum in np.unique(strata):
        part = np.flatnonzero(strata == stratum)
        a, b = _pairs(y[part], score[part], weights[:, part])
        num += a
        den += b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _pairs(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted concordant positive-negative pairs (ties half) and all such pairs, per row of `weights`."""
    order = np.argsort(score, kind="stable")
    s, positive = score[order], np.asarray(y, dtype=bool)[order]
    w = weights[:, order]
    if len(s) == 0:
        return np.zeros(w.shape[0]), np.zeros(w.shape[0])
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    return (pos * (below + 0.5 * neg)).sum(axis=1), pos.sum(axis=1) * neg.sum(axis=1)


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    s, positive = np.asarray(score)[order], np.asarray(y, dtype=bool)[order]
    last = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(positive)[last], np.cumsum(~positive)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def bootstrap_auroc(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95, strata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile intervals of the AUROC of every score column (pairs within `strata` only, as `auroc`), and the
    AUROC replicates themselves.

    `scores` [n, m]. A cluster bootstrap: whole groups (images) are drawn with replacement, so samples that share
    an image stay together as the folds kept them. Returns (low [m], high [m], replicates [n_boot, m]); the
    replicates let a caller bound a difference between two scores (paired: the same draws for every column).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(len(y), -1)
    _, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(index.max()) + 1 if len(index) else 0
    rng = np.random.default_rng(seed)
    replicates = np.empty((n_boot, scores.shape[1]))
    for lo in range(0, n_boot, 100):
        hi = min(n_boot, lo + 100)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=hi - lo).astype(np.float64)
        weights = counts[:, index]
        for j in range(scores.shape[1]):
            replicates[lo:hi, j] = _stratified_auroc(np.asarray(y), scores[:, j], weights, strata)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(replicates, [tail, 100 - tail], axis=0)
    return low, high, replicates


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap replicates (NaN ignored)."""
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Ridge coefficients (intercept last) on standardised `x`: minimise |y - xw - b|^2 + l2 |w|^2, the intercept
    unpenalised; l2 = inf gives the intercept alone (the mean of y)."""
    y = np.asarray(y, dtype=np.float64)
    w = np.zeros(x.shape[1] + 1)
    w[-1] = y.mean()
    if np.isinf(l2) or x.shape[1] == 0:
        return w
    xc = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    coef = vt.T @ ((s / (s * s + l2)) * (u.T @ (y - y.mean())))
    w[:-1] = coef
    w[-1] = y.mean() - x.mean(axis=0) @ coef
    return w


def predict_ridge(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) @ w[:-1] + w[-1]


def ridge_estimate(x_train: np.ndarray, y_train: np.ndarray, x_new: np.ndarray,
                   l2s: Sequence[float] = RIDGE_L2) -> tuple[np.ndarray, float]:
    """Ridge estimates for `x_new` from the training rows, the penalty chosen by leave-one-out over the training rows
    alone (standardisation refitted each time; ties go to the stronger penalty); returns (estimates, penalty)."""
    y_train = np.asarray(y_train, dtype=np.float64)
    n = len(y_train)
    if n >= 3 and len(l2s) > 1:
        errors = np.zeros(len(l2s))
        for i in range(n):
            keep = np.arange(n) != i
            xt, xv = standardize(x_train[keep], x_train[i:i + 1])
            for j, l2 in enumerate(l2s):
                errors[j] += float((predict_ridge(xv, fit_ridge(xt, y_train[keep], l2))[0] - y_train[i]) ** 2)
        best = np.flatnonzero(errors <= errors.min() * (1 + 1e-9) + 1e-15)
        l2 = float(max(l2s[j] for j in best))
    else:
        l2 = float(l2s[-1])
    xt, xv = standardize(x_train, x_new)
    return predict_ridge(xv, fit_ridge(xt, y_train, l2)), l2


def leave_one_out(x: np.ndarray, y: np.ndarray, l2s: Sequence[float] = RIDGE_L2) -> tuple[np.ndarray, np.ndarray]:
    """For every row (run), the ridge estimate fitted on the other rows alone (its penalty chosen by leave-one-out
    among them) and the naive baseline, the mean of the others' y; returns (estimates, baselines)."""
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    estimates, baselines = np.empty(n), np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        estimates[i] = ridge_estimate(x[keep], y[keep], x[i:i + 1], l2s)[0][0]
        baselines[i] = y[keep].mean()
    return estimates, baselines
