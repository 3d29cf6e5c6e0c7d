"""
fid.py against independent references: closed forms of the Frechet distance between Gaussians, hand-computed
Inception Scores, a brute-force precision/recall, a pixel-by-pixel TF1 resize, and pytorch-fid's own Inception
modules for the same (random) weights. The CLI runs end to end on tiny npz files with random weights, and each
kind of bad input, run as a user runs it, ends in one last "error:" line with every file as it was.
"""
import fcntl
import json
import math
import os
import pty
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fid  # noqa: E402
import launch  # noqa: E402


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_closed_form_for_rotated_commuting_covariances():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))  # shared eigenbasis
    s1, s2 = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = fid.frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_matches_symmetric_eigendecomposition_formula_for_general_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    s1, s2 = a @ a.T + 0.1 * np.eye(10), b @ b.T + 0.1 * np.eye(10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)  # tr((S1^1/2 S2 S1^1/2)^1/2) = sum sqrt(eigenvalues)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum()
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's, for the zero covariances on purpose
def test_frechet_distance_of_identical_statistics_is_zero_and_of_zero_covariances_is_mean_distance():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(8, 8))
    s = a @ a.T
    mu = rng.normal(size=8)
    assert fid.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-7)
    assert fid.frechet_distance(mu, np.zeros((8, 8)), mu + 1, np.zeros((8, 8))) == pytest.approx(8)


def test_frechet_distance_rejects_statistics_of_different_dimensions():
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 3))
    mu, sigma = fid.feature_stats(x)
    m = [sum(row[j] for row in x) / 7 for j in range(3)]
    c = [[sum((row[i] - m[i]) * (row[j] - m[j]) for row in x) / 6 for j in range(3)] for i in range(3)]
    np.testing.assert_allclose(mu, m, rtol=1e-12)
    np.testing.assert_allclose(sigma, c, rtol=1e-12)


# ----------------------------------------------------------------------------- Inception Score

def test_inception_score_of_uniform_predictions_is_one():
    assert fid.inception_score(np.full((50, 7), 1 / 7), splits=10) == pytest.approx(1.0)


def test_inception_score_of_confident_predictions_spread_evenly_over_c_classes_is_c():
    c = 5
    probs = np.eye(c)[np.arange(100) % c]  # each split of 10 holds every class twice
    assert fid.inception_score(probs, splits=10) == pytest.approx(c)


def test_inception_score_averages_contiguous_splits():
    uniform = np.full((4, 4), 0.25)  # IS 1
    confident = np.eye(4)  # IS 4
    assert fid.inception_score(np.concatenate([uniform, confident]), splits=2) == pytest.approx(2.5)
    mixed = np.concatenate([uniform[:2], confident[:2], uniform[2:], confident[2:]])
    assert fid.inception_score(mixed, splits=2) != pytest.approx(2.5)  # splits are contiguous, not shuffled


def test_inception_score_matches_hand_computed_two_class_example():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])  # marginal (0.75, 0.25)
    kl1 = math.log(1 / 0.75)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert fid.inception_score(probs, splits=1) == pytest.approx(math.exp((kl1 + kl2) / 2))


# ----------------------------------------------------------------------------- precision and recall

def brute_force_precision_recall(ref, sam, k):
    """The definition, O(n^2) in plain Python: the k-th neighbour radius counts the point itself as the 0-th."""
    def d2(a, b):
        return float(sum((x - y) ** 2 for x, y in zip(a, b)))

    def radii(x):
        return [sorted(d2(p, q) for q in x)[k] for p in x]

    r_ref, r_sam = radii(ref), radii(sam)
    precision = np.mean([any(d2(s, r) <= rad for r, rad in zip(ref, r_ref)) for s in sam])
    recall = np.mean([any(d2(r, s) <= rad for s, rad in zip(sam, r_sam)) for r in ref])
    return precision, recall


def test_precision_recall_of_identical_sets_is_one_and_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 8))
    assert fid.precision_recall(x, x, k=3) == (1.0, 1.0)
    assert fid.precision_recall(x, x + 100, k=3) == (0.0, 0.0)


@pytest.mark.parametrize("block", [10000, 7])
def test_precision_recall_match_brute_force_definition(block):
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(80, 5))
    sam = rng.normal(0.7, 1.3, size=(60, 5))
    expected = brute_force_precision_recall(ref.astype(np.float32), sam.astype(np.float32), 3)
    got = fid.precision_recall(ref, sam, k=3, fp16=False, block=block)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert got == pytest.approx(expected, abs=1e-12)


def test_precision_recall_in_float16_like_adm_are_exact_on_small_integer_features_with_ties():
    rng = np.random.default_rng(7)
    ref = rng.integers(0, 4, size=(40, 4)).astype(np.float32)  # distances are small integers: exact in float16
    sam = rng.integers(1, 5, size=(35, 4)).astype(np.float32)
    assert fid.precision_recall(ref, sam, k=3, fp16=True, block=16) == pytest.approx(brute_force_precision_recall(ref, sam, 3))


def test_precision_recall_fall_back_to_float32_when_float16_overflows():
    rng = np.random.default_rng(8)
    ref, sam = rng.normal(size=(40, 4)) * 1000, rng.normal(300, 1000, size=(30, 4))  # squares beyond 65504
    expected = brute_force_precision_recall(ref.astype(np.float32), sam.astype(np.float32), 3)
    assert fid.precision_recall(ref, sam, k=3, fp16=True) == pytest.approx(expected)


# ----------------------------------------------------------------------------- compute_metrics

def test_compute_metrics_prefers_stored_statistics_and_reports_what_it_cannot_compute():
    rng = np.random.default_rng(9)
    d = 6
    samples = {"mu": np.zeros(d), "sigma": np.eye(d), "feats": rng.normal(size=(20, d))}
    ref = {"mu": np.full(d, 2.0), "sigma": np.eye(d), "feats": rng.normal(size=(25, d))}  # like an ADM reference batch
    values, why = fid.compute_metrics(samples, ref)
    assert values["fid"] == pytest.approx(4 * d)  # from mu/sigma, not from the features
    assert values["precision"] is not None and values["recall"] is not None
    assert values["is"] is None and "logits" in why["is"]
    assert values["sfid"] is None and "sfid" in why
    values, why = fid.compute_metrics(samples, {"mu": ref["mu"], "sigma": ref["sigma"]})  # statistics-only reference
    assert values["fid"] == pytest.approx(4 * d)
    assert values["precision"] is None and values["recall"] is None and "features" in why["recall"]


# ----------------------------------------------------------------------------- preprocessing

def tf1_resize_pixel(img, y, x, out_h, out_w):
    """One output pixel of TF1 resize_bilinear (align_corners=False, half_pixel_centers=False) in float32."""
    _, h, w = img.shape

    def tap(i, n_in, n_out):
        src = np.float32(i) * (np.float32(n_in) / np.float32(n_out))
        lo = int(np.floor(src))
        return lo, min(int(np.ceil(src)), n_in - 1), src - np.float32(lo)

    y0, y1, ly = tap(y, h, out_h)
    x0, x1, lx = tap(x, w, out_w)
    top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * lx
    bottom = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * lx
    return top + (bottom - top) * ly


@pytest.mark.parametrize("h,w,size", [(7, 5, 13), (37, 29, 13), (1, 2, 4)])
def test_resize_matches_tf1_pixel_by_pixel(h, w, size):
    img = np.random.default_rng(10).uniform(0, 255, size=(3, h, w)).astype(np.float32)
    got = fid.resize_tf1(torch.from_numpy(img)[None], size)[0].numpy()
    expected = np.stack([np.stack([tf1_resize_pixel(img, y, x, size, size) for x in range(size)], -1) for y in range(size)], 1)
    np.testing.assert_array_equal(got, expected)


def test_resize_to_299_matches_tf1_on_sampled_pixels():
    img = np.random.default_rng(11).integers(0, 256, size=(3, 32, 32)).astype(np.float32)
    got = fid.resize_tf1(torch.from_numpy(img)[None], 299)[0].numpy()
    for y, x in np.random.default_rng(12).integers(0, 299, size=(300, 2)):
        np.testing.assert_array_equal(got[:, y, x], tf1_resize_pixel(img, y, x, 299, 299))


def test_resize_is_tf1_not_pytorch_half_pixel_bilinear():
    row = torch.tensor([[[[0.0, 10.0]]]])  # 1x2 image to 4x4: src x = 0, 0.5, 1, 1.5 (clamped)
    assert fid.resize_tf1(row, 4)[0, 0].tolist() == [[0.0, 5.0, 10.0, 10.0]] * 4
    torch_half_pixel = torch.nn.functional.interpolate(row, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch_half_pixel[0, 0, 0].tolist() == [0.0, 2.5, 7.5, 10.0]


def test_network_input_is_scaled_as_x_minus_128_over_128():
    net = fid.InceptionV3()
    seen = {}
    net.features = lambda x: seen.setdefault("x", x)
    net(torch.tensor([0.0, 128.0, 255.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8))
    assert seen["x"].shape == (1, 3, 299, 299)
    assert seen["x"][0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]


# ----------------------------------------------------------------------------- the network against pytorch-fid

def random_inception_state(seed=0):
    """Random weights in the pytorch-fid file layout (torchvision's InceptionV3 keys, 1008 classes, no aux
    head), scaled so that activations stay of order one through the whole network."""
    import torchvision
    g = torch.Generator().manual_seed(seed)
    tv = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    state = {}
    for key, v in tv.state_dict().items():
        if key.endswith("conv.weight"):
            v = torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel())
        elif key.endswith(("bn.weight", "running_var")):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif key.endswith(("bn.bias", "running_mean")):
            v = torch.randn(v.shape, generator=g) * 0.1
        elif key.startswith("fc."):
            v = torch.randn(v.shape, generator=g) * 0.05
        state[key] = v
    return state


@pytest.fixture(scope="module")
def state():
    return random_inception_state()


@pytest.fixture(scope="module")
def weights_file(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(state, path)
    return str(path)


def test_network_features_equal_pytorch_fid_modules_for_the_same_weights(state):
    from pytorch_fid import inception as pf
    original = pf.load_state_dict_from_url
    pf.load_state_dict_from_url = lambda *a, **k: state  # pytorch-fid's own model, built without downloading
    try:
        full = pf.fid_inception_v3().eval()
        blocks = pf.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    finally:
        pf.load_state_dict_from_url = original
    net = fid.InceptionV3().eval()
    net.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = {}
    full.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("mixed_6/conv", o))
    with torch.no_grad():
        pool, spatial, logits = net.features(x)
        ref_pool = blocks(x)[0].flatten(1)
        ref_logits = full(x) - full.fc.bias  # IS uses the logits without bias
    ref_spatial = seen["mixed_6/conv"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's NHWC flattening
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    assert pool.std() > 0.1 and spatial.std() > 0.1  # random weights that still carry a signal
    torch.testing.assert_close(pool, ref_pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(spatial, ref_spatial, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- CLI

def write_images(path, n, size, seed):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return str(path)


# scipy's sqrtm of a 2048x2048 matrix takes ~40 s on 2 cores, so the CLI runs below swap in a stand-in
# (zeros) for it: they test the plumbing; the Frechet formula itself is tested above against closed forms.
def no_sqrtm(a):
    return np.zeros_like(a)


RUN_FID_WITHOUT_SQRTM = ("import runpy, sys, numpy, scipy.linalg; scipy.linalg.sqrtm = numpy.zeros_like; "
                         "sys.argv = ['fid.py'] + sys.argv[1:]; runpy.run_path('fid.py', run_name='__main__')")


def test_cli_end_to_end_then_from_saved_statistics(tmp_path, weights_file, monkeypatch):
    samples = write_images(tmp_path / "samples.npz", 6, 32, 0)
    ref = write_images(tmp_path / "ref.npz", 5, 24, 1)
    cmd = [sys.executable, "-c", RUN_FID_WITHOUT_SQRTM, samples, "--ref", ref, "--inception-weights", weights_file,
           "--batch-size", "4", "--is-splits", "2", "--save-stats"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout + r.stderr  # no progress-bar redraws in a log that is not a terminal
    first = json.load(open(tmp_path / "samples_fid.json"))
    assert first["num_samples"] == 6 and first["num_ref"] == 5
    assert first["features"] == "inception" and "fd" not in first
    assert first["fid"] > 0 and first["sfid"] > 0 and first["is"] >= 1
    assert 0 <= first["precision"] <= 1 and 0 <= first["recall"] <= 1
    for line in ("FID", "sFID", "Inception Score", "Precision", "Recall", "images/s"):
        assert line in r.stdout
    stats = np.load(tmp_path / "samples_stats.npz")
    assert stats["feats"].shape == (6, 2048) and stats["logits"].shape == (6, 1008) and stats["mu_s"].shape == (2023,)

    # Statistics files need no network: a missing weights path is never touched.
    monkeypatch.setattr(fid.linalg, "sqrtm", no_sqrtm)
    out = str(tmp_path / "again.json")
    fid.main([str(tmp_path / "samples_stats.npz"), "--ref", str(tmp_path / "ref_stats.npz"), "--out", out,
              "--is-splits", "2", "--inception-weights", str(tmp_path / "absent.pth")])
    again = json.load(open(out))
    for m in ("fid", "sfid", "is", "precision", "recall"):
        assert again[m] == pytest.approx(first[m], rel=1e-6)

    # A statistics-only reference gives FID and sFID; precision and recall are not invented.
    ref_stats = np.load(tmp_path / "ref_stats.npz")
    np.savez(tmp_path / "ref_mu_only.npz", **{k: ref_stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    fid.main([str(tmp_path / "samples_stats.npz"), "--ref", str(tmp_path / "ref_mu_only.npz"), "--out", out,
              "--is-splits", "2"])
    only = json.load(open(out))
    assert only["fid"] == pytest.approx(first["fid"], rel=1e-6) and only["is"] == pytest.approx(first["is"])
    assert only["precision"] is None and only["recall"] is None and "recall" in only["unavailable"]


def test_cli_missing_file_exits_nonzero_naming_it(tmp_path):
    r = launch.run("fid.py", [tmp_path / "nope.npz", "--ref", tmp_path / "nope.npz"], ROOT, timeout=120)
    assert r.returncode != 0 and "nope.npz" in r.stderr and "does not exist" in r.stderr


def bad_inputs(tmp_path, weights_file):
    """(name, argv, text the error must contain) for each kind of bad input."""
    good = write_images(tmp_path / "good.npz", 4, 8, 0)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "two_channels.npz", arr_0=np.zeros((4, 8, 8, 2), np.uint8))
    write_images(tmp_path / "one.npz", 1, 8, 0)
    from PIL import Image
    os.makedirs(tmp_path / "mixed")
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (9, 9)).save(tmp_path / "mixed" / "b.png")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    np.savez(tmp_path / "stats64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "stats2048.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    w = ["--inception-weights", weights_file]
    return [
        ("float", [str(tmp_path / "float.npz"), "--ref", good], "float.npz"),
        ("shape", [str(tmp_path / "two_channels.npz"), "--ref", good], "two_channels.npz"),
        ("one image", [str(tmp_path / "one.npz"), "--ref", good], "one.npz"),
        ("mixed resolutions and no size", [str(tmp_path / "mixed"), "--ref", good, *w], "--image-size"),
        ("wrong weights", [good, "--ref", good, "--inception-weights", str(tmp_path / "wrong.pth")], "wrong.pth"),
        ("other extractor", [str(tmp_path / "stats64.npz"), "--ref", str(tmp_path / "stats2048.npz")], "stats64.npz"),
        ("flag value", [good, "--ref", good, "--batch-size", "many"], "--batch-size"),
        ("missing flag", [good], "--ref"),
    ]


def test_cli_bad_inputs_stop_with_an_error_naming_the_file(tmp_path, weights_file):
    for name, argv, text in bad_inputs(tmp_path, weights_file):
        with pytest.raises(SystemExit) as e:
            fid.main([*argv, "--out", str(tmp_path / "out.json")])
        assert str(e.value.code).startswith("error:") and text in str(e.value.code), (name, e.value.code)
    assert not os.path.exists(tmp_path / "out.json")


def test_help_shows_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        fid.main(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside the URL
    assert e.value.code == 0
    for flag in ("--ref", "--out", "--inception-weights", "--batch-size", "--is-splits", "--save-stats", "--tf32",
                 "--features", "--image-size", "--classifier", "--classifier-data", "--classifier-epochs",
                 "--classifier-seed", "--dinov2"):
        assert flag in text
    for default in ("200", "10", "SAMPLES_fid.json", fid.FID_WEIGHTS_URL, "inception", "0", "dinov2_vitl14"):
        assert f"(default:{default})" in text
    assert "(default:${XDG_CACHE_HOME:-~/.cache}/d2c/classifiers/HASH.pt" in text
    assert "(default:thesideofSAMPLES'images)" in text


# ----------------------------------------------------------------------------- CLI: bad input, as a user meets it

def snapshot(folder):
    """Every file under folder with its bytes and mtime: a failed run must change nothing and leave nothing."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run_fid(*argv, env=None):
    """python fid.py ARGV from the repository root (forked from the tests' preloaded server), stdout and
    stderr in one stream as a terminal shows them."""
    return launch.run("fid.py", argv, ROOT, env, merge=True, timeout=120)


def assert_fails_cleanly(r, before, folder, *names):
    """Nonzero exit, one 'error:' line naming names as the very last output, no traceback, nothing changed."""
    last = r.stdout.strip().splitlines()[-1]
    assert r.returncode != 0, r.stdout
    assert last.startswith("error: ") and all(str(n) in last for n in names), r.stdout
    assert "Traceback" not in r.stdout
    assert snapshot(folder) == before


@pytest.fixture
def sides(tmp_path, weights_file):
    """Tiny SAMPLES and --ref image files, and the flags that would let a run go through to the end."""
    samples, ref = write_images(tmp_path / "samples.npz", 4, 8, 0), write_images(tmp_path / "ref.npz", 4, 8, 1)
    return samples, ref, ["--inception-weights", weights_file, "--is-splits", "2"]


@pytest.mark.parametrize("target", ["samples", "ref"])
def test_out_onto_an_input_is_refused(tmp_path, sides, target):
    samples, ref, flags = sides
    before = snapshot(tmp_path)
    r = run_fid(samples, "--ref", ref, *flags, "--out", {"samples": samples, "ref": ref}[target])
    assert_fails_cleanly(r, before, tmp_path, "--out", f"{target}.npz")
    assert "images/s" not in r.stdout  # refused before the Inception pass


def test_save_stats_onto_an_input_is_refused(tmp_path, sides):
    samples, _, flags = sides
    ref = tmp_path / "samples_stats.npz"  # what --save-stats would write for SAMPLES
    np.savez(ref, feats=np.random.default_rng(0).normal(size=(4, 2048)).astype(np.float32))
    before = snapshot(tmp_path)
    r = run_fid(samples, "--ref", ref, *flags, "--save-stats")
    assert_fails_cleanly(r, before, tmp_path, "--save-stats", "samples_stats.npz")
    assert "images/s" not in r.stdout


def takes_new_files(folder):
    try:
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder that takes no new files: one made read-only, or for root, who ignores that, sysfs."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if takes_new_files(folder):
        folder = Path("/sys")
        if not folder.is_dir() or takes_new_files(folder):
            pytest.skip("no folder here refuses new files")
    yield folder
    (tmp_path / "readonly").chmod(0o755)


@pytest.mark.parametrize("where", ["missing folder", "read-only folder"])
def test_out_in_an_unwritable_place_is_refused_before_any_work(tmp_path, sides, unwritable_dir, where):
    samples, ref, flags = sides
    out = (tmp_path / "missing" if where == "missing folder" else unwritable_dir) / "metrics.json"
    before = snapshot(tmp_path)
    r = run_fid(samples, "--ref", ref, *flags, "--out", out)
    assert_fails_cleanly(r, before, tmp_path, "--out", out)
    assert "images/s" not in r.stdout and not out.exists()


def test_npz_without_images_or_statistics_says_how_to_write_one(tmp_path, sides):
    _, ref, flags = sides
    np.savez(tmp_path / "other.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    before = snapshot(tmp_path)
    r = run_fid(tmp_path / "other.npz", "--ref", ref, *flags)
    assert_fails_cleanly(r, before, tmp_path, "SAMPLES", "other.npz", "arr_0=", "--save-stats")


def test_truncated_npz_is_named_with_the_fix(tmp_path, sides):
    samples, ref, flags = sides
    data = Path(ref).read_bytes()
    Path(ref).write_bytes(data[:len(data) // 2])
    before = snapshot(tmp_path)
    r = run_fid(samples, "--ref", ref, *flags, "--save-stats")
    assert_fails_cleanly(r, before, tmp_path, "--ref", "ref.npz", "np.savez")


def run_in_terminal(*argv, signal_when=None):
    """
    fid.py with stdout and stderr on a pseudo-terminal, so that tqdm draws its bar: (exit status, output).
    signal_when=(text, signal): send the signal once the output shows the text twice, as Ctrl-C or kill would.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    p = subprocess.Popen([sys.executable, "fid.py", *map(str, argv)], cwd=ROOT, stdout=slave, stderr=slave,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a shell starts it
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closes when fid.py exits
            break
        if not chunk:
            break
        out += chunk
        if signal_when and out.count(signal_when[0].encode()) >= 2:
            p.send_signal(signal_when[1])
            signal_when = None
    os.close(master)
    return p.wait(timeout=120), out.decode(errors="replace")


def test_corrupt_npz_found_during_the_inception_pass_ends_with_the_error_after_the_bar(tmp_path, sides):
    _, _, flags = sides
    samples = tmp_path / "samples_stats.npz"  # statistics: the one Inception pass is the reference's
    np.savez(samples, feats=np.random.default_rng(0).normal(size=(4, 2048)).astype(np.float32))
    ref = write_images(tmp_path / "ref.npz", 2, 32, 1)  # 6 KB, beyond zipfile's first 4 KB read of arr_0
    data = bytearray(Path(ref).read_bytes())
    data[len(data) // 2] ^= 0xFF  # a pixel: zipfile's CRC check fails when the second image is read
    Path(ref).write_bytes(bytes(data))
    before = snapshot(tmp_path)
    code, out = run_in_terminal(samples, "--ref", ref, *flags, "--batch-size", "1", "--save-stats")
    lines = [line for line in out.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 1 and "inception ref" in out, out  # the bar was drawn
    assert lines[-1].startswith("error: --ref") and "ref.npz" in lines[-1] and "Traceback" not in out, out
    assert snapshot(tmp_path) == before


def test_unreachable_weights_url_fails_fast_with_the_fix(tmp_path, sides):
    samples, ref, _ = sides
    url = "https://fid-weights.invalid/pt_inception-2015-12-05-6726825d.pth"  # .invalid never resolves
    before = snapshot(tmp_path)
    t0 = time.time()
    r = run_fid(samples, "--ref", ref, "--inception-weights", url, env={**os.environ, "TORCH_HOME": str(tmp_path / "hub")})
    assert time.time() - t0 < 30
    assert_fails_cleanly(r, before, tmp_path, "--inception-weights PATH")
    assert r.stdout.strip().splitlines()[-1] == (f"error: cannot download {url} (no network?): download it where there "
                                                  "is one and pass the local path with --inception-weights PATH, or pass "
                                                  "--features classifier (a classifier trained on the labelled reference, "
                                                  "offline) or --features dinov2 --dinov2 LOCAL.pth")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_during_the_inception_pass_leaves_nothing_and_says_so_last(tmp_path, weights_file, sig, code):
    samples = tmp_path / "samples_stats.npz"  # statistics: the one Inception pass is the reference's
    np.savez(samples, feats=np.random.default_rng(0).normal(size=(4, 2048)).astype(np.float32))
    ref = write_images(tmp_path / "ref.npz", 200, 8, 1)  # long enough to be interrupted in its pass
    before = snapshot(tmp_path)
    status, out = run_in_terminal(samples, "--ref", ref, "--inception-weights", weights_file, "--batch-size", "1",
                                  "--is-splits", "2", "--save-stats", signal_when=("inception ref:", sig))  # a redraw: mid-pass
    lines = [line for line in out.replace("\r", "\n").splitlines() if line.strip()]
    assert status == code, out
    assert lines[-1].startswith("error: interrupted") and "Traceback" not in out, out
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- references read like the training images

def save_png(path, array, mode=None):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return str(path)


def test_folder_of_mixed_sizes_is_read_as_adm_center_crops_at_the_samples_size(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(20)
    wide = save_png(tmp_path / "ref" / "a.png", rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))  # 40 x 32
    square = save_png(tmp_path / "ref" / "b.png", rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    ref = fid.open_side(str(tmp_path / "ref"), "--ref")
    assert fid._square_size(fid.open_side(str(tmp_path / "samples.npz"), "SAMPLES")) == 16
    n, batches = fid.side_images(ref, 16, 3)
    got = np.concatenate(list(batches(8)))
    # By hand: 40x32 is at least twice 16 on its short side, so it is halved with a box filter to 20x16, which is
    # already 16 high (no resize), then cropped 2 px from the left; 28x28 is resized bicubic to 16x16.
    with Image.open(wide) as im:
        a = np.asarray(im.convert("RGB").resize((20, 16), Image.BOX))[:, 2:18]
    with Image.open(square) as im:
        b = np.asarray(im.convert("RGB").resize((16, 16), Image.BICUBIC))
    assert n == 2 and got.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(got[0], a)
    np.testing.assert_array_equal(got[1], b)
    gray = np.concatenate(list(fid.side_images(ref, 16, 1)[1](8)))  # one channel: PIL's "L" before the crop
    with Image.open(square) as im:
        np.testing.assert_array_equal(gray[1, ..., 0], np.asarray(im.convert("L").resize((16, 16), Image.BICUBIC)))


def write_dataset(path, pixels, labels, source=None, files=None, vae="none"):
    """An encode.py dataset directory of uint8 (N, H, W, C) pixels: latents x / 127.5 - 1 in float16, as --vae none."""
    os.makedirs(path)
    np.save(os.path.join(path, "latents.npy"), (pixels.transpose(0, 3, 1, 2) / 127.5 - 1).astype(np.float16))
    np.save(os.path.join(path, "labels.npy"), np.asarray(labels, np.int64))
    if files:
        Path(path, "files.txt").write_text("".join(f + "\n" for f in files))
    meta = {"image_size": pixels.shape[1], "channels": pixels.shape[3], "vae": vae, "num_classes": int(max(labels)) + 1,
            "class_names": [str(c) for c in range(int(max(labels)) + 1)], "source": source, "flip": False}
    Path(path, "meta.json").write_text(json.dumps(meta))
    return str(path)


def test_dataset_directory_gives_its_pixels_at_its_size_and_its_source_crops_at_another(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(21)
    pixels = rng.integers(0, 256, (3, 12, 12, 1), dtype=np.uint8)
    files = [save_png(tmp_path / "src" / f"{c}" / f"{i}.png", pixels[i, ..., 0], "L") for i, c in enumerate([0, 1, 1])]
    data = write_dataset(tmp_path / "data", pixels, [0, 1, 1], str(tmp_path / "src"),
                         [os.path.relpath(f, tmp_path / "src") for f in files])
    side = fid.open_side(data, "--ref")
    np.testing.assert_array_equal(np.concatenate(list(fid.side_images(side, 12, 1)[1](2))), pixels)
    at8 = np.concatenate(list(fid.side_images(fid.open_side(data, "--ref"), 8, 1)[1](2)))
    for f, crop in zip(files, at8):
        with Image.open(f) as im:  # 12 is less than twice 8: one bicubic resize
            np.testing.assert_array_equal(crop[..., 0], np.asarray(im.resize((8, 8), Image.BICUBIC)))
    os.remove(files[2])
    with pytest.raises(SystemExit) as e:
        fid.read_size(fid.open_side(data, "--ref"), 8)
    assert "are gone" in str(e.value.code) and files[2] in str(e.value.code) and "image folder" in str(e.value.code)


# ----------------------------------------------------------------------------- the classifier feature space

def class_images(rng, label, n, size, channels=3):
    """Images whose class shows: class 0 bright at the top, 1 at the left, 2 dark, on noise."""
    x = rng.normal(110, 40, size=(n, size, size, channels))
    half = size // 2
    if label == 0:
        x[:, :half] += 90
    elif label == 1:
        x[:, :, :half] += 90
    else:
        x -= 60
    return x.clip(0, 255).astype(np.uint8)


def class_folder(root, per_class, size, seed, channels=3):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["a", "b", "c"]):
        for i, img in enumerate(class_images(rng, c, per_class, size, channels)):
            gray = channels == 1
            save_png(Path(root) / name / f"{i:03d}.png", img[..., 0] if gray else img, "L" if gray else None)
    return str(root)


def classifier_by_hand(state, images):
    """The saved classifier as specified, in float64 with plain torch ops: per stage a 3x3 convolution (padding 1,
    no bias, stride 2 while the side is at least 8), batch norm with the running statistics (eps 1e-5), ReLU; the
    mean over space; a linear layer. Input x / 127.5 - 1. Returns (features, predicted classes)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    for i in range(3):
        x = torch.nn.functional.conv2d(x, state[f"body.{3 * i}.weight"].double(), stride=2 if x.shape[-1] >= 8 else 1,
                                       padding=1)
        mean, var, w, b = (state[f"body.{3 * i + 1}.{k}"].double()[:, None, None]
                           for k in ("running_mean", "running_var", "weight", "bias"))
        x = ((x - mean) / torch.sqrt(var + 1e-5) * w + b).clamp_min(0)
    feats = x.mean((2, 3))
    logits = feats @ state["head.weight"].double().T + state["head.bias"].double()
    return feats.numpy(), logits.argmax(1).numpy()


def naive_frechet(a, b):
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2 with numpy's symmetric eigendecompositions."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    trace_root = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root


def read_pngs(folder):
    from PIL import Image
    files = sorted(Path(folder).rglob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), np.array([f.parent.name for f in files])


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A 16 px class folder (3 classes x 70) as --ref, 200 labelled 16 px samples, one classifier run."""
    root = tmp_path_factory.mktemp("classifier")
    ref = class_folder(root / "ref", 70, 16, 30)
    rng = np.random.default_rng(31)
    labels = rng.integers(0, 3, 200)
    images = np.concatenate([class_images(rng, c, 1, 16) for c in labels])
    images[::4] = class_images(rng, 2, 50, 16)  # every 4th asked-for class drawn as class 2: some are wrong
    np.savez(root / "samples.npz", arr_0=images, labels=labels)
    out, clf = root / "metrics.json", root / "clf.pt"
    r = run_fid(root / "samples.npz", "--ref", ref, "--features", "classifier", "--classifier", clf,
                "--classifier-epochs", 30, "--out", out, "--save-stats")
    assert r.returncode == 0, r.stdout
    return dict(root=root, ref=ref, images=images, labels=labels, out=json.load(open(out)), stdout=r.stdout,
                clf=torch.load(clf, weights_only=True))


def test_classifier_fd_equals_a_naive_frechet_distance_of_the_saved_classifiers_features(classifier_run):
    run = classifier_run
    ref_images, _ = read_pngs(run["ref"])  # already 16 px: the crop leaves them as they are
    assert run["clf"]["channels"] == 3 and run["clf"]["image_size"] == 16
    sam, _ = classifier_by_hand(run["clf"]["state_dict"], run["images"])
    ref, _ = classifier_by_hand(run["clf"]["state_dict"], ref_images)
    assert sam.shape == (200, 128) and ref.shape == (210, 128)
    assert min(np.linalg.eigvalsh(np.cov(f, rowvar=False)).min() for f in (sam, ref)) > 0  # full rank: sqrt defined
    expected = naive_frechet(sam, ref)
    assert expected > 0.01 and run["out"]["fd"] == pytest.approx(expected, rel=1e-4)
    # float32 distances outside Inception (ADM's float16 would round away these small distances)
    assert (run["out"]["precision"], run["out"]["recall"]) == pytest.approx(
        brute_force_precision_recall(ref.astype(np.float32), sam.astype(np.float32), 3))
    stats = np.load(run["root"] / "samples_stats.npz")
    np.testing.assert_allclose(stats["feats"], sam, rtol=1e-4, atol=1e-5)
    assert str(stats["features"]) == run["out"]["features"]


def test_class_accuracy_is_the_share_of_images_the_classifier_puts_in_their_labelled_class(classifier_run):
    run = classifier_run
    _, pred = classifier_by_hand(run["clf"]["state_dict"], run["images"])
    expected = float(np.mean(pred == run["labels"]))
    assert 0.5 < expected < 0.9  # the mislabelled quarter is found out
    assert run["out"]["class_accuracy"] == pytest.approx(expected, abs=1e-12)
    ref_images, folders = read_pngs(run["ref"])
    _, pred = classifier_by_hand(run["clf"]["state_dict"], ref_images)
    assert run["out"]["ref_class_accuracy"] == pytest.approx(np.mean(pred == np.searchsorted(["a", "b", "c"], folders)))
    held = run["out"]["classifier"]
    assert held["num_heldout"] == 21 and held["num_train"] == 189  # 10% of each class of 70
    assert held["heldout_accuracy"] in [i / 21 for i in range(22)] and held["heldout_accuracy"] > 0.8


def test_json_and_stdout_name_the_feature_space_and_call_its_distance_fd(classifier_run):
    out = classifier_run["out"]  # Inception's JSON: test_cli_end_to_end_then_from_saved_statistics
    assert out["features"] == f"classifier:{out['classifier']['key']}" == f"classifier:{classifier_run['clf']['key']}"
    assert "fid" not in out and out["fd"] > 0 and out["sfid"] is None and out["is"] is None
    assert "Inception only" in out["unavailable"]["sfid"] and "Inception only" in out["unavailable"]["is"]
    assert "FD (classifier features)" in classifier_run["stdout"] and "\nFID" not in classifier_run["stdout"]


def test_statistics_of_one_feature_space_are_refused_in_another(classifier_run, tmp_path):
    stats = classifier_run["root"] / "samples_stats.npz"
    with pytest.raises(SystemExit) as e:
        fid.main([str(stats), "--ref", str(stats), "--out", str(tmp_path / "m.json")])  # Inception by default
    assert "samples_stats.npz" in str(e.value.code) and "--features classifier" in str(e.value.code)


def test_classifier_is_cached_reused_without_training_and_retrained_for_other_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ref = class_folder(tmp_path / "ref", 6, 8, 40)
    np.savez(tmp_path / "samples.npz", arr_0=class_images(np.random.default_rng(41), 0, 8, 8))
    argv = [str(tmp_path / "samples.npz"), "--ref", ref, "--features", "classifier", "--classifier-epochs", "2",
            "--out", str(tmp_path / "m.json")]
    fid.main(argv)
    first = capsys.readouterr().out
    cache = tmp_path / "cache" / "d2c" / "classifiers"
    (file,) = cache.iterdir()
    before = (file.read_bytes(), file.stat().st_mtime_ns)
    assert "classifier: training on" in first
    assert json.load(open(tmp_path / "m.json"))["features"] == f"classifier:{file.stem}"
    fid.main(argv)
    second = capsys.readouterr().out
    assert "classifier: reusing" in second and "training" not in second
    assert (file.read_bytes(), file.stat().st_mtime_ns) == before and list(cache.iterdir()) == [file]
    save_png(Path(ref) / "a" / "extra.png", class_images(np.random.default_rng(42), 0, 1, 8)[0])  # other training data
    fid.main(argv)
    assert "classifier: training on" in capsys.readouterr().out
    assert len(list(cache.iterdir())) == 2 and (file.read_bytes(), file.stat().st_mtime_ns) == before


@pytest.mark.parametrize("samples_kind, folder_mode, channels", [
    ("gray (N, H, W)", "L", 1), ("RGB of equal channels", "L", 1), ("RGB of equal channels", "RGB", 3),
    ("RGB", "L", 3)])
def test_classifier_is_grayscale_for_one_channel_samples_or_equal_channels_against_a_grayscale_folder(
        tmp_path, samples_kind, folder_mode, channels):
    ref = class_folder(tmp_path / "ref", 4, 8, 50, channels=1 if folder_mode == "L" else 3)
    gray = class_images(np.random.default_rng(51), 1, 6, 8, channels=1)
    samples = {"gray (N, H, W)": gray[..., 0], "RGB of equal channels": gray.repeat(3, -1),
               "RGB": class_images(np.random.default_rng(51), 1, 6, 8)}[samples_kind]
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    fid.main([str(tmp_path / "samples.npz"), "--ref", ref, "--features", "classifier", "--classifier-epochs", "1",
              "--classifier", str(tmp_path / "clf.pt"), "--out", str(tmp_path / "m.json")])
    assert json.load(open(tmp_path / "m.json"))["classifier"]["channels"] == channels
    assert torch.load(tmp_path / "clf.pt", weights_only=True)["state_dict"]["body.0.weight"].shape[1] == channels


def test_classifier_trains_on_a_dataset_directory_given_as_classifier_data(tmp_path):
    rng = np.random.default_rng(60)
    pixels = np.concatenate([class_images(rng, c, 5, 8) for c in range(3)])
    data = write_dataset(tmp_path / "data", pixels, np.repeat(np.arange(3), 5))
    np.savez(tmp_path / "ref.npz", arr_0=class_images(rng, 1, 4, 8))  # an unlabelled reference
    np.savez(tmp_path / "samples.npz", arr_0=class_images(rng, 0, 4, 8), labels=np.zeros(4, np.int64))
    fid.main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--features", "classifier",
              "--classifier-data", data, "--classifier-epochs", "1", "--classifier", str(tmp_path / "clf.pt"),
              "--out", str(tmp_path / "m.json")])
    out = json.load(open(tmp_path / "m.json"))
    assert out["classifier"]["trained_on"] == os.path.realpath(data) and out["classifier"]["num_classes"] == 3
    assert out["class_accuracy"] is not None and out["ref_class_accuracy"] is None
    assert "labels" in out["unavailable"]["ref_class_accuracy"]


@pytest.mark.parametrize("case", ["flat folder as --classifier-data", "unlabelled --ref", "labels of other data"])
def test_classifier_without_usable_labels_fails_in_one_line_before_training(tmp_path, case):
    ref = class_folder(tmp_path / "ref", 4, 8, 70)
    np.savez(tmp_path / "samples.npz", arr_0=class_images(np.random.default_rng(71), 0, 4, 8),
             labels=np.array([0, 1, 2, 7 if case == "labels of other data" else 0]))
    flat = tmp_path / "flat"
    for i in range(3):
        save_png(flat / f"{i}.png", class_images(np.random.default_rng(i), 0, 1, 8)[0])
    np.savez(tmp_path / "ref.npz", arr_0=class_images(np.random.default_rng(72), 0, 4, 8))
    argv, expect = {
        "flat folder as --classifier-data": (["--ref", ref, "--classifier-data", flat], ["--classifier-data", flat]),
        "unlabelled --ref": (["--ref", tmp_path / "ref.npz"], ["ref.npz", "--classifier-data"]),
        "labels of other data": (["--ref", ref], ["SAMPLES", "labels", "0..2"])}[case]
    before = snapshot(tmp_path)
    r = run_fid(tmp_path / "samples.npz", *argv, "--features", "classifier",
                env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert_fails_cleanly(r, before, tmp_path, *expect)
    assert "classifier: training" not in r.stdout and not (tmp_path / "cache").exists()  # no cache, no classifier


def test_classifier_file_of_another_resolution_is_refused(classifier_run, tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=class_images(np.random.default_rng(80), 0, 4, 8))
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "samples.npz"), "--ref", classifier_run["ref"], "--features", "classifier",
                  "--classifier", str(classifier_run["root"] / "clf.pt"), "--out", str(tmp_path / "m.json")])
    assert "clf.pt" in str(e.value.code) and "16 px" in str(e.value.code) and "8 px" in str(e.value.code)


# ----------------------------------------------------------------------------- the DINOv2 feature space

def test_dinov2_features_are_the_cls_token_of_the_images_resized_to_224_as_pil_does(tmp_path):
    import timm
    from PIL import Image
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, depth=1, num_classes=0).eval()
    torch.save(vit.state_dict(), tmp_path / "dinov2_vits14_random.pth")  # the timm layout, random weights
    rng = np.random.default_rng(90)
    gray = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)  # grayscale samples: replicated to RGB
    rgb = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=gray)
    np.savez(tmp_path / "ref.npz", arr_0=rgb, mu=np.zeros(2048), sigma=np.eye(2048))  # Inception's, as ADM's batches
    fid.main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--features", "dinov2", "--dinov2",
              str(tmp_path / "dinov2_vits14_random.pth"), "--save-stats", "--out", str(tmp_path / "m.json")])

    def by_hand(images):
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        x = np.stack([np.stack([np.asarray(Image.fromarray((img[..., c] / 255).astype(np.float32), "F")
                                           .resize((224, 224), Image.BICUBIC)) for c in range(3)]) for img in images])
        x = (x - mean[:, None, None]) / std[:, None, None]
        with torch.no_grad():
            return vit.forward_features(torch.from_numpy(x).float())[:, 0].numpy()

    out = json.load(open(tmp_path / "m.json"))
    sam, ref = np.load(tmp_path / "samples_stats.npz"), np.load(tmp_path / "ref_stats.npz")
    np.testing.assert_allclose(sam["feats"], by_hand(gray[..., None].repeat(3, -1)), atol=2e-4)
    np.testing.assert_allclose(ref["feats"], by_hand(rgb), atol=2e-4)
    assert out["features"] == "dinov2:dinov2_vits14_random.pth" == str(sam["features"])
    assert "fid" not in out and out["sfid"] is None
    assert out["fd"] == pytest.approx(fid.frechet_distance(*fid.feature_stats(sam["feats"]), *fid.feature_stats(ref["feats"])))


def test_dinov2_name_that_cannot_be_downloaded_offers_a_local_file_or_the_classifier(tmp_path, sides):
    samples, ref, _ = sides
    before = snapshot(tmp_path)
    r = run_fid(samples, "--ref", ref, "--features", "dinov2", "--out", tmp_path / "m.json",
                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_fails_cleanly(r, before, tmp_path, "--dinov2 dinov2_vitl14", "cannot download", "--dinov2 FILE",
                         "--features classifier")


# ----------------------------------------------------------------------------- fid.py alone

def test_fid_copied_alone_computes_inception_metrics_of_npz_files_and_names_common_for_folders(tmp_path, sides):
    samples, ref, flags = sides
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    (alone / "fid.py").write_bytes(Path(ROOT, "fid.py").read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", RUN_FID_WITHOUT_SQRTM, samples, "--ref", ref, *flags, "--out", tmp_path / "m.json"]
    r = subprocess.run(cmd, cwd=alone, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "m.json"))["features"] == "inception"
    save_png(tmp_path / "folder" / "a.png", np.zeros((8, 8, 3), np.uint8))
    r = launch.run("fid.py", [samples, "--ref", tmp_path / "folder", *flags], alone, env, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --ref")
    assert "common.py" in r.stderr and "Traceback" not in r.stderr


def test_inception_reads_a_reference_folder_of_mixed_sizes_at_the_samples_size(tmp_path, sides):
    samples, _, flags = sides  # 8 px samples
    rng = np.random.default_rng(100)
    for i, (w, h) in enumerate([(40, 32), (28, 28), (8, 8)]):
        save_png(tmp_path / "ref" / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    cmd = [sys.executable, "-c", RUN_FID_WITHOUT_SQRTM, samples, "--ref", str(tmp_path / "ref"), *flags,
           "--out", str(tmp_path / "m.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ref: 3 images of 8x8" in r.stdout and json.load(open(tmp_path / "m.json"))["num_ref"] == 3


def test_default_classifier_epochs_make_600_steps_on_small_sets_at_most_100_passes():
    # batches of 128: 54,000 images -> 422 steps a pass, 3 passes; 1,293 -> 11, ceil(600 / 11) = 55; 54 -> 1, capped
    assert fid.default_epochs(54_000) == 3
    assert fid.default_epochs(1_293) == 55
    assert fid.default_epochs(54) == 100
