"""
FID, sFID, Inception Score, precision and recall as the ADM evaluator (openai/guided-diffusion
evaluations/evaluator.py) computes them, in PyTorch. Needs no other file of this repository.

Inputs, SAMPLES and --ref, each one of
  - an .npz with arr_0: uint8 images (N, H, W, 3), as sample.py and ADM's reference batches write it; a reference
    batch (VIRTUAL_imagenet256_labeled.npz) also holds mu/sigma/mu_s/sigma_s, used for FID/sFID as ADM does;
  - a folder of images (png/jpg/..., searched recursively, all of one resolution);
  - a statistics .npz (mu, sigma, mu_s, sigma_s; optionally feats and logits), e.g. from --save-stats.
Outputs, written only when the whole run succeeds: the metrics on stdout and in a JSON file (--out, default
SAMPLES_fid.json), with --save-stats also SIDE_stats.npz beside each side given as images. Metrics the inputs
cannot give (precision/recall against statistics only, IS without logits) are reported as not available.

Inception: the TF "2015-12-05" FID graph, written out here, with pytorch-fid's weights file
(pt_inception-2015-12-05-6726825d.pth). Preprocessing as ADM feeds that graph: TF1 resize_bilinear to 299
(align_corners=False, no half-pixel centres), then (x - 128) / 128. Features: pool_3 (2048) for FID, precision,
recall; mixed_6/conv (Mixed_6d.branch1x1), first 7 channels, 17x17, NHWC order (2023) for sFID; pool_3 @ fc.weight.T
(1008 logits, no bias) for IS.
That graph and the resize, written out below so that this file needs neither pytorch-fid nor TensorFlow (about
105 code lines, compared with pytorch-fid's modules and TF1's formula in tests/test_fid.py), are what take it past
400 code lines.

    python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz
"""
import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
import warnings
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from scipy.special import softmax, xlogy
from tqdm import tqdm

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
METRICS = ("fid", "sfid", "is", "precision", "recall")
NAMES = {"fid": "FID", "sfid": "sFID", "is": "Inception Score", "precision": "Precision", "recall": "Recall"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "feats", "logits")
SAVE_IMAGES = "save images with np.savez(path, arr_0=uint8 (N, H, W, 3) array) " \
              "or pass a statistics npz from --save-stats"


def die(msg):
    """Stop with one line on stderr and exit status 1 (SystemExit prints no traceback)."""
    raise SystemExit(f"error: {msg}")


def log(msg):
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)  # flushed, so an error stays the last line


# ----------------------------------------------------------------------------- metrics on feature arrays

def feature_stats(feats):
    """Mean and unbiased covariance (np.cov, as ADM) of (N, D) features, in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) as ADM: scipy's sqrtm, eps offset if singular, tiny imag ok."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular product of covariances; adding {eps} to their diagonals")
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, splits=10):
    """IS of (N, C) softmax outputs: exp(mean KL(p(y|x) || p(y))) per contiguous split, averaged (ADM: 5000 a split)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"need (N, C) probabilities with N >= splits={splits}, got shape {p.shape}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, py)).sum(1).mean()  # xlogy: 0 log 0 = 0
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _sq_dists(u, v, fp16):
    """Pairwise |u_i - v_j|^2 as ADM's DistanceBlock: float16 ops rounded as TF's, float32 sums; float32 on overflow."""
    if fp16:
        uh, vh = u.half(), v.half()
        nu, nv = (uh * uh).float().sum(1).half(), (vh * vh).float().sum(1).half()
        d = (nu[:, None] - 2 * (uh.float() @ vh.float().T).half() + nv[None]).clamp_min(0)
        if torch.isfinite(d).all():
            return d.float()
    return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min(0)


def _knn_radii(x, k, fp16, block):
    # Distance to the k-th nearest neighbour, the point itself being the 0-th (ADM's manifold_radii).
    return torch.cat([torch.cat([_sq_dists(x[i:i + block], x[j:j + block], fp16) for j in range(0, len(x), block)], 1)
                      .kthvalue(k + 1, 1).values for i in range(0, len(x), block)])


@torch.no_grad()
def precision_recall(ref_feats, sample_feats, k=3, fp16=True, block=10000, device=None):
    """
    Improved precision and recall as ADM's ManifoldEstimator: a point is in a set's manifold if it lies within
    some set point's k-th-nearest-neighbour radius. precision: samples in the reference manifold; recall: the
    converse. fp16 reproduces ADM's float16 distances; block (ADM: 10000) only decides where overflow falls back.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref, sam = (torch.as_tensor(np.asarray(f, dtype=np.float32), device=device) for f in (ref_feats, sample_feats))
    if ref.ndim != 2 or sam.ndim != 2 or ref.shape[1] != sam.shape[1]:
        raise ValueError(f"need (N, D) features of one D on both sides, got {tuple(ref.shape)} and {tuple(sam.shape)}")
    if min(len(ref), len(sam)) <= k:
        raise ValueError(f"need more than k={k} points on each side, got {len(ref)} reference and {len(sam)} samples")
    r_ref, r_sam = _knn_radii(ref, k, fp16, block), _knn_radii(sam, k, fp16, block)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sam_in = torch.zeros(len(sam), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block):
        for j in range(0, len(sam), block):
            d = _sq_dists(ref[i:i + block], sam[j:j + block], fp16)
            ref_in[i:i + block] |= (d <= r_sam[None, j:j + block]).any(1)
            sam_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
    return sam_in.double().mean().item(), ref_in.double().mean().item()


def _stats(side, key, suffix):
    if f"mu{suffix}" in side:  # stored statistics win, as in ADM (a reference batch's cover the whole dataset)
        return side[f"mu{suffix}"], side[f"sigma{suffix}"]
    return feature_stats(side[key]) if key in side else None


def _attempt(why, names, fn, *args):
    try:
        return fn(*args)
    except ValueError as e:  # a metric the inputs cannot give is reported, not fatal
        why.update(dict.fromkeys(names, str(e)))


def compute_metrics(samples, ref, k=3, is_splits=10):
    """
    samples, ref: dicts of feats (N, D): FID, precision, recall; spatial: sFID; logits: IS (samples only);
    mu/sigma, mu_s/sigma_s: statistics used instead. Returns ({metric: float or None}, {metric: why None}).
    """
    values, why = {}, {}
    for name, key, suffix in (("fid", "feats", ""), ("sfid", "spatial", "_s")):
        a, b = _stats(samples, key, suffix), _stats(ref, key, suffix)
        if a is None or b is None:
            why[name] = f"needs {key} features or mu{suffix}/sigma{suffix} statistics on both sides"
        else:
            values[name] = _attempt(why, [name], frechet_distance, *a, *b)
    if "logits" in samples:
        probs = softmax(np.asarray(samples["logits"], np.float64), axis=1)
        values["is"] = _attempt(why, ["is"], inception_score, probs, is_splits)
    else:
        why["is"] = "needs the samples' class logits (images, or a statistics file with logits)"
    if "feats" in samples and "feats" in ref:
        values["precision"], values["recall"] = _attempt(
            why, ["precision", "recall"], precision_recall, ref["feats"], samples["feats"], k) or (None, None)
    else:
        why["precision"] = why["recall"] = "needs per-image features on both sides (images, or feats in statistics)"
    return {m: values.get(m) for m in METRICS}, why


# ----------------------------------------------------------------------------- the FID Inception network

def resize_tf1(x, size=299):
    """
    Float (N, C, H, W) to size x size as TF1's resize_bilinear (no align_corners, no half-pixel centres) in float32:
    src = dst * (in / out), taps floor(src) and min(ceil(src), in - 1), lerp src - floor(src); rows first.
    """
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (torch.tensor(float(n_in)) / size).to(x.device)
        lo = src.floor()
        return lo.long(), src.ceil().long().clamp(max=n_in - 1), src - lo

    y0, y1, wy = taps(x.shape[2])
    x0, x1, wx = taps(x.shape[3])
    left, right = x.index_select(3, x0), x.index_select(3, x1)
    h = left + (right - left) * wx  # top and bottom rows of TF's compute_lerp, for every input row
    top, bottom = h.index_select(2, y0), h.index_select(2, y1)
    return top + (bottom - top) * wy[:, None]


def conv(cin, cout, kernel, stride=1, padding=0):
    """Convolution without bias, TF's batch norm (eps 1e-3), ReLU; keys conv.*, bn.* as in the weights file."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                                     bn=nn.BatchNorm2d(cout, eps=1e-3), relu=nn.ReLU()))


def avg_pool(x):  # TF's SAME average pool divides by the number of unpadded pixels
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


ROW7, COL7 = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))  # factorised 7x7 and 3x3
ROW3, COL3 = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))


class BlockA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1, self.branch_pool = conv(cin, 64, 1), conv(cin, pool, 1)
        self.branch5x5_1, self.branch5x5_2 = conv(cin, 48, 1), conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = conv(64, 96, 3, padding=1), conv(96, 96, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(avg_pool(x))], 1)


class BlockB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = conv(cin, 384, 3, stride=2), conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = conv(64, 96, 3, padding=1), conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):  # Mixed_6b..6e, 17x17
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1, self.branch_pool = conv(cin, 192, 1), conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = conv(cin, c7, 1), conv(c7, c7, **ROW7), conv(c7, 192, **COL7)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = conv(cin, c7, 1), conv(c7, c7, **COL7)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = conv(c7, c7, **ROW7), conv(c7, c7, **COL7)
        self.branch7x7dbl_5 = conv(c7, 192, **ROW7)

    def forward(self, x):
        dbl = [getattr(self, f"branch7x7dbl_{i}") for i in range(1, 6)]
        return torch.cat([self.branch1x1(x), chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, *dbl), self.branch_pool(avg_pool(x))], 1)


class BlockD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = conv(cin, 192, 1), conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = conv(cin, 192, 1), conv(192, 192, **ROW7)
        self.branch7x7x3_3, self.branch7x7x3_4 = conv(192, 192, **COL7), conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = [getattr(self, f"branch7x7x3_{i}") for i in range(1, 5)]
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2), chain(x, *b7), F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):  # Mixed_7b/7c, 8x8
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's Mixed_7c pools with max, not average
        self.branch1x1, self.branch_pool = conv(cin, 320, 1), conv(cin, 192, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = conv(384, 384, **ROW3), conv(384, 384, **COL3)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = conv(cin, 448, 1), conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = conv(384, 384, **ROW3), conv(384, 384, **COL3)

    def forward(self, x):
        a, b = self.branch3x3_1(x), chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """The FID Inception (TF inception-2015-12-05) with pytorch-fid's state-dict keys."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = conv(3, 32, 3, stride=2), conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = conv(32, 64, 3, padding=1), conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a, self.Mixed_6b, self.Mixed_6c = BlockB(288), BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = BlockD(768), BlockE(1280, False), BlockE(2048, True)
        self.fc = nn.Linear(2048, 1008)

    def features(self, x):
        """(N, 3, 299, 299) resized and normalised -> pool_3 (N, 2048), spatial (N, 2023), logits (N, 1008)."""
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = chain(F.max_pool2d(x, 3, 2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = chain(F.max_pool2d(x, 3, 2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)
        x = chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c)
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]  # mixed_6/conv; Mixed_6d recomputes it, a cheap 1x1 conv
        pool = chain(x, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c).mean((2, 3))
        # NHWC flattening as the TF graph, so that statistics agree with a reference batch's mu_s/sigma_s
        return pool, spatial.permute(0, 2, 3, 1).flatten(1), pool @ self.fc.weight.T

    def forward(self, images):
        """Float (N, 3, H, W) in [0, 255] -> features() of the image resized to 299 and scaled to [-1, 1)."""
        return self.features((resize_tf1(images, 299) - 128) / 128)


def _check_online(url):
    """Fail at once, not after torch.hub's waits, when the weights are not cached and there is no network."""
    parts = urllib.parse.urlparse(url)
    if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(parts.path))):
        return
    try:
        socket.create_connection((parts.hostname, parts.port or {"http": 80}.get(parts.scheme, 443)), timeout=3).close()
    except OSError:
        die(f"cannot download {url} (no network?): download it where there is one and pass the local path with "
            "--inception-weights PATH")


def load_inception(weights, device):
    """The network with weights from a path or URL in the pytorch-fid format, loaded strictly."""
    url = weights.startswith(("http://", "https://"))
    if url:
        _check_online(weights)
    elif not os.path.isfile(weights):
        die(f"--inception-weights {weights} does not exist: give pt_inception-2015-12-05-6726825d.pth or its URL")
    try:
        state = torch.hub.load_state_dict_from_url(weights, map_location="cpu", progress=sys.stderr.isatty(),
                                                   weights_only=True) if url else \
            torch.load(weights, map_location="cpu", weights_only=True)
        net = InceptionV3()
        net.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 (download, unpickling, a non-dict, other keys or shapes: one fix)
        detail = ([line.strip() for line in str(e).splitlines() if line.strip()] or [""])[-1][:200]
        die(f"--inception-weights {weights}: cannot load the FID Inception from it ({type(e).__name__}: {detail}); "
            f"pass a local copy of {FID_WEIGHTS_URL}")
    return net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- reading the two sides

def _npz_images(path, flag):
    """arr_0's header and a reader of its rows that never holds the whole array (50K images are ~10 GB)."""
    def corrupt(why):
        die(f"{flag} {path} is truncated or corrupt ({why}); write it again: {SAVE_IMAGES}")

    try:
        f = zipfile.ZipFile(path).open("arr_0.npy")
        shape, fortran, dtype = getattr(np.lib.format, "read_array_header_%d_%d" % np.lib.format.read_magic(f))(f)
    except Exception as e:  # noqa: BLE001
        corrupt(f"{type(e).__name__} in the arr_0 header")

    def batches(bs):
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for i in range(0, shape[0], bs):
            try:
                buf = f.read(min(bs, shape[0] - i) * row)
            except Exception as e:  # noqa: BLE001 (zipfile's CRC check, zlib of a compressed npz)
                corrupt(f"{type(e).__name__} after {i} images")
            if len(buf) != min(bs, shape[0] - i) * row:
                corrupt(f"arr_0 ends after {i + len(buf) // row} of {shape[0]} images")
            yield np.frombuffer(bytearray(buf), dtype=dtype).reshape(-1, *shape[1:])  # writable for torch
    if fortran:
        die(f"{flag} {path}: arr_0 is Fortran-ordered; {SAVE_IMAGES}, made C-ordered with np.ascontiguousarray")
    return shape, dtype, batches


def _read_image(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        die(f"{path}: cannot read the image ({type(e).__name__}: {e}); remove or convert it")


def _folder_images(folder):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if len(files) < 2:
        die(f"{folder} holds {len(files)} images ({', '.join(IMAGE_EXTS)}); at least 2 are needed")
    first = _read_image(files[0])

    def batches(bs):
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
            for i in range(0, len(files), bs):
                imgs = list(ex.map(_read_image, files[i:i + bs]))
                for p, im in zip(files[i:i + bs], imgs):
                    if im.shape != first.shape:
                        die(f"{p} is {im.shape[1]}x{im.shape[0]} but {files[0]} is {first.shape[1]}x{first.shape[0]}; "
                            f"all images of {folder} must have one resolution")
                yield np.stack(imgs)
    return (len(files), *first.shape), batches


def open_side(path, flag):
    """
    Check one side from its headers and return (dict of what it stores, images): images is None or
    (shape, batches(bs) -> iterator of uint8 (B, H, W, 3) arrays). Exits with a clear error on bad input.
    """
    if not os.path.exists(path):
        die(f"{flag} {path} does not exist: give an .npz (arr_0 images or mu/sigma statistics) or a folder of images")
    if os.path.isdir(path):
        return {}, _folder_images(path)
    try:
        npz = np.load(path)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            die(f"{flag} {path} is a single .npy array, not an .npz: {SAVE_IMAGES}")
        keys = set(npz.files)
        stored = {k: npz[k] for k in STAT_KEYS if k in keys}
    except Exception as e:  # noqa: BLE001 (zipfile, zlib, pickle and format errors all mean: write it again)
        die(f"{flag} {path} is not a readable .npz, maybe truncated or corrupt ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:100]}); write it again: {SAVE_IMAGES}")
    for s in ("", "_s"):
        mu, sigma = stored.get(f"mu{s}"), stored.get(f"sigma{s}")
        if (mu is None) != (sigma is None) or (mu is not None and (mu.ndim != 1 or sigma.shape != mu.shape * 2)):
            die(f"{flag} {path}: mu{s} and sigma{s} must come together, shaped (D,) and (D, D); use --save-stats")
    if "feats" in stored and (stored["feats"].ndim != 2 or len(stored["feats"]) < 2):
        die(f"{flag} {path}: feats has shape {stored['feats'].shape}; expected (N, D) with N >= 2")
    if "arr_0" not in keys or "feats" in stored:
        if not stored:
            die(f"{flag} {path} has neither arr_0 images nor mu/sigma statistics (keys: {', '.join(sorted(keys))[:60]}): "
                + SAVE_IMAGES)
        return stored, None
    shape, dtype, batches = _npz_images(path, flag)
    if len(shape) != 4 or shape[3] != 3 or shape[0] < 2 or dtype != np.uint8:
        die(f"{flag} {path}: arr_0 is {dtype} of shape {shape}; expected at least 2 C-ordered uint8 (N, H, W, 3) "
            "images (from [-1, 1] floats: ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))")
    return stored, (shape, batches)


def _prefetch(batches):
    """Read the next batch in a thread while the current one runs through the network."""
    it = iter(batches)
    with ThreadPoolExecutor(1) as ex:
        nxt = ex.submit(next, it, None)
        while (b := nxt.result()) is not None:
            nxt = ex.submit(next, it, None)
            yield b


@torch.no_grad()
def inception_features(net, images, batch_size, device, desc):
    """Run the images of one side through the network: (feats, spatial, logits) float32 arrays, images/s."""
    (n, *_), batches = images
    out = [np.empty((n, d), np.float32) for d in (2048, 7 * 17 * 17, 1008)]
    i, t0, shown = 0, time.time(), time.time()
    with tqdm(total=n, desc=desc, unit="img", disable=not sys.stderr.isatty()) as bar:
        for b in _prefetch(batches(batch_size)):
            x = torch.from_numpy(b).to(device).permute(0, 3, 1, 2).float()
            for o, f in zip(out, net(x.contiguous(memory_format=torch.channels_last))):
                o[i:i + len(b)] = f.cpu().numpy()
            i += len(b)
            bar.update(len(b))
            if bar.disable and time.time() - shown > 5:  # a log file gets a plain line now and then, no '\r' redraws
                log(f"{desc}: {i}/{n} images")
                shown = time.time()
    return (*out, n / (time.time() - t0))


# ----------------------------------------------------------------------------- outputs

def _stem(path):
    path = os.path.normpath(path)
    return path[:-4] if path.endswith(".npz") else path


def _same(a, b):  # one file, also through a symbolic or hard link
    return os.path.realpath(a) == os.path.realpath(b) or os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def plan_outputs(args, sides):
    """
    [(path, "metrics" or the side whose statistics go there)], refused before any work when a path would
    replace an input or an earlier output, or its folder does not take new files.
    """
    plan = [(args.out or _stem(args.samples) + "_fid.json", "metrics")] + \
        [(_stem(getattr(args, n)) + "_stats.npz", n) for n, (_, images) in sides.items() if args.save_stats and images]
    inputs = [args.samples, args.ref]
    for i, (path, what) in enumerate(plan):
        flag, fix = ("--out", "choose another --out") if what == "metrics" else ("--save-stats", "drop --save-stats")
        for other in inputs + [p for p, _ in plan[:i]]:
            if _same(path, other):
                die(f"{flag} would write {path} over the {'input' if other in inputs else 'output'} {other}; "
                    f"{fix}{' or rename that input' if flag == '--save-stats' else ''}")
        if os.path.isdir(path):
            die(f"{flag} {path} is a folder; {fix}")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            tempfile.TemporaryFile(dir=folder).close()  # a real probe: os.access says yes to root on read-only mounts
        except OSError as e:
            die(f"{flag} {path}: cannot create files in {folder} ({e.strerror}); create it, make it writable or {fix}")
    return plan


def write_outputs(files):
    """files: {path: function writing an open binary file}. Every file appears complete, or none changes."""
    tmps = {}
    try:
        for path, write in files.items():
            with open(tmps.setdefault(path, f"{path}.tmp.{os.getpid()}"), "wb") as f:
                write(f)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except OSError as e:
        die(f"cannot write {e.filename or path} ({e.strerror or e}); free some space or choose another --out")
    finally:
        for tmp in filter(os.path.exists, tmps.values()):
            os.remove(tmp)


def stats_arrays(side):
    """Statistics and per-image features of a side, to be passed as SAMPLES or --ref next time."""
    keep = {k: side[k] for k in STAT_KEYS if k in side}
    for s, key in (("", "feats"), ("_s", "spatial")):
        if f"mu{s}" not in keep and key in side:
            keep[f"mu{s}"], keep[f"sigma{s}"] = feature_stats(side[key])
    return keep


# ----------------------------------------------------------------------------- command line

class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # a None default is spelled out in the help text itself
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.error = lambda msg: die(f"{msg}; see python fid.py --help")  # one line, not usage + message
    p.add_argument("samples", help="samples: .npz (arr_0 uint8 NHWC), folder of images, or statistics .npz")
    p.add_argument("--ref", required=True, help="reference: ADM reference batch .npz, folder, or statistics .npz")
    p.add_argument("--out", help="JSON file with the metrics (default: SAMPLES_fid.json)")
    p.add_argument("--inception-weights", default=FID_WEIGHTS_URL, help="path or URL of pytorch-fid's FID Inception")
    p.add_argument("--batch-size", type=int, default=200, help="images a forward pass of the Inception network")
    p.add_argument("--is-splits", type=int, default=10, help="IS splits (ADM: 5000 images a split, 10 at 50K)")
    p.add_argument("--save-stats", action="store_true", help="also write SIDE_stats.npz (mu, sigma, mu_s, sigma_s, "
                   "feats, logits) beside each side given as images, to pass as SAMPLES or --ref next time")
    p.add_argument("--tf32", action="store_true", help="TF32 convolutions on Ampere+ GPUs: faster, features ~1e-3 off")
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--is-splits", args.is_splits)):
        if value < 1:
            die(f"{flag} {value}: must be at least 1")
    return args


def _check_dims(args, sides):
    # Features of two extractors do not compare; checked from the headers, before the Inception pass.
    a, b = ({**({"mu": 2048, "mu_s": 7 * 17 * 17, "feats": 2048} if images else {}),
             **{k: stored[k].shape[-1] for k in ("mu", "mu_s", "feats") if k in stored}}
            for stored, images in sides.values())
    for key in sorted(a.keys() & b.keys()):
        if a[key] != b[key]:
            die(f"{key} has {a[key]} dimensions for {args.samples} but {b[key]} for {args.ref}; "
                "both sides must come from the same feature extractor")


def main(argv=None):
    args = parse_args(argv)
    sides = {"samples": open_side(args.samples, "SAMPLES"), "ref": open_side(args.ref, "--ref")}
    _check_dims(args, sides)
    plan = plan_outputs(args, sides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    net, speed, data = None, {}, {}
    for name, (stored, images) in sides.items():
        data[name] = side = dict(stored)
        if images is not None:
            net = net if net is not None else load_inception(args.inception_weights, device)
            side["feats"], side["spatial"], side["logits"], speed[name] = \
                inception_features(net, images, args.batch_size, device, f"inception {name}")
            log(f"{name}: {images[0][0]} images of {images[0][2]}x{images[0][1]}, "
                f"{speed[name]:.1f} images/s on {device} (batch {args.batch_size})")

    values, why = compute_metrics(data["samples"], data["ref"], is_splits=args.is_splits)
    num = {n: (len(s["feats"]) if "feats" in s else None) for n, s in data.items()}
    if num["samples"] is not None and num["samples"] < 50000:
        log(f"note: {num['samples']} samples; ADM's and the paper's numbers use 50,000 (FID, sFID are biased up at small N)")
    width = max(map(len, NAMES.values()))
    log("metrics:\n" + "\n".join(f"{NAMES[m]:<{width}}  " + (f"{values[m]:.4f}" if values[m] is not None
                                                            else f"n/a ({why[m]})") for m in METRICS))
    report = {**values, "unavailable": {m: why[m] for m in METRICS if values[m] is None},
              "samples": args.samples, "ref": args.ref, "num_samples": num["samples"], "num_ref": num["ref"],
              "inception_weights": args.inception_weights, "images_per_second": speed}
    write_outputs({path: (lambda f: f.write(json.dumps(report, indent=2).encode())) if what == "metrics" else
                   (lambda f, side=data[what]: np.savez(f, **stats_arrays(side))) for path, what in plan})
    log("wrote " + ", ".join(p for p, _ in plan))


def _terminated(signum, frame):
    raise KeyboardInterrupt(signum)  # SIGTERM unwinds like Ctrl-C: progress bars close, temporary files go


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except KeyboardInterrupt as e:
        print("error: interrupted; nothing was written, rerun the same command to start again", file=sys.stderr)
        sys.exit(128 + (e.args[0] if e.args else signal.SIGINT))
