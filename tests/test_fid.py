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
    r = subprocess.run([sys.executable, "fid.py", str(tmp_path / "nope.npz"), "--ref", str(tmp_path / "nope.npz")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "nope.npz" in r.stderr and "does not exist" in r.stderr


def bad_inputs(tmp_path, weights_file):
    """(name, argv, text the error must contain) for each kind of bad input."""
    good = write_images(tmp_path / "good.npz", 4, 8, 0)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((4, 8, 8), np.uint8))
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
        ("shape", [str(tmp_path / "gray.npz"), "--ref", good], "gray.npz"),
        ("one image", [str(tmp_path / "one.npz"), "--ref", good], "one.npz"),
        ("mixed resolutions", [str(tmp_path / "mixed"), "--ref", good, *w], "b.png"),
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
    for flag in ("--ref", "--out", "--inception-weights", "--batch-size", "--is-splits", "--save-stats", "--tf32"):
        assert flag in text
    for default in ("200", "10", "SAMPLES_fid.json", fid.FID_WEIGHTS_URL):
        assert f"(default:{default})" in text


# ----------------------------------------------------------------------------- CLI: bad input, as a user meets it

def snapshot(folder):
    """Every file under folder with its bytes and mtime: a failed run must change nothing and leave nothing."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run_fid(*argv, env=None):
    """python fid.py ARGV from the repository root, stdout and stderr in one stream as a terminal shows them."""
    return subprocess.run([sys.executable, "fid.py", *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120, env=env)


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
                                                  "is one and pass the local path with --inception-weights PATH")


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
