"""Synthetic ECG-like windows with known classes, so the index can be built and tested at any scale.

Why synthetic: real labelled ECG is scarce and licence-bound, and a benchmark of 10^6 windows needs a
corpus that can be regenerated anywhere, in parallel, from two integers. Why *realistic*: a similarity
index behaves very differently on white noise (no structure, all distances alike) than on ECG (strongly
periodic, most energy in a few narrow QRS complexes, classes that differ in small details).

The model follows ECGSYN (McSharry et al., "A dynamical model for generating synthetic
electrocardiogram signals", IEEE TBME 50(3), 2003): every beat is a sum of Gaussian waves P, Q, R, S, T
at fixed positions relative to the R peak, with positions and widths scaled by the RR interval, and the
RR intervals come from a process with a low-frequency (~0.1 Hz, Mayer wave) and a high-frequency
(respiratory sinus arrhythmia) component. Instead of integrating ECGSYN's ODE we evaluate the waves
directly in time, each only on its own support, which is what makes a few thousand 10 s windows per second per
core possible. Waves are bi-Gaussians (a different width on each side) so that T waves can rise slowly and
fall fast, as real ones do.

Determinism: row ``i`` is drawn from ``np.random.default_rng([seed, i])`` and from nothing else, so any
slice of rows can be produced by any worker and ``generate(0, 10)`` equals ``generate(0, 4)`` followed
by ``generate(4, 6)``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from batch_index.corpus.files import to_record_batch
from batch_index.errors import InvalidInputError

CLASSES: Final[tuple[str, ...]] = (
    "normal",  # normal sinus rhythm, 60-95 bpm
    "tachycardia",  # sinus tachycardia, 105-150 bpm, low variability
    "bradycardia",  # sinus bradycardia, 38-55 bpm, high variability
    "wide_qrs",  # bundle-branch-block-like: QRS 130-170 ms, notched R, discordant T
    "st_elevation",
    "st_depression",
    "t_inversion",
    "pvc",  # sinus rhythm with premature ventricular beats and compensatory pauses
    "afib",  # atrial fibrillation: irregular RR, no P waves, fibrillatory f-waves
)
ID_PREFIX: Final[str] = "syn-"

# How a wave's offset from the R peak and its width follow the RR interval (seconds): the QRS does not,
# the PR interval barely does, the QT interval follows Bazett (sqrt RR).
_FIXED, _PR, _QT = 0, 1, 2
_RR_EXPONENT: Final = np.array([0.0, 0.2, 0.5])
_TRUNCATE_SIGMAS: Final[float] = 4.5
# Heart rate (bpm) and RR variability (std / mean) ranges by class; unlisted classes use "other".
_HR: Final[dict[str, tuple[float, float]]] = {
    "normal": (60.0, 95.0), "tachycardia": (105.0, 150.0), "bradycardia": (38.0, 55.0),
    "afib": (70.0, 130.0), "other": (55.0, 100.0),
}
_HRV: Final[dict[str, tuple[float, float]]] = {
    "normal": (0.025, 0.06), "tachycardia": (0.008, 0.02), "bradycardia": (0.05, 0.10),
    "afib": (0.12, 0.25), "other": (0.02, 0.05),
}

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SynthConfig:
    """What to generate; together with a row number this fully determines that row.

    Parameters
    ----------
    sampling_rate : float
        Samples per second (Hz). Waves narrower than the sample spacing are widened (area kept), as an
        anti-aliasing filter would, so low rates still give well-formed beats.
    duration_s : float
        Window length in seconds; ``n_samples = round(sampling_rate * duration_s)``.
    seed : int
        Non-negative corpus seed; row ``i`` uses ``np.random.default_rng([seed, i])``.
    noise_scale : float
        Multiplies every additive nuisance (baseline wander, EMG, powerline, DC offset). 0 gives clean
        beats that still vary by record (morphology, heart rate, gain).
    classes : tuple of str
        Classes to draw from, uniformly; a subset of :data:`CLASSES`.
    """

    sampling_rate: float = 250.0
    duration_s: float = 10.0
    seed: int = 0
    noise_scale: float = 1.0
    classes: tuple[str, ...] = CLASSES

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sampling_rate) and self.sampling_rate > 0):
            raise InvalidInputError(f"sampling_rate must be a positive number of Hz, got {self.sampling_rate!r}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise InvalidInputError(f"duration_s must be positive, got {self.duration_s!r}")
        if self.n_samples < 1:
            raise InvalidInputError(
                f"sampling_rate * duration_s = {self.sampling_rate * self.duration_s} rounds to no samples")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0):
            raise InvalidInputError(f"noise_scale must be >= 0, got {self.noise_scale!r}")
        unknown = [c for c in self.classes if c not in CLASSES]
        if not self.classes or unknown:
            raise InvalidInputError(
                f"classes must be a non-empty subset of {', '.join(CLASSES)}; got {tuple(self.classes)!r}")

    @property
    def n_samples(self) -> int:
        """Samples per window, ``round(sampling_rate * duration_s)``."""
        return round(self.sampling_rate * self.duration_s)


def row_id(i: int) -> str:
    """Id of synthetic row ``i``: ``syn-`` and the row number zero-padded to 9 digits."""
    return f"{ID_PREFIX}{i:09d}"


def generate(start: int, count: int, cfg: SynthConfig | None = None
             ) -> tuple[list[str], list[str], F32]:
    """Generate rows ``start .. start + count - 1``.

    Parameters
    ----------
    start, count : int
        First row number (>= 0) and number of rows (>= 0).
    cfg : SynthConfig, optional
        Defaults to ``SynthConfig()`` (250 Hz, 10 s, seed 0).

    Returns
    -------
    ids : list of str, length count
        ``syn-000000123`` style.
    labels : list of str, length count
        Class names from ``cfg.classes``.
    signals : ndarray of shape (count, cfg.n_samples), float32
        Millivolt-scale signals.
    """
    cfg = cfg if cfg is not None else SynthConfig()
    start, count = _non_negative(start, "start"), _non_negative(count, "count")
    t = np.arange(cfg.n_samples, dtype=np.float64) / cfg.sampling_rate
    signals = np.empty((count, cfg.n_samples), dtype=np.float32)
    labels: list[str] = []
    for j in range(count):
        rng = np.random.default_rng([cfg.seed, start + j])
        label = cfg.classes[int(rng.integers(len(cfg.classes)))]
        signals[j] = _window(rng, label, t, cfg)
        labels.append(label)
    return [row_id(start + j) for j in range(count)], labels, signals


def generate_record_batches(start: int, stop: int, cfg: SynthConfig | None = None,
                            batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """Yield rows ``start .. stop - 1`` as corpus record batches of at most ``batch_rows`` rows.

    This is the partition adapter for Spark's ``mapInArrow``: each task generates its own row range
    on the executor, so nothing but two integers passes through the driver.
    """
    start, stop = _non_negative(start, "start"), _non_negative(stop, "stop")
    batch_rows = _non_negative(batch_rows, "batch_rows")
    if stop < start:
        raise InvalidInputError(f"stop ({stop}) must be >= start ({start})")
    if batch_rows < 1:
        raise InvalidInputError(f"batch_rows must be >= 1, got {batch_rows}")
    for lo in range(start, stop, batch_rows):
        ids, labels, signals = generate(lo, min(batch_rows, stop - lo), cfg)
        yield to_record_batch(ids, signals, labels)


def _non_negative(value: object, name: str) -> int:
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError as e:
        raise InvalidInputError(f"{name} must be an integer, got {value!r}") from e
    if v < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {v}")
    return v


# --------------------------------------------------------------------------------------------------
# One window


def _window(rng: np.random.Generator, label: str, t: F64, cfg: SynthConfig) -> F64:
    """One window: beats, then atrial activity and noise, then gain and offset. Shape (n_samples,)."""
    fs, dur, ns = cfg.sampling_rate, cfg.duration_s, cfg.noise_scale
    f_resp = rng.uniform(0.15, 0.4)  # breathing drives RSA, beat amplitude and baseline alike
    resp_phase = rng.uniform(0.0, 2 * math.pi)
    beat_t, rr = _beat_times(rng, label, dur, f_resp, resp_phase)
    is_pvc = _pick_pvcs(rng, beat_t, dur) if label == "pvc" else np.zeros(beat_t.size, dtype=bool)
    if is_pvc.any():  # a PVC comes early; the sinus beat it replaces is lost, so a full pause follows
        prev = np.flatnonzero(is_pvc) - 1
        coupling = rng.uniform(0.5, 0.68, size=prev.size)
        beat_t = beat_t.copy()
        beat_t[is_pvc] = beat_t[prev] + coupling * (beat_t[prev + 1] - beat_t[prev])
    amp_mod = (1.0 + rng.uniform(0.02, 0.08) * np.sin(2 * math.pi * f_resp * beat_t + resp_phase)
               + rng.normal(0.0, 0.02, size=beat_t.size))
    parts = [_place(rng, beat_t[~is_pvc], rr[~is_pvc], amp_mod[~is_pvc], _sinus_waves(rng, label))]
    if is_pvc.any():
        parts.append(_place(rng, beat_t[is_pvc], rr[is_pvc], amp_mod[is_pvc], _pvc_waves(rng)))
    x = _render(t.size, fs, *(np.concatenate(p) for p in zip(*parts)))
    if label == "afib":
        x += _f_waves(rng, t, fs)
    x += ns * _noise(rng, t, fs, f_resp, resp_phase)  # drawn even at ns == 0: same heart at every scale
    gain = math.exp(rng.normal(0.0, 0.15))
    return gain * x + ns * rng.uniform(-0.3, 0.3)


def _beat_times(rng: np.random.Generator, label: str, dur: float, f_resp: float,
                resp_phase: float) -> tuple[F64, F64]:
    """R-peak times (s) covering the window plus margins, and each beat's preceding RR (s).

    Sinus rhythms: RR = mean * (1 + LF + HF + jitter), LF a few sinusoids near 0.1 Hz, HF the breathing
    sinusoid. AF: independent log-normal RR. The first beat falls at a random phase.
    """
    key = label if label in _HR else "other"
    rr_mean = 60.0 / rng.uniform(*_HR[key])
    cv = rng.uniform(*_HRV[key])
    n = math.ceil((dur + 3.0) / max(0.25, 0.5 * rr_mean)) + 3
    if label == "afib":
        rr = rr_mean * np.exp(rng.normal(-0.5 * cv * cv, cv, size=n))
    else:
        tau = np.arange(n) * rr_mean
        lf_share = rng.uniform(0.3, 0.7)
        lf = np.sin(2 * math.pi * rng.normal(0.1, 0.015, size=(3, 1)) * tau
                    + rng.uniform(0.0, 2 * math.pi, size=(3, 1))).sum(axis=0) / math.sqrt(1.5)
        hf = math.sqrt(2.0) * np.sin(2 * math.pi * f_resp * tau + resp_phase)
        smooth = math.sqrt(lf_share) * lf + math.sqrt(1.0 - lf_share) * hf  # unit variance
        # 0.95^2 + 0.3^2 ~ 1, so std(RR) / mean(RR) ~ cv
        rr = rr_mean * (1.0 + cv * (0.95 * smooth + 0.3 * rng.standard_normal(n)))
    rr = np.maximum(rr, 0.27)
    beat_t = -1.0 - rng.uniform(0.0, 1.0) * rr_mean + np.concatenate(([0.0], np.cumsum(rr[1:])))
    keep = (beat_t > -1.2) & (beat_t < dur + 0.6)
    return beat_t[keep], rr[keep]


def _pick_pvcs(rng: np.random.Generator, beat_t: F64, dur: float) -> npt.NDArray[np.bool_]:
    """Which beats become PVCs: 10-25 % of the beats in the window, never two in a row.

    At least one PVC has its preceding and following beats inside the window too (when the window is long
    enough), so every "pvc" window shows the premature beat *and* its compensatory pause.
    """
    n = beat_t.size
    if n < 3:
        return np.zeros(n, dtype=bool)
    pick = (beat_t > 0.0) & (beat_t < dur) & (rng.random(n) < rng.uniform(0.1, 0.25))
    pick[0] = pick[-1] = False  # a PVC couples to a preceding beat; the pause needs a following one
    pick[1:] &= ~pick[:-1]
    visible = np.zeros(n, dtype=bool)
    visible[1:-1] = (beat_t[:-2] > 0.05) & (beat_t[2:] < dur - 0.05)
    if visible.any() and not (pick & visible).any():
        k = int(rng.choice(np.flatnonzero(visible)))
        pick[k - 1 : k + 2] = (False, True, False)
    return pick


# --------------------------------------------------------------------------------------------------
# Wave tables: one row per wave, columns (offset from R [s], amplitude [mV], sigma left, right [s], kind)


def _sinus_waves(rng: np.random.Generator, label: str) -> F64:
    """This record's ("patient's") sinus-beat waves at RR = 1 s, shape (n_waves, 5)."""
    u = rng.uniform
    r_amp, qrs = u(0.7, 1.8), u(0.85, 1.15)
    sr = u(0.009, 0.012) * qrs
    t_sl = u(0.055, 0.075)
    waves = [
        [-u(0.13, 0.19), u(0.08, 0.22), u(0.018, 0.028), u(0.018, 0.028), _PR],  # P
        [-0.028 * qrs, -u(0.02, 0.2), 0.009 * qrs, 0.009 * qrs, _FIXED],  # Q
        [0.0, r_amp, sr, sr, _FIXED],  # R
        [0.03 * qrs, -u(0.05, 0.35) * r_amp, u(0.009, 0.013) * qrs, u(0.009, 0.013) * qrs, _FIXED],  # S
        [u(0.26, 0.32), u(0.12, 0.45), t_sl, u(0.035, 0.05), _QT],  # T
    ]
    w = np.array(waves)
    if label == "afib":
        w[0, 1] = 0.0  # no organised atrial activity
    elif label == "wide_qrs":  # slowed ventricular conduction: broad, notched QRS, discordant T
        w[1:4, 2:4] *= u(1.8, 2.4)
        w[1, 0] *= 1.6
        w[3, 0] = u(0.09, 0.11)
        w[3, 1] *= 0.6
        w[4, 1] = -u(0.1, 0.3)
        w = np.vstack([w, [u(0.045, 0.06), u(0.5, 0.9) * r_amp, u(0.014, 0.02), u(0.016, 0.024), _FIXED]])
    elif label == "st_elevation":  # J point lifted, ST merging into a tall T
        w[3, 1] *= 0.5
        w[4, 1] *= u(1.0, 1.5)
        w = np.vstack([w, [u(0.08, 0.11), u(0.15, 0.4), u(0.022, 0.032), u(0.08, 0.1), _QT]])
    elif label == "st_depression":  # horizontal/downsloping ST, flattened T
        w[4, 1] *= u(0.3, 0.8)
        w = np.vstack([w, [u(0.09, 0.12), -u(0.1, 0.25), u(0.025, 0.035), u(0.06, 0.08), _QT]])
    elif label == "t_inversion":  # deep, symmetric negative T
        w[4, 1] = -u(0.15, 0.45)
        w[4, 3] = w[4, 2] * u(0.8, 1.0)
    return w


def _pvc_waves(rng: np.random.Generator) -> F64:
    """This record's premature ventricular beat (one focus): no P, wide bizarre QRS, opposite T."""
    u = rng.uniform
    sign = 1.0 if rng.random() < 0.5 else -1.0
    main = sign * u(0.9, 2.0)
    return np.array([
        [-0.01, main, u(0.025, 0.035), u(0.03, 0.045), _FIXED],
        [u(0.05, 0.07), -u(0.2, 0.45) * main, u(0.02, 0.03), u(0.025, 0.035), _FIXED],
        [u(0.28, 0.34), -sign * u(0.25, 0.55), u(0.06, 0.08), u(0.04, 0.05), _QT],
    ])


def _place(rng: np.random.Generator, beat_t: F64, rr: F64, amp_mod: F64, waves: F64
           ) -> tuple[F64, F64, F64, F64]:
    """Put one wave table on every beat: flat (centre, amplitude, sigma_l, sigma_r), each (n_beats * n_waves,).

    Offsets and widths of P and T follow each beat's RR; amplitudes get the breathing modulation and a
    small per-beat, per-wave jitter; P and T positions jitter by a few ms.
    """
    kind = waves[:, 4].astype(np.intp)
    scale = np.clip(rr, 0.3, 2.0)[:, None] ** _RR_EXPONENT[kind][None, :]  # (n_beats, n_waves)
    jitter_t = rng.normal(0.0, 0.003, size=scale.shape) * (kind != _FIXED)
    centre = beat_t[:, None] + waves[:, 0] * scale + jitter_t
    amp = waves[:, 1] * amp_mod[:, None] * (1.0 + rng.normal(0.0, 0.03, size=scale.shape))
    return centre.ravel(), amp.ravel(), (waves[:, 2] * scale).ravel(), (waves[:, 3] * scale).ravel()


def _render(n: int, fs: float, centre: F64, amp: F64, sigma_l: F64, sigma_r: F64) -> F64:
    """Sum bi-Gaussian waves on an n-sample grid, each evaluated only within 4.5 sigma of its centre.

    Widths get an anti-aliasing floor of 0.6 samples (amplitude rescaled to keep each wave's area), so
    at low sampling rates narrow QRS waves are smoothed rather than missed between samples.
    """
    aa = 0.6 / fs
    sl, sr = np.sqrt(sigma_l**2 + aa**2), np.sqrt(sigma_r**2 + aa**2)
    amp = amp * (sigma_l + sigma_r) / (sl + sr)
    half = math.ceil(_TRUNCATE_SIGMAS * max(float(sl.max(initial=0.0)), float(sr.max(initial=0.0))) * fs)
    keep = (amp != 0.0) & (centre * fs > -half) & (centre * fs < n + half)
    centre, amp, sl, sr = centre[keep], amp[keep], sl[keep], sr[keep]
    idx = np.rint(centre * fs).astype(np.int64)[:, None] + np.arange(-half, half + 1)
    dt = idx / fs - centre[:, None]
    z = dt / np.where(dt < 0.0, sl[:, None], sr[:, None])
    vals = amp[:, None] * np.exp(-0.5 * z * z)
    ok = (idx >= 0) & (idx < n)
    # astype: bincount returns integers when nothing falls on the grid
    return np.bincount(idx[ok], weights=vals[ok], minlength=n).astype(np.float64, copy=False)


# --------------------------------------------------------------------------------------------------
# Atrial fibrillation and noise


def _f_waves(rng: np.random.Generator, t: F64, fs: float) -> F64:
    """Fibrillatory waves: 4-8 Hz, frequency and amplitude wandering, one harmonic; none above 0.45 fs."""
    f0 = rng.uniform(4.0, 8.0)
    fm, df = rng.uniform(0.1, 0.3), rng.uniform(0.3, 1.0)
    phase = 2 * math.pi * f0 * t + (df / fm) * np.sin(2 * math.pi * fm * t + rng.uniform(0, 2 * math.pi))
    env = rng.uniform(0.03, 0.1) * (1.0 + 0.4 * np.sin(2 * math.pi * rng.uniform(0.1, 0.5) * t
                                                      + rng.uniform(0, 2 * math.pi)))
    out = np.zeros_like(t)
    for harmonic, weight in ((1, 1.0), (2, rng.uniform(0.2, 0.4))):
        if harmonic * (f0 + df) < 0.45 * fs:
            out += weight * np.sin(harmonic * phase + rng.uniform(0, 2 * math.pi))
    return env * out


def _noise(rng: np.random.Generator, t: F64, fs: float, f_resp: float, resp_phase: float) -> F64:
    """Baseline wander (breathing sinusoid + slow random walk), EMG (white, sometimes a burst), mains."""
    n, dur = t.size, t.size / fs
    knots_t = np.arange(0.0, dur + 0.5, 0.25)
    walk = np.cumsum(rng.normal(0.0, rng.uniform(0.01, 0.05) * 0.5, size=knots_t.size))  # mV/sqrt(s) * sqrt(0.25 s)
    wander = (rng.uniform(0.02, 0.15) * np.sin(2 * math.pi * f_resp * t + resp_phase + rng.uniform(0.5, 1.5))
              + np.interp(t, knots_t, walk - walk.mean()))
    # EMG level is set for a 250 Hz recording; a lower rate keeps only its share of the broadband power.
    emg_level = math.exp(rng.uniform(math.log(0.002), math.log(0.02))) * math.sqrt(min(1.0, fs / 250.0))
    emg_sd = np.full(n, emg_level)
    if rng.random() < 0.2:  # a muscle-artefact burst
        centre, width = rng.uniform(0.0, dur), rng.uniform(0.3, 1.5)
        emg_sd *= 1.0 + rng.uniform(2.0, 5.0) * np.exp(-0.5 * ((t - centre) / width) ** 2)
    out = wander + emg_sd * rng.standard_normal(n)
    mains = 50.0 if rng.random() < 0.5 else 60.0
    if fs > 2.2 * mains:
        out += rng.uniform(0.002, 0.02) * np.sin(2 * math.pi * mains * t + rng.uniform(0, 2 * math.pi))
    return out
