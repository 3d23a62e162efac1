"""Synthetic ECG generator: layout, determinism, and that the classes really differ as ECG would."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.signal import butter, filtfilt, find_peaks

from batch_index.corpus.files import corpus_schema, signals_from_arrow
from batch_index.corpus.synthetic import CLASSES, SynthConfig, generate, generate_record_batches
from batch_index.errors import InvalidInputError

FS = 250.0
N_ROWS = 360  # ~40 windows per class


# --- a small Pan-Tompkins-like R-peak detector, for the tests only ---------------------------------

def r_peaks(x: np.ndarray, fs: float = FS) -> np.ndarray:
    """Sample indices of R peaks (largest deflection near each QRS energy maximum)."""
    b, a = butter(2, [5.0, 15.0], btype="band", fs=fs)
    energy = np.gradient(filtfilt(b, a, x)) ** 2
    w = max(1, int(0.12 * fs))
    energy = np.convolve(energy, np.ones(w) / w, mode="same")
    peaks, _ = find_peaks(energy, height=0.15 * np.percentile(energy, 99), distance=int(0.25 * fs))
    h, med = int(0.08 * fs), np.median(x)
    return np.array([max(0, p - h) + int(np.argmax(np.abs(x[max(0, p - h):p + h + 1] - med))) for p in peaks])


def heart_rate(x: np.ndarray) -> float:
    return 60.0 / (float(np.median(np.diff(r_peaks(x)))) / FS)


def rr_irregularity(x: np.ndarray) -> float:
    """RMSSD of RR intervals divided by mean RR."""
    rr = np.diff(r_peaks(x)) / FS
    return float(np.sqrt(np.mean(np.diff(rr) ** 2)) / np.mean(rr))


def _per_beat(x: np.ndarray, lo_s: float, hi_s: float, fn) -> float:
    vals = [fn(x[p + int(lo_s * FS):p + int(hi_s * FS)]) for p in r_peaks(x)
            if p + int(lo_s * FS) >= 0 and p + int(hi_s * FS) <= x.size]
    return float(np.median(vals))


def qrs_width(x: np.ndarray) -> float:
    """Seconds between the first and last steep slope (> 20 % of the max) within 150 ms of the R peak."""
    def width(seg: np.ndarray) -> float:
        steep = np.flatnonzero(np.abs(np.diff(seg)) > 0.2 * np.abs(np.diff(seg)).max())
        return (steep[-1] - steep[0]) / FS
    return _per_beat(x, -0.15, 0.15, width)


def st_level(x: np.ndarray) -> float:
    """Mean level 70-100 ms after the R peak, relative to the PR segment just before the QRS."""
    return _per_beat(x, -0.07, 0.10, lambda seg: seg[-int(0.03 * FS):].mean() - seg[:int(0.02 * FS)].mean())


def t_wave_extreme(x: np.ndarray) -> float:
    """Signed largest deflection 150-400 ms after the R peak (the T wave)."""
    return _per_beat(x, 0.15, 0.40, lambda seg: seg[np.argmax(np.abs(seg))])


def has_pvc_pattern(x: np.ndarray) -> bool:
    """A premature beat followed by a compensatory pause: short RR then long RR."""
    rr = np.diff(r_peaks(x)) / FS
    m = np.median(rr)
    return bool(np.any((rr[:-1] < 0.8 * m) & (rr[1:] > 1.2 * m)))


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noisy() -> tuple[list[str], list[str], np.ndarray]:
    return generate(0, N_ROWS, SynthConfig(seed=7))


@pytest.fixture(scope="module")
def clean() -> tuple[list[str], list[str], np.ndarray]:
    return generate(0, N_ROWS, SynthConfig(seed=7, noise_scale=0.0))


def by_class(data, label: str) -> np.ndarray:
    _, labels, x = data
    return x[np.asarray(labels) == label]


def feature(data, label: str, fn) -> np.ndarray:
    return np.array([fn(x) for x in by_class(data, label)])


# --- layout and determinism ------------------------------------------------------------------------

def test_shapes_ids_and_labels():
    ids, labels, x = generate(5, 7)
    assert SynthConfig().n_samples == 2500
    assert x.shape == (7, 2500) and x.dtype == np.float32
    assert ids == [f"syn-{i:09d}" for i in range(5, 12)]
    assert ids[0] == "syn-000000005"
    assert set(labels) <= set(CLASSES)


def test_every_class_is_drawn(noisy):
    counts = {c: noisy[1].count(c) for c in CLASSES}
    assert min(counts.values()) >= 20, counts


def test_partition_invariance_and_repeatability():
    cfg = SynthConfig(seed=11)
    ids, labels, x = generate(0, 10, cfg)
    a, b = generate(0, 4, cfg), generate(4, 6, cfg)
    assert ids == a[0] + b[0] and labels == a[1] + b[1]
    np.testing.assert_array_equal(x, np.concatenate([a[2], b[2]]))
    np.testing.assert_array_equal(x, generate(0, 10, cfg)[2])
    np.testing.assert_array_equal(x[7], generate(7, 1, cfg)[2][0])


def test_different_seeds_differ():
    x0, x1 = generate(0, 20, SynthConfig(seed=0))[2], generate(0, 20, SynthConfig(seed=1))[2]
    assert not np.allclose(x0, x1, atol=0.05)
    assert generate(0, 20, SynthConfig(seed=0))[1] != generate(0, 20, SynthConfig(seed=1))[1]


def test_record_batches_match_generate_and_corpus_layout():
    cfg = SynthConfig(seed=3, duration_s=2.0)
    batches = list(generate_record_batches(2, 12, cfg, batch_rows=4))
    assert [b.num_rows for b in batches] == [4, 4, 2]
    assert all(b.schema == corpus_schema() for b in batches)
    table = pa.Table.from_batches(batches)
    ids, labels, x = generate(2, 10, cfg)
    assert table.column("id").to_pylist() == ids and table.column("label").to_pylist() == labels
    np.testing.assert_array_equal(signals_from_arrow(table.column("signal")), x)
    assert list(generate_record_batches(5, 5, cfg)) == []


def test_noise_scale_changes_only_the_nuisance(clean):
    _, labels, x = generate(0, 40, SynthConfig(seed=7))
    assert labels == clean[1][:40]
    resid = x - clean[2][:40]
    assert 0.005 < float(np.std(resid)) < 0.5  # noise is there, and mV-small
    assert np.ptp(resid.mean(axis=1)) > 0.1  # per-record DC offsets


# --- realism ---------------------------------------------------------------------------------------

def test_finite_and_millivolt_scale(noisy):
    x = noisy[2]
    assert np.isfinite(x).all()
    ptp = np.ptp(x, axis=1)
    assert ptp.min() > 0.4 and ptp.max() < 6.0
    assert np.abs(x).max() < 6.0


def test_heart_rate_orders_the_sinus_classes(noisy):
    hr = {c: feature(noisy, c, heart_rate) for c in ("tachycardia", "normal", "bradycardia")}
    assert np.median(hr["tachycardia"]) > np.median(hr["normal"]) > np.median(hr["bradycardia"])
    assert np.mean(hr["tachycardia"] > 100) >= 0.9
    assert np.mean(hr["bradycardia"] < 60) >= 0.9
    assert np.mean((hr["normal"] > 55) & (hr["normal"] < 100)) >= 0.9


def test_af_rhythm_is_irregular(noisy):
    af, normal = feature(noisy, "afib", rr_irregularity), feature(noisy, "normal", rr_irregularity)
    assert np.median(af) > 3 * np.median(normal)
    assert np.mean(af > np.percentile(normal, 90)) >= 0.8


def test_pvc_windows_show_premature_beat_and_pause(noisy):
    assert np.mean(feature(noisy, "pvc", has_pvc_pattern)) >= 0.9
    assert np.mean(feature(noisy, "normal", has_pvc_pattern)) <= 0.1


def test_wide_qrs_is_wider(clean):
    wide, normal = feature(clean, "wide_qrs", qrs_width), feature(clean, "normal", qrs_width)
    assert wide.min() > normal.max()
    assert np.median(wide) > 0.11 > np.median(normal)


def test_st_and_t_morphology(clean):
    st = {c: feature(clean, c, st_level) for c in ("normal", "st_elevation", "st_depression")}
    assert np.median(st["st_elevation"]) > np.median(st["normal"]) + 0.1
    assert np.median(st["st_depression"]) < np.median(st["normal"]) - 0.05
    assert np.mean(st["st_elevation"] > st["normal"].max()) >= 0.8
    assert np.mean(st["st_depression"] < st["normal"].min()) >= 0.8
    assert np.all(feature(clean, "t_inversion", t_wave_extreme) < 0)
    assert np.all(feature(clean, "normal", t_wave_extreme) > 0)


def test_records_of_one_class_are_not_near_identical(clean):
    """Per-record morphology: aligned median beats of different 'patients' differ visibly."""
    def template(x: np.ndarray) -> np.ndarray:
        h = int(0.3 * FS)
        return np.median([x[p - h:p + h] for p in r_peaks(x) if h <= p <= x.size - h], axis=0)
    t = np.array([template(x) for x in by_class(clean, "normal")[:20]])
    dist = np.sqrt(((t[:, None, :] - t[None, :, :]) ** 2).mean(axis=2))
    assert dist[np.triu_indices(len(t), k=1)].min() > 0.02
    assert np.ptp(t.max(axis=1)) > 0.5  # R amplitude spread across records, in mV


def test_powerline_only_where_the_rate_allows():
    def line_to_floor(fs: float) -> np.ndarray:
        cfg = SynthConfig(sampling_rate=fs, seed=5)
        resid = generate(0, 16, cfg)[2] - generate(0, 16, SynthConfig(sampling_rate=fs, seed=5,
                                                                        noise_scale=0.0))[2]
        spec = np.abs(np.fft.rfft(resid - resid.mean(axis=1, keepdims=True), axis=1)) ** 2
        freqs = np.fft.rfftfreq(resid.shape[1], 1.0 / fs)
        line = np.max([spec[:, np.argmin(np.abs(freqs - f))] for f in (50.0, 60.0)], axis=0)
        return line / np.median(spec[:, (freqs > 30) & (freqs < 45)], axis=1)
    assert np.mean(line_to_floor(500.0) > 50) >= 0.9
    assert np.all(line_to_floor(100.0) < 50)  # 50/60 Hz would alias: none added


# --- configurations --------------------------------------------------------------------------------

@pytest.mark.parametrize(("fs", "duration", "n"), [
    (250.0, 0.56, 140),  # a short sub-beat window
    (128.0, 0.64, 82),
    (14.0, 10.0, 140),  # ten seconds at a very low rate
    (500.0, 10.0, 5000),
    (250.0, 20.0, 5000),
])
def test_short_and_long_configs(fs, duration, n):
    cfg = SynthConfig(sampling_rate=fs, duration_s=duration, seed=2)
    assert cfg.n_samples == n
    x = generate(0, 20, cfg)[2]
    assert x.shape == (20, n) and x.dtype == np.float32
    assert np.isfinite(x).all() and np.abs(x).max() < 6.0
    assert np.all(np.ptp(x, axis=1) > 0.01)
    np.testing.assert_array_equal(x[10:], generate(10, 10, cfg)[2])


def test_single_sample_window():
    x = generate(0, 5, SynthConfig(duration_s=0.004))[2]
    assert x.shape == (5, 1) and np.isfinite(x).all()


def test_long_window_heart_rate():
    x = generate(0, 10, SynthConfig(sampling_rate=500.0, classes=("normal",)))[2]
    hr = [60.0 / (np.median(np.diff(r_peaks(s, 500.0))) / 500.0) for s in x]
    assert all(55 < h < 100 for h in hr)


def test_class_subset():
    _, labels, _ = generate(0, 30, SynthConfig(classes=("afib", "pvc")))
    assert set(labels) == {"afib", "pvc"}


@pytest.mark.parametrize("kwargs", [
    {"sampling_rate": 0.0}, {"duration_s": -1.0}, {"duration_s": 0.001}, {"seed": -1},
    {"noise_scale": -0.5}, {"noise_scale": float("nan")}, {"classes": ()}, {"classes": ("normal", "vfib")},
])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(InvalidInputError):
        SynthConfig(**kwargs)


def test_bad_ranges_are_rejected():
    with pytest.raises(InvalidInputError, match="start"):
        generate(-1, 3)
    with pytest.raises(InvalidInputError, match="count"):
        generate(0, 2.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="stop"):
        list(generate_record_batches(5, 2))
    with pytest.raises(InvalidInputError, match="batch_rows"):
        list(generate_record_batches(0, 2, batch_rows=0))
