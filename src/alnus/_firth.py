"""Firth-penalised logistic regression with profile-likelihood intervals, each result checked.

`firthmodels` fits it (Newton-Raphson with step-halving), but on nearly separated data the penalised likelihood
l(b) + log|I(b)| / 2 can have more than one stationary point, and its solver can stop at a lower one: both solve
Firth's modified score equations, and the library's profile intervals around the lower one came out of no width or
not holding their own estimate (an attack review: 7% of small quasi-separated validation sets), or missing where
the profile does cross its cut-off. So the penalised log-likelihood is maximised here from several starts (the
library's fit among them) with scipy and the highest kept; each coefficient's interval is found by root-finding on
its profile, and a profile point above the maximum (a higher peak found on the way) restarts the fit from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Restarts from a higher peak found while profiling, at most.
_RESTARTS = 3
# Steps outward from the estimate while looking for a profile bound; beyond them the bound is taken as infinite.
_MAX_STEPS = 60
# Newton-Raphson iterations before another method is tried (each a few passes over the cases).
_NEWTON_STEPS = 50


class FirthError(ValueError):
    """No checked penalised fit, or no finite interval: the message says which."""


@dataclass(frozen=True)
class FirthFit:
    """The penalised maximum: `coef` (intercept first, then the design's columns), its penalised log-likelihood,
    and the profile-likelihood interval of each coefficient asked for (rows in the order asked)."""

    coef: np.ndarray
    loglik: float
    ci: np.ndarray


def penalised_loglik(beta: np.ndarray, design: np.ndarray, y: np.ndarray) -> float:
    """l(b) + log det I(b) / 2 of a logistic regression (`design` with its intercept column); -inf where the
    information matrix is singular (every case's probability rounded to 0 or 1)."""
    eta = design @ beta
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    p = 0.5 * (1.0 + np.tanh(0.5 * eta))  # the logistic function, without overflow
    info = design.T @ (design * (p * (1.0 - p))[:, None])
    sign, logdet = np.linalg.slogdet(info)
    return loglik + 0.5 * logdet if sign > 0 and np.isfinite(logdet) else -np.inf


def _modified_score(beta: np.ndarray, design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Firth's modified score X'(y - p + h (1/2 - p)), h the hat values of the weighted design: the gradient."""
    eta = design @ beta
    p = 0.5 * (1.0 + np.tanh(0.5 * eta))
    w = p * (1.0 - p)
    info = design.T @ (design * w[:, None])
    try:
        h = w * np.einsum("ij,ji->i", design, np.linalg.solve(info, design.T))
    except np.linalg.LinAlgError:
        return np.zeros_like(beta)  # a singular point: the objective is -inf there and the line search backs off
    return design.T @ (y - p + h * (0.5 - p))


def _information(beta: np.ndarray, design: np.ndarray) -> np.ndarray:
    eta = design @ beta
    p = 0.5 * (1.0 + np.tanh(0.5 * eta))
    return design.T @ (design * (p * (1.0 - p))[:, None])


def _curvature(beta: np.ndarray, design: np.ndarray, y: np.ndarray, free: list[int]) -> np.ndarray:
    """Minus the Hessian of the penalised log-likelihood in the `free` coefficients, by central differences of the
    exact gradient, where it is positive definite; else the information matrix (Firth's scoring step). The
    information leaves out the penalty's curvature, which dominates on nearly separated data, and its steps then
    crawled (hundreds of iterations per profile point)."""
    hessian = np.empty((len(free), len(free)))
    for column, i in enumerate(free):
        h = 1e-5 * max(1.0, abs(beta[i]))
        up, down = beta.copy(), beta.copy()
        up[i] += h
        down[i] -= h
        hessian[:, column] = (_modified_score(down, design, y) - _modified_score(up, design, y))[free] / (2 * h)
    hessian = (hessian + hessian.T) / 2
    if np.isfinite(hessian).all():
        try:
            np.linalg.cholesky(hessian)
            return hessian
        except np.linalg.LinAlgError:
            pass
    return _information(beta, design)[np.ix_(free, free)]


def _newton(design: np.ndarray, y: np.ndarray, beta: np.ndarray, free: list[int]) -> tuple[np.ndarray, float] | None:
    """Newton-Raphson on the `free` coefficients from `beta` (`_curvature` as minus the Hessian, halving a step that
    lowers the penalised likelihood): a few iterations from a warm start; None when it does not settle."""
    value = penalised_loglik(beta, design, y)
    tolerance = 1e-8 * max(1.0, len(y) ** 0.5)  # the score is a sum over the cases: its rounding grows with them
    for _ in range(_NEWTON_STEPS):
        score = _modified_score(beta, design, y)[free]
        if np.abs(score).max() < tolerance:
            return beta, value
        try:
            delta = np.linalg.solve(_curvature(beta, design, y, free), score)
        except np.linalg.LinAlgError:
            return None
        step = 1.0
        while step > 1e-8:
            trial = beta.copy()
            trial[free] += step * delta
            found = penalised_loglik(trial, design, y)
            if found >= value - 1e-12:
                break
            step /= 2
        else:
            return None
        if np.abs(step * delta).max() < 1e-10 and abs(found - value) < 1e-12:
            # At the limit of the arithmetic: settled if the score is small on the scale of the data, else stuck.
            return (trial, found) if np.abs(score).max() < 1e-4 * max(1.0, len(y) ** 0.5) else None
        beta, value = trial, found
    return None


def _maximise(design: np.ndarray, y: np.ndarray, start: np.ndarray, fixed: int | None = None,
              value: float = 0.0) -> tuple[np.ndarray, float]:  # fmt: skip
    """The penalised maximum from `start` with coefficient `fixed` held at `value` when given; (full coefficients,
    penalised log-likelihood). Newton-Raphson first; where it does not settle, BFGS on the exact gradient and Newton
    from where BFGS stopped."""
    from scipy.optimize import minimize

    free = [i for i in range(design.shape[1]) if i != fixed]
    begin = np.asarray(start, dtype=float).copy()
    if fixed is not None:
        begin[fixed] = value
    settled = _newton(design, y, begin, free)
    if settled is not None:
        return settled

    def full(b: np.ndarray) -> np.ndarray:
        out = begin.copy()
        out[free] = b
        return out

    def objective(b: np.ndarray) -> float:
        found = penalised_loglik(full(b), design, y)
        return -found if np.isfinite(found) else 1e300

    def gradient(b: np.ndarray) -> np.ndarray:
        return -_modified_score(full(b), design, y)[free]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # line-search and overflow chatter: the result is checked by the caller
        best = minimize(objective, begin[free], jac=gradient, method="BFGS", options={"gtol": 1e-9, "maxiter": 5000})
    found = full(best.x), -float(best.fun)
    polished = _newton(design, y, found[0], free)  # BFGS near the peak, Newton onto it
    return polished if polished is not None and polished[1] >= found[1] else found


def _starts(design: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Where the search begins: firthmodels' fit (when it gives one), zero, and ridge-penalised fits of three
    strengths (each a different guess of how far the separation pushes the coefficients)."""
    from sklearn.linear_model import LogisticRegression

    starts = [np.zeros(design.shape[1])]
    x = design[:, 1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from firthmodels import FirthLogisticRegression

            fit = FirthLogisticRegression(max_iter=200).fit(x, y)
            starts.append(np.r_[fit.intercept_, fit.coef_])
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            pass  # the library found no fit: the other starts remain
        for strength in (0.1, 1.0, 100.0):
            ridge = LogisticRegression(C=strength, max_iter=5000).fit(x, y)
            starts.append(np.r_[ridge.intercept_, ridge.coef_[0]])
    return [s for s in starts if np.isfinite(s).all()]


def _profile(design: np.ndarray, y: np.ndarray, beta: np.ndarray, index: int, value: float,
             warm: np.ndarray | None = None) -> tuple[np.ndarray, float]:  # fmt: skip
    """The profile at coefficient `index` = `value`: the penalised maximum over the others, the best from the warm start
    (the previous profile point), the estimate, the estimate with its intercept moved so that the mean linear predictor
    stays put, and the other weight at 0 with the intercept of the mean outcome (the profile's other coefficients can
    run far from the estimate's: a single start stalled below the profile and put interval ends where the search failed,
    not where the profile crosses). Also each other weight two, four and eight standard errors either side of the
    estimate's: the profile can have two local maxima in the other weight (an attack review: with BI-RADS separating
    40 cases, every other start stayed on the lower maximum of the model's weight, and the reader's interval ended far
    too early; a later one: on 20 cases the higher maximum lay beyond two standard errors, and the interval ended
    where the profile was still above its cut-off)."""
    shifted = beta.copy()
    shifted[0] -= (value - beta[index]) * float(design[:, index].mean())
    centred = np.zeros_like(beta)  # the other weight 0, the intercept giving the mean outcome at the mean case
    mean_y = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    centred[0] = np.log(mean_y / (1 - mean_y)) - value * float(design[:, index].mean())
    spread = []
    se = np.sqrt(np.abs(np.diag(np.linalg.pinv(_information(beta, design)))))
    for other in range(1, len(beta)):
        for sign in (-8.0, -4.0, -2.0, 2.0, 4.0, 8.0) if other != index and np.isfinite(se[other]) else ():
            moved = shifted.copy()
            moved[other] += sign * se[other]
            moved[0] -= sign * se[other] * float(design[:, other].mean())
            spread.append(moved)
    starts = [s for s in (warm, beta, shifted, centred, *spread) if s is not None]
    return max((_maximise(design, y, s, fixed=index, value=value) for s in starts), key=lambda found: found[1])


def _bound(design: np.ndarray, y: np.ndarray, beta: np.ndarray, index: int, direction: int, cutoff: float,
           peak: float) -> tuple[float, np.ndarray | None]:  # fmt: skip
    """One end of coefficient `index`'s profile interval: where the profile falls to `cutoff`; (bound, None), or
    (nan, a higher point) when the profile rises above `peak` on the way (the fit was not the highest)."""
    from scipy.optimize import brentq

    warm = beta.copy()
    step = max(0.25, 0.1 * abs(beta[index]))
    inner, outer = beta[index], beta[index] + direction * step
    for _ in range(_MAX_STEPS):
        point, value = _profile(design, y, beta, index, outer, warm)
        if value > peak + 1e-7:
            return float("nan"), point
        if value < cutoff:
            break
        warm, inner, outer = point, outer, outer + direction * step
        step *= 1.5
    else:
        return float(direction * np.inf), None
    higher: list[np.ndarray] = []

    def excess(b: float) -> float:
        point, value = _profile(design, y, beta, index, b, warm)
        if value > peak + 1e-7:
            higher.append(point)
        return value - cutoff

    end = float(brentq(excess, min(inner, outer), max(inner, outer), xtol=1e-7))
    return (float("nan"), higher[0]) if higher else (end, None)


def fit_firth(x: np.ndarray, y: np.ndarray, ci_for: Sequence[int] = (1, 2), alpha: float = 0.05) -> FirthFit:
    """Firth's logistic regression of `y` (0/1) on the columns of `x` (an intercept is added: coefficient 0), with
    the profile-likelihood 1 - alpha interval of each coefficient in `ci_for`.

    Raises:
        FirthError: no finite maximum, or an interval that is infinite or does not hold its estimate; or cases it
            cannot fit (values that are not finite numbers, labels other than 0 and 1 or of one class only), or an
            interval asked of the intercept or of no column (the search runs on centred columns, where the
            intercept is another parameter: its interval would not be the intercept's).
    """
    from scipy.stats import chi2

    x = np.asarray(x, dtype=float)
    yf = np.asarray(y, dtype=float)
    if x.ndim != 2 or yf.shape != (len(x),):
        raise FirthError(f"give a 2-D design and one label per row: shapes {x.shape} and {yf.shape}")
    if not (np.isfinite(x).all() and np.isin(yf, (0.0, 1.0)).all()):
        raise FirthError("every value must be a finite number and every label 0 or 1")
    if yf.min() == yf.max():
        raise FirthError("the labels are of one class only, so the weights say nothing")
    wrong = [i for i in ci_for if not (isinstance(i, (int, np.integer)) and 1 <= i <= x.shape[1])]
    if wrong:
        raise FirthError(f"intervals are given for the columns' weights, 1 to {x.shape[1]}, not {wrong}")
    if np.linalg.matrix_rank(np.column_stack([np.ones(len(x)), x])) < x.shape[1] + 1:
        raise FirthError("the columns are linearly dependent (one is a linear function of the other), so their "
                         "weights cannot be told apart")  # fmt: skip
    # Searched on centred and scaled columns (a logit of +-16 beside a BI-RADS of 2-5 stalled the searches): the
    # penalised likelihood is the same function of the model's predictions, so the fit and its intervals map back.
    centre, scale = x.mean(axis=0), x.std(axis=0)
    design = np.column_stack([np.ones(len(x)), (x - centre) / scale])
    fit = _fit_scaled(design, yf, ci_for, chi2.ppf(1 - alpha, 1) / 2)
    coef = np.r_[fit.coef[0] - float(np.sum(fit.coef[1:] * centre / scale)), fit.coef[1:] / scale]
    ci = fit.ci / scale[np.asarray(ci_for) - 1][:, None]
    coef.setflags(write=False)  # kept in a cache: read-only, so no caller can change what others get
    ci.setflags(write=False)
    return FirthFit(coef, penalised_loglik(coef, np.column_stack([np.ones(len(x)), x]), yf), ci)


def _fit_scaled(design: np.ndarray, yf: np.ndarray, ci_for: Sequence[int], drop: float) -> FirthFit:
    """`fit_firth` on a design of centred, scaled columns: the maximum, then each interval on its profile."""
    candidates = [_maximise(design, yf, start) for start in _starts(design, yf)]
    beta, peak = max(candidates, key=lambda found: found[1])
    for _ in range(_RESTARTS + 1):
        if not np.isfinite(peak) or np.abs(_modified_score(beta, design, yf)).max() > 1e-3 * max(1.0, len(yf) ** 0.5):
            raise FirthError("the penalised likelihood has no finite maximum the search could confirm")
        cutoff = peak - drop
        rows, higher = [], None
        for index in ci_for:
            ends = [_bound(design, yf, beta, index, d, cutoff, peak) for d in (-1, 1)]
            higher = next((point for _, point in ends if point is not None), None)
            if higher is not None:
                break
            rows.append([ends[0][0], ends[1][0]])
        if higher is None:
            ci = np.array(rows, dtype=float)
            if not np.isfinite(ci).all():
                raise FirthError("a coefficient's profile-likelihood interval has no finite end")
            if not ((ci[:, 0] < beta[list(ci_for)]) & (beta[list(ci_for)] < ci[:, 1])).all():
                raise FirthError("a profile-likelihood interval does not hold its estimate")
            return FirthFit(beta, peak, ci)
        beta, peak = _maximise(design, yf, higher)  # a higher peak than the one found: start again from it
    raise FirthError("the search kept finding higher peaks of the penalised likelihood")
