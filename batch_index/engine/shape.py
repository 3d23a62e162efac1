"""Shift- and amplitude-invariant similarity: z-normalised signals compared at their best alignment.

A 10-s window starts wherever the recorder cut it, and its gain and baseline vary; the raw-sample
metrics compare samples at equal offsets, so they rank phase before shape. Two metrics here:

- ``shape``: the maximum normalised cross-correlation (NCC) of the z-normalised signals over lags
  ``|l| <= max_lag``, in [-1, 1]. Each signal is centred and scaled to unit norm, so
  ``NCC(l) = sum_t q[t] x[t - l]`` (the SBD convention of Paparrizos and Gravano, k-Shape, 2015: the
  linear cross-correlation divided by the full norms, i.e. by ``n`` for z-normalised signals, not by
  the overlap). Dividing by the overlap would let a few overlapping samples at a large lag score
  near 1 and would break the spectral upper bound the index relies on; dividing by ``n`` costs a
  shifted copy the part it does not share (a 1-s shift of a 10-s window scores about 0.9, still far
  above other windows, see bench/results/shape).
- ``zeuclidean``: ``1 / (1 + |zq - zx|)`` on z-normalised signals (population std, the UCR
  convention), where ``|zq - zx|^2 = 2 n (1 - pearson)``: the same order as cosine on centred signals.

Flat windows (a lead off: standard deviation ~0) have no shape: they z-normalise to zeros, score 0
under ``shape`` against anything (as cosine scores a zero vector), and ``zeuclidean`` measures them
as the zero vector (distance sqrt(n) to any non-flat signal).

All NCC lags come from one FFT per signal (``scipy.fft``, zero-padded to a fast length of at least
``n + max_lag``, so the circular correlation equals the linear one at every lag considered).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
import scipy.fft as sfft

from batch_index.errors import InvalidInputError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

SHAPE_METRICS: Final[tuple[str, ...]] = ("shape", "zeuclidean")
#: default lag bound as a fraction of the signal length: 1.5 s of a 10-s window (375 samples at
#: 250 Hz), a 1-s misalignment with margin; UCR series carry no sampling rate, so a fraction it is
DEFAULT_MAX_LAG_FRACTION: Final[float] = 0.15
#: a window whose standard deviation is below this fraction of its largest magnitude (or absolutely
#: tiny) counts as flat: its shape is rounding noise
FLAT_RTOL: Final[float] = 1e-6
_TINY: Final[float] = 1e-12


def default_max_lag(length: int) -> int:
    return round(DEFAULT_MAX_LAG_FRACTION * length)


def check_max_lag(max_lag: int, length: int) -> int:
    """``max_lag`` if it is an integer in 0..length-1, else a clear error."""
    if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)) or not 0 <= max_lag < length:
        raise InvalidInputError(f"shape max lag must be an integer number of samples in 0..{length - 1} "
                                f"(signals of {length} samples), got {max_lag!r}")
    return int(max_lag)


def znormalise(x: npt.ArrayLike, dtype: type = np.float64) -> npt.NDArray:
    """Rows centred and scaled to unit norm (so a dot product is a Pearson correlation); flat rows -> 0."""
    a = np.atleast_2d(np.asarray(x, dtype=dtype))  # float32: candidates' first pass, float64: reported scores
    c = a - a.mean(axis=1, keepdims=True)
    norm = np.sqrt(np.einsum("ij,ij->i", c, c))
    scale = np.abs(a).max(axis=1, initial=0.0) * np.sqrt(a.shape[1])
    flat = norm <= np.maximum(FLAT_RTOL * scale, _TINY)
    c /= np.where(flat, 1.0, norm)[:, None]
    c[flat] = 0.0
    return c


def fft_length(length: int, max_lag: int) -> int:
    """Zero-padded FFT length: the circular correlation equals the linear one for ``|l| <= max_lag``."""
    return int(sfft.next_fast_len(length + max_lag, real=True))


def spectra(xz: npt.NDArray, nfft: int) -> npt.NDArray:
    """Real FFTs of z-normalised rows (complex64 for float32 input, complex128 for float64)."""
    return sfft.rfft(xz, nfft, axis=1, workers=1)


def best_lags(qf: npt.NDArray, xf: npt.NDArray, nfft: int, max_lag: int) -> tuple[npt.NDArray, I64]:
    """Per row pair, the highest NCC over ``|l| <= max_lag`` and the lag ``l`` that gave it.

    ``qf`` (one spectrum, or one per row) and ``xf`` are :func:`spectra` of unit-norm z-normalised
    signals. ``NCC(l) = sum_t q[t] x[t - l]``: shifting the match right by ``l`` samples lines it up
    with the query. Ties go to the smallest ``|l|`` (then the negative lag).
    """
    cc = sfft.irfft(qf * np.conj(xf), nfft, axis=1, workers=1)
    # lags 0, -1, 1, -2, 2, ...: argmax takes the first maximum, so the smallest |lag| wins ties
    lags = np.empty(2 * max_lag + 1, dtype=np.int64)
    lags[0] = 0
    lags[1::2] = -np.arange(1, max_lag + 1)
    lags[2::2] = np.arange(1, max_lag + 1)
    window = cc[:, lags % nfft]
    best = np.argmax(window, axis=1)
    return window[np.arange(len(window)), best], lags[best]


def shape_scores(query: npt.ArrayLike, points: npt.ArrayLike, max_lag: int, *, dtype: type = np.float64
                 ) -> tuple[npt.NDArray, I64]:
    """``shape`` similarity of one query (d,) to many points (n, d), and each point's best lag."""
    q = np.asarray(query)
    x = np.atleast_2d(np.asarray(points))
    max_lag = check_max_lag(max_lag, q.shape[-1])
    nfft = fft_length(q.shape[-1], max_lag)
    qf = spectra(znormalise(q, dtype), nfft)
    return best_lags(qf, spectra(znormalise(x, dtype), nfft), nfft, max_lag)


def zeuclidean_scores(query: npt.ArrayLike, points: npt.ArrayLike) -> F64:
    """``1 / (1 + |zq - zx|)``, z-normalised by the population std, computed on the differences."""
    q = np.asarray(query, dtype=np.float64)
    n = q.shape[-1]
    diff = znormalise(points) - znormalise(q)
    return 1.0 / (1.0 + np.sqrt(n * np.einsum("ij,ij->i", diff, diff)))


def spectral_features(xz: npt.NDArray, nfft: int, bins: int) -> F32:
    """Shift-invariant features whose dot product bounds ``shape`` from above: shape (n, bins + 1).

    The first ``bins`` magnitudes of the padded spectrum, weighted so that Parseval gives unit norm,
    plus the norm of all the others. By Cauchy-Schwarz the circular cross-correlation at any lag is
    at most ``sum_k |Q_k| |X_k| / nfft`` (weighted as the features are), and the tail's share of that
    sum at most the product of the tail norms: ``<f(q), f(x)> >= NCC(l)`` for every ``l``. Cosine on
    these features is a sound candidate generator for ``shape``; exact mode prunes with the bound.
    """
    spec = np.abs(spectra(np.asarray(xz, dtype=np.float32), nfft)).astype(np.float64)
    w = np.full(spec.shape[1], 2.0)
    w[0] = 1.0
    if nfft % 2 == 0:
        w[-1] = 1.0
    energy = spec * spec * (w / nfft)
    kept = min(bins, spec.shape[1])
    out = np.empty((spec.shape[0], bins + 1), dtype=np.float32)
    out[:, :kept] = np.sqrt(energy[:, :kept])
    out[:, kept:bins] = 0.0
    out[:, bins] = np.sqrt(energy[:, kept:].sum(axis=1))
    return out
