"""The maths of one multiple-proposal Metropolis step of ``power_mcmc``, as pure functions.

One step of the chain, from the state x (n(x) generated tokens), at a position i drawn
uniformly from 0..n(x)-1 (a state-dependent choice, probability 1/n(x)):

- The mixture over i is reversible for pi(z) = p(z)^alpha / Z iff, for each i, the kernel
  that resamples from i is reversible for pi'(z) = pi(z) / n(z) on the sequences sharing the
  prefix x[:i] (the factor 1/n is the probability of picking i from z, in both directions).
- Candidates y_1..y_K are drawn i.i.d. from q(.|x[:i]) (the model at temperature 1/alpha),
  y_0 = x. The importance weight of any z of that set for pi' over q is, up to a factor that
  is the same for all of them (the prefix terms cancel),
      log w(z) = alpha * S_p(z[i:]) - S_q(z[i:]) - log n(z)           (:func:`log_weight`)
  with S_p, S_q the sums of raw log p and proposal log q over the suffix from i.
- Given the K+1 points, the index of the state is distributed as w (Tjelmeland 2004; the
  i-SIR view of Andrieu, Lee & Vihola 2018): any move on the index that leaves that law
  invariant and treats the points symmetrically keeps pi' invariant. :func:`choose` uses the
  Metropolised Gibbs move on the *distinct* suffixes (points with equal suffixes are one value
  v of weight m_v * w(v), m_v its count): from the current value c, propose v != c with
  probability pi_v / (1 - pi_c), accept with min(1, (1 - pi_c) / (1 - pi_v)), pi_v the
  normalised value weights. It Peskun-dominates drawing the index from w (the plain i-SIR
  step): the probability of moving to each other value is at least pi_v. With K = 1 it is
  exactly the Metropolis-Hastings step of a single proposal y: accept with min(1, w(y)/w(x)),
      log w(y) - log w(x) = alpha*(S_p(y) - S_p(x)) + (S_q(x) - S_q(y)) + log(n(x)/n(y))
  (:func:`log_acceptance`), the ratio of Karan & Du's chain with the length term included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def log_weight(alpha: float, logp: Sequence[float], logq: Sequence[float], n: int) -> float:
    """log w(z) = alpha * S_p - S_q - log n(z) for the suffix of z from the resampled position."""
    return alpha * math.fsum(logp) - math.fsum(logq) - math.log(n)


def log_acceptance(
    alpha: float,
    old_logp: Sequence[float],
    old_logq: Sequence[float],
    new_logp: Sequence[float],
    new_logq: Sequence[float],
    n_old: int,
    n_new: int,
) -> float:
    """log w(new) - log w(old): the log Metropolis-Hastings ratio of a single proposal."""
    return log_weight(alpha, new_logp, new_logq, n_new) - log_weight(alpha, old_logp, old_logq, n_old)


def value_probabilities(log_weights: Sequence[float], keys: Sequence[object]) -> tuple[list[int], np.ndarray]:
    """Group points with equal ``keys`` (their suffixes) into values.

    Returns, for each distinct value in order of first appearance, the index of its first
    point, and the normalised value probabilities pi_v = m_v * w(v) / sum_u m_u * w(u).
    """
    first: dict[object, int] = {}
    for j, key in enumerate(keys):
        first.setdefault(key, j)
    index = {key: v for v, key in enumerate(first)}
    lw = np.asarray(log_weights, dtype=np.float64)
    w = np.exp(lw - lw.max())
    mass = np.zeros(len(first))
    np.add.at(mass, [index[key] for key in keys], w)
    return list(first.values()), mass / mass.sum()


def choose(log_weights: Sequence[float], keys: Sequence[object], u_propose: float, u_accept: float) -> int:
    """Index of the next state among the points; point 0 is the current state.

    1. Group the points into distinct values (:func:`value_probabilities`); c is point 0's.
    2. If there is no other value, stay (return 0).
    3. Propose v != c by inverting the CDF of pi_v / (1 - pi_c) over the other values (in
       order of first appearance) at ``u_propose``.
    4. Accept if ``u_accept`` < (1 - pi_c) / (1 - pi_v) (both sums over the *other* values,
       so a pi close to 1 loses no precision); return v's first point, else 0.
    """
    firsts, pi = value_probabilities(log_weights, keys)
    others = np.arange(1, len(firsts))  # value 0 is the current state's: point 0 comes first
    if len(others) == 0:
        return 0
    away = pi[others]  # pi_v for v != c; their sum is 1 - pi_c
    leave_c = float(away.sum())
    if leave_c <= 0.0:
        return 0
    cdf = np.cumsum(away) / leave_c
    v = int(others[min(int(np.searchsorted(cdf, u_propose, side="right")), len(others) - 1)])
    leave_v = float(pi[np.arange(len(firsts)) != v].sum())
    accept = u_accept * leave_v < leave_c
    return firsts[v] if accept else 0
