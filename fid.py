"""
FID, sFID, Inception Score, precision and recall as the ADM evaluator (openai/guided-diffusion
evaluations/evaluator.py) computes them, in PyTorch; and, for data the Inception network does not suit or where
its weights cannot be had (offline), the Frechet distance (FD), precision and recall in two other feature spaces.

Inputs, SAMPLES and --ref, each one of
  - an .npz with arr_0: uint8 images (N, H, W, 3), or grayscale (N, H, W) or (N, H, W, 1), as sample.py and ADM's
    reference batches write it; optionally labels (N,): the class each sample was asked for (sample.py writes it).
    A reference batch (VIRTUAL_imagenet256_labeled.npz) also holds mu/sigma/mu_s/sigma_s, used for FID/sFID as ADM does;
  - a folder of images (png/jpg/..., searched recursively; one of class subfolders only is labelled, as encode.py
    reads it);
  - an encode.py dataset directory (latents.npy, labels.npy, meta.json): its pixels when made with --vae none,
    else (or at another size) its source images, meta.json source + files.txt;
  - a statistics .npz (mu, sigma, mu_s, sigma_s; optionally feats, logits, features), e.g. from --save-stats.
Folders and dataset directories are read as encode.py reads images, the ADM center crop (common.ImageCrops), at
the samples' resolution (arr_0's side; --image-size overrides), so a reference of other or mixed sizes is fine.
Outputs, written only when the whole run succeeds: the metrics on stdout and in a JSON file (--out, default
SAMPLES_fid.json), with --save-stats also SIDE_stats.npz beside each side given as images. Metrics the inputs
cannot give (precision/recall against statistics only, IS without logits) are reported as not available.

Feature spaces (--features); the JSON names the one used ("features"), as FDs of two spaces do not compare:
  inception   (default) FID, sFID, IS, precision, recall. The TF "2015-12-05" FID graph, written out here, with
              pytorch-fid's weights file (pt_inception-2015-12-05-6726825d.pth). Preprocessing as ADM feeds that
              graph: TF1 resize_bilinear to 299 (align_corners=False, no half-pixel centres), then (x - 128) / 128.
              Features: pool_3 (2048) for FID, precision, recall; mixed_6/conv (Mixed_6d.branch1x1), first 7
              channels, 17x17, NHWC order (2023) for sFID; pool_3 @ fc.weight.T (1008 logits, no bias) for IS.
              That graph and the resize are written out below so that this file needs neither pytorch-fid nor
              TensorFlow (compared with pytorch-fid's modules and TF1's formula in tests/test_fid.py).
  classifier  fd, precision, recall on the 128-d features (global average pool) of a small CNN trained here, on
              the CPU in a minute or two, on labelled real images (--classifier-data; default --ref when it is a
              class folder or a dataset directory) at the samples' resolution and channels, inputs x / 127.5 - 1.
              It is cached (--classifier), so later runs reuse it; its accuracy on a fixed stratified 10% of its
              data, held out of training, is reported. With labels, also the share of the samples it assigns to
              the class asked for (class_accuracy) and the same on the reference (ref_class_accuracy).
  dinov2      fd, precision, recall on the CLS token of DINOv2 (--dinov2: a local official or timm-layout .pth, or
              a name to download) at 224 px (bicubic resize, ImageNet mean/std).
Grayscale: the classifier sees one channel when the samples have one, or when their three channels are equal and
every reference image is grayscale; Inception and DINOv2 always see three (gray replicated).

Copied alone into another repository, fid.py computes the Inception metrics of .npz inputs (images or statistics);
image folders, dataset directories and --features classifier/dinov2 need common.py of this repository beside it.

    python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    python fid.py samples/mine.npz --ref my_images --features classifier
"""
import argparse
import hashlib
import json
import math
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
FEATURES = ("inception", "classifier", "dinov2")
METRICS = ("fid", "sfid", "is", "precision", "recall")
NAMES = {"fid": "FID", "sfid": "sFID", "is": "Inception Score", "precision": "Precision", "recall": "Recall",
         "class_accuracy": "Class accuracy", "ref_class_accuracy": "Class accuracy (ref)"}
SPACE_NAMES = {"classifier": "classifier features", "dinov2": "DINOv2 features"}
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "feats", "logits")
SAVE_IMAGES = "save images with np.savez(path, arr_0=uint8 (N, H, W, 3) array) " \
              "or pass a statistics npz from --save-stats"
OFFLINE_WAYS = "or pass --features classifier (a classifier trained on the labelled reference, offline) " \
               "or --features dinov2 --dinov2 LOCAL.pth"


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


def compute_metrics(samples, ref, k=3, is_splits=10, fp16=True):
    """
    samples, ref: dicts of feats (N, D): FID, precision, recall; spatial: sFID; logits: IS (samples only);
    mu/sigma, mu_s/sigma_s: statistics used instead. fp16: ADM's float16 distances for precision and recall.
    Returns ({metric: float or None}, {metric: why None}).
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
            why, ["precision", "recall"], precision_recall, ref["feats"], samples["feats"], k, fp16) or (None, None)
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
            f"--inception-weights PATH, {OFFLINE_WAYS}")


def _check_inception_path(weights):
    if not weights.startswith(("http://", "https://")) and not os.path.isfile(weights):
        die(f"--inception-weights {weights} does not exist: give pt_inception-2015-12-05-6726825d.pth or its URL, "
            + OFFLINE_WAYS)


def load_inception(weights, device):
    """The network with weights from a path or URL in the pytorch-fid format, loaded strictly."""
    url = weights.startswith(("http://", "https://"))
    _check_online(weights) if url else _check_inception_path(weights)
    try:
        state = torch.hub.load_state_dict_from_url(weights, map_location="cpu", progress=sys.stderr.isatty(),
                                                   weights_only=True) if url else \
            torch.load(weights, map_location="cpu", weights_only=True)
        net = InceptionV3()
        net.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 (download, unpickling, a non-dict, other keys or shapes: one fix)
        detail = ([line.strip() for line in str(e).splitlines() if line.strip()] or [""])[-1][:200]
        die(f"--inception-weights {weights}: cannot load the FID Inception from it ({type(e).__name__}: {detail}); "
            f"pass a local copy of {FID_WEIGHTS_URL}{', ' + OFFLINE_WAYS if url else ''}")
    return net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- reading the sides

def _common(what):
    """common.py of this repository, which `what` needs (fid.py copied alone reads .npz files only)."""
    try:
        import common
    except ImportError:
        die(f"{what} needs common.py of the D2C repository beside fid.py; copied alone, fid.py reads .npz images and "
            "statistics with --features inception")
    return common


def _npz_images(path, flag):
    """arr_0's header and a reader of its rows that never holds the whole array (50K images are ~10 GB)."""
    def corrupt(why):
        die(f"{flag} {path} is truncated or corrupt ({why}); write it again: {SAVE_IMAGES}")

    def open_rows():
        try:
            f = zipfile.ZipFile(path).open("arr_0.npy")
            return f, getattr(np.lib.format, "read_array_header_%d_%d" % np.lib.format.read_magic(f))(f)
        except Exception as e:  # noqa: BLE001
            corrupt(f"{type(e).__name__} in the arr_0 header")

    f, (shape, fortran, dtype) = open_rows()
    f.close()

    def batches(bs):  # each call reads the file from its start
        f, _ = open_rows()
        row = int(np.prod(shape[1:])) * dtype.itemsize
        with f:
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


def _npz_side(path, flag):
    try:
        npz = np.load(path)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            die(f"{flag} {path} is a single .npy array, not an .npz: {SAVE_IMAGES}")
        keys = set(npz.files)
        stored = {k: npz[k] for k in STAT_KEYS if k in keys}
        space = str(npz["features"]) if "features" in keys else "inception"  # files before the key: Inception's
        labels = npz["labels"] if "labels" in keys else None
    except SystemExit:
        raise
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
        return dict(kind="stats", path=path, flag=flag, stored=stored, space=space)
    shape, dtype, batches = _npz_images(path, flag)
    if len(shape) not in (3, 4) or len(shape) == 4 and shape[3] not in (1, 3) or shape[0] < 2 or dtype != np.uint8:
        die(f"{flag} {path}: arr_0 is {dtype} of shape {shape}; expected at least 2 C-ordered uint8 (N, H, W, 3) "
            "images, or grayscale (N, H, W) (from [-1, 1] floats: "
            "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))")
    if labels is not None and (labels.shape != shape[:1] or labels.dtype.kind not in "iu"):
        die(f"{flag} {path}: labels is {labels.dtype} of shape {labels.shape}; expected ({shape[0]},) integers, the "
            "class of each image, or no labels")
    return dict(kind="npz", path=path, flag=flag, stored=stored, n=shape[0], hw=shape[1:3],
                channels=shape[3] if len(shape) == 4 else 1, raw=batches, labels=labels, class_names=None)


def _headers(files, flag):
    """(sizes, modes) of the images, read off their headers (no pixel is decoded); an unreadable one stops here."""
    from PIL import Image

    def one(p):
        try:
            with Image.open(p) as im:
                return im.size, im.mode
        except Exception as e:  # noqa: BLE001 (PIL raises many types for a broken file)
            die(f"{flag} {p}: cannot read the image ({type(e).__name__}: {e}); remove or convert it")
    with ThreadPoolExecutor(8) as ex:  # file opening waits on the disk: threads overlap it
        sizes, modes = zip(*ex.map(one, files))
    return list(sizes), list(modes)


def _folder_side(path, flag):
    """An image folder, searched recursively; labelled (find_images' order) when all its images lie in class
    subfolders and every subfolder holds some."""
    common = _common(f"{flag} {path} (an image folder)")
    exts = common.IMG_EXTENSIONS
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(exts))
    if len(files) < 2:
        die(f"{flag} {path} holds {len(files)} images ({' '.join(exts)}); at least 2 are needed")
    rel = [os.path.relpath(f, path) for f in files]
    labels = class_names = None
    subfolders = {e.name for e in os.scandir(path) if e.is_dir()}
    if all(os.sep in r for r in rel) and {r.split(os.sep)[0] for r in rel} == subfolders:
        class_names, rel, labels = common.find_images(path, flag)
        files, labels = [os.path.join(path, r) for r in rel], np.asarray(labels, np.int64)
    sizes, modes = _headers(files, flag)
    return dict(kind="folder", path=path, flag=flag, stored={}, n=len(files), files=files, sizes=sizes,
                gray=all(m in common.GRAY_MODES for m in modes), labels=labels, class_names=class_names)


def _dataset_side(path, flag):
    common = _common(f"{flag} {path} (a dataset directory)")
    latents, labels, meta = common.load_dataset(path)
    pixels = meta.get("vae") == "none"
    if len(latents) < 2:
        die(f"{flag} {path} holds {len(latents)} images; at least 2 are needed")
    return dict(kind="dataset", path=path, flag=flag, stored={}, n=len(latents), latents=common.unflipped(latents),
                labels=labels, class_names=meta.get("class_names"), meta=meta, pixels=pixels,
                size=meta["image_size"], channels=meta.get("channels") or (latents.shape[-3] if pixels else 3))


def open_side(path, flag):
    """Check one side from its headers: a dict with kind npz (images), stats, folder or dataset, and what it
    stores. Exits with a clear error on bad input; no pixel is read yet."""
    if not os.path.exists(path):
        die(f"{flag} {path} does not exist: give an .npz (arr_0 images or mu/sigma statistics), a folder of images "
            "or an encode.py dataset directory")
    if os.path.isdir(path):
        is_dataset = os.path.exists(os.path.join(path, "latents.npy"))
        return _dataset_side(path, flag) if is_dataset else _folder_side(path, flag)
    return _npz_side(path, flag)


def has_images(side):
    return side["kind"] != "stats"


def _square_size(side):
    """The side length of a side's images when they are all square of one size, else None."""
    if side["kind"] == "npz":
        return side["hw"][0] if side["hw"][0] == side["hw"][1] else None
    if side["kind"] == "folder":
        sizes = set(side["sizes"])
        w, h = sizes.pop() if len(sizes) == 1 else (None, 0)
        return w if w == h else None
    return side.get("size")


def _from_sources(side, size):
    """Whether a dataset directory is read from its source images: made with a VAE, or at another size."""
    return side["kind"] == "dataset" and (not side["pixels"] or side["size"] != size)


def _check_sources(side, size):
    """A dataset directory read from its source images (meta.json source + files.txt): every one must be there."""
    if "files" in side:
        return
    path, meta = side["path"], side["meta"]
    why = f"made with --vae {meta.get('vae')}" if not side["pixels"] else f"stored at {side['size']} px, not {size}"
    listing = os.path.join(path, "files.txt")
    rows = open(listing).read().splitlines() if os.path.isfile(listing) else []
    if len(rows) != side["n"]:
        die(f"{side['flag']} {path} is {why}, so its source images are read, but {listing} is missing or has "
            f"{len(rows)} rows for {side['n']} images: pass the image folder it was made from instead")
    files = [os.path.join(meta.get("source") or "", r) for r in rows]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        die(f"{side['flag']} {path} is {why}, so its source images are read, but {len(missing)} are gone (first: "
            f"{missing[0]}): restore them or pass the image folder instead")
    side["files"] = files


def _pixels(side, lo, hi):
    """uint8 (B, H, W, C) rows of a --vae none dataset: its latents are x / 127.5 - 1 (exact through float16)."""
    x = np.asarray(side["latents"][lo:hi], dtype=np.float32)
    return np.rint((x + 1) * 127.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _equal_channels(batches):
    return all(b.shape[-1] == 1 or ((b[..., 1:] == b[..., :1]).all()) for b in batches)


def is_gray(side):
    """Whether every image of a side is grayscale: a gray PIL mode in a folder, one channel, three equal ones, or
    meta.json channels 1 of a dataset directory. Statistics have no images to say otherwise."""
    if side["kind"] == "folder":
        return side["gray"]
    if side["kind"] == "dataset":
        if "channels" in side["meta"]:
            return side["meta"]["channels"] == 1
        return side["pixels"] and _equal_channels(_pixels(side, i, i + 4096) for i in range(0, side["n"], 4096))
    if side["kind"] == "npz":
        return side["channels"] == 1 or _equal_channels(side["raw"](4096))
    return True


def single_channel(side):
    return side["kind"] == "npz" and side["channels"] == 1 or side["kind"] == "folder" and side["gray"] \
        or side["kind"] == "dataset" and side["channels"] == 1


def _convert(batch, size, channels):
    """uint8 (B, H, W, c) -> (B, size, size, channels): gray replicated, RGB to PIL's "L", and the ADM center crop
    to size (None: as it is), all as encode.py's ImageCrops does to a file."""
    b, h, w, c = batch.shape
    if (size is None or (h, w) == (size, size)) and c == channels:
        return batch
    if (size is None or (h, w) == (size, size)) and c == 1:
        return np.repeat(batch, channels, axis=3)  # what PIL's "L" -> "RGB" does
    from PIL import Image
    from common import center_crop_arr
    out = []
    for img in batch:
        im = Image.fromarray(img[..., 0] if c == 1 else img, "L" if c == 1 else "RGB")
        im = im.convert("L" if channels == 1 else "RGB")
        arr = center_crop_arr(im, size) if size is not None and im.size != (size, size) else np.asarray(im)
        out.append(arr.reshape(arr.shape[0], arr.shape[1], channels))
    return np.stack(out)


def side_images(side, size, channels):
    """(n, batches(bs) -> uint8 (B, size, size, channels) arrays) of one side. Files go through encode.py's
    ImageCrops (the ADM center crop to size); an .npz's images are converted alike, or kept at their own size
    when size is None."""
    n, flag = side["n"], side["flag"]
    if "array" in side:  # already in memory (the classifier's training images)
        return n, lambda bs: (_convert(side["array"][i:i + bs], size, channels) for i in range(0, n, bs))
    if side["kind"] == "npz":
        return n, lambda bs: (_convert(b.reshape(*b.shape[:3], -1), size, channels) for b in side["raw"](bs))
    if side["kind"] == "dataset" and not _from_sources(side, size):
        return n, lambda bs: (_convert(_pixels(side, i, i + bs), size, channels) for i in range(0, n, bs))
    if side["kind"] == "dataset":
        _check_sources(side, size)
    common = _common(f"{flag} {side['path']}")
    files = side["files"]

    def batches(bs):
        rows = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        workers = common.default_workers() if n >= 1000 else 0  # worker start-up costs more than a small folder
        for idx, img, errors in common.crop_loader(files, size, rows, workers, torch.device("cpu"), channels):
            for i, e in zip(idx.tolist(), errors):
                if e:
                    die(f"{flag} {files[i]}: cannot read the image ({e}); remove or convert it")
            yield img.permute(0, 2, 3, 1).numpy()
    return n, batches


def load_images(side, size, channels, batch_size=1000):
    """Every image of a side in memory, uint8 (N, size, size, channels), kept for a second use."""
    if "array" not in side:
        n, batches = side_images(side, size, channels)
        side["array"] = np.concatenate(list(batches(batch_size)))
    return _convert(side["array"], size, channels)


def _prefetch(batches):
    """Read the next batch in a thread while the current one runs through the network."""
    it = iter(batches)
    with ThreadPoolExecutor(1) as ex:
        nxt = ex.submit(next, it, None)
        while (b := nxt.result()) is not None:
            nxt = ex.submit(next, it, None)
            yield b


@torch.no_grad()
def extract(fn, images, batch_size, desc):
    """fn (uint8 (B, H, W, C) -> {name: (B, ...) array}) over every image of one side: ({name: (N, ...)}, images/s)."""
    n, batches = images
    out, i, t0, shown = {}, 0, time.time(), time.time()
    with tqdm(total=n, desc=desc, unit="img", disable=not sys.stderr.isatty()) as bar:
        for b in _prefetch(batches(batch_size)):
            for name, v in fn(b).items():
                out.setdefault(name, np.empty((n, *v.shape[1:]), v.dtype))[i:i + len(b)] = v
            i += len(b)
            bar.update(len(b))
            if bar.disable and time.time() - shown > 5:  # a log file gets a plain line now and then, no '\r' redraws
                log(f"{desc}: {i}/{n} images")
                shown = time.time()
    return out, n / (time.time() - t0)


# ----------------------------------------------------------------------------- the classifier feature space

CLASSIFIER_WIDTHS = (32, 64, 128)
CLASSIFIER_VERSION = 1  # in the cache key: another architecture or recipe trains anew
CLASSIFIER_BATCH, CLASSIFIER_LR = 128, 3e-3
CLASSIFIER_EPOCHS, CLASSIFIER_MIN_STEPS, CLASSIFIER_MAX_EPOCHS = 3, 600, 100
HELDOUT = 0.1


class Classifier(nn.Module):
    """
    A small CNN for 8 to 64 px images: per stage a 3x3 convolution (stride 2 while the side is at least 8),
    batch norm, ReLU; global average pool -> features (widths[-1]) -> linear -> class logits.
    """

    def __init__(self, channels, image_size, num_classes, widths=CLASSIFIER_WIDTHS):
        super().__init__()
        layers, side, cin = [], image_size, channels
        for w in widths:
            stride = 2 if side >= 8 else 1
            side = (side - 1) // stride + 1
            layers += [nn.Conv2d(cin, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, images):
        """uint8 (N, C, S, S) -> features (N, widths[-1]), logits (N, num_classes)."""
        f = self.body(images.float() / 127.5 - 1).mean((2, 3))
        return f, self.head(f)


def heldout_split(labels, fraction=HELDOUT):
    """(train rows, held-out rows): of each class, round(fraction * n) rows (at least one of a class of two or
    more) drawn with seed 0 whatever --classifier-seed, so that every seed is measured on the same rows."""
    rng = np.random.default_rng(0)
    held = [rng.permutation(rows)[:max(1, round(fraction * len(rows))) if len(rows) > 1 else 0]
            for rows in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def default_epochs(n_train):
    """3 passes, or on a small set as many as make CLASSIFIER_MIN_STEPS steps (a few passes learn nothing there),
    at most CLASSIFIER_MAX_EPOCHS (hundreds of passes over a few dozen images only memorise them)."""
    steps_per_epoch = math.ceil(n_train / CLASSIFIER_BATCH)
    return max(CLASSIFIER_EPOCHS, min(CLASSIFIER_MAX_EPOCHS, math.ceil(CLASSIFIER_MIN_STEPS / steps_per_epoch)))


def train_classifier(images, labels, num_classes, epochs, seed, device):
    """Train on all but the held-out rows: (network in eval mode, held-out accuracy or None, #train, #held out)."""
    train, held = heldout_split(labels)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)
    net = Classifier(x.shape[1], x.shape[2], num_classes).to(device)
    steps = epochs * math.ceil(len(train) / CLASSIFIER_BATCH)
    opt = torch.optim.AdamW(net.parameters(), CLASSIFIER_LR, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, CLASSIFIER_LR, total_steps=steps, pct_start=0.15)
    t0 = time.time()
    for epoch in range(epochs):
        net.train()
        for rows in torch.from_numpy(train)[torch.randperm(len(train), generator=g)].split(CLASSIFIER_BATCH):
            if len(rows) > 1:  # batch norm needs two images
                loss = F.cross_entropy(net(x[rows].to(device))[1], y[rows].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:  # ten lines at most
            log(f"classifier: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}, {time.time() - t0:.0f} s")
    net.eval()
    acc = None
    if len(held):
        with torch.no_grad():
            pred = torch.cat([net(x[torch.from_numpy(r)].to(device))[1].argmax(1).cpu()
                              for r in np.array_split(held, math.ceil(len(held) / 1000))])
        acc = float((pred == y[held]).double().mean())
    return net, acc, len(train), len(held)


def cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "d2c", "classifiers")


def data_identity(side, size):
    """What a classifier's training data is, for the cache key: its path and every file's size and mtime
    (a dataset directory: its arrays' and meta.json, and its source files when they are read)."""
    def stat(p):
        st = os.stat(p)
        return f"{st.st_size} {st.st_mtime_ns}"

    ident = {"path": os.path.realpath(side["path"]), "count": side["n"]}
    if side["kind"] == "dataset":
        ident.update(meta=side["meta"], arrays=[stat(os.path.join(side["path"], f))
                                                for f in ("latents.npy", "labels.npy")])
    if _from_sources(side, size):
        _check_sources(side, size)
    files = side.get("files") if side["kind"] == "folder" or _from_sources(side, size) else None
    if files:
        lines = (f"{lab} {os.path.relpath(p, side['path'])} {stat(p)}" for p, lab in zip(files, side["labels"]))
        ident["files_sha1"] = hashlib.sha1("\n".join(lines).encode()).hexdigest()
    return ident


def data_key(side, size):
    return hashlib.sha1(json.dumps(data_identity(side, size), sort_keys=True).encode()).hexdigest()[:16]


def classifier_key(data, size, channels, epochs, seed):
    blob = json.dumps(dict(data=data, image_size=size, channels=channels, epochs=epochs, seed=seed,
                           widths=CLASSIFIER_WIDTHS, version=CLASSIFIER_VERSION), sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def read_classifier(path):
    """A classifier file's contents, or a clear error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated zip, pickle errors, not a torch file)
        die(f"--classifier {path} is damaged or not a PyTorch file ({type(e).__name__}); delete it to train again, "
            "or pass another --classifier")
    need = ("state_dict", "key", "channels", "image_size", "num_classes", "widths")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        die(f"--classifier {path} is not a classifier that fid.py wrote (it needs {', '.join(need)}); delete it to "
            "train again, or pass another --classifier")
    return ckpt


UNLABELLED = {"npz": "an .npz (not a class folder or dataset directory)", "stats": "a statistics file",
              "folder": "a folder without class subfolders"}


def _check_labels(sides, k, path):
    """An .npz's labels must be classes of the classifier (sample.py's are the classes of its training data)."""
    for side in sides.values():
        labels = side.get("labels")
        if side["kind"] == "npz" and labels is not None and ((labels < 0) | (labels >= k)).any():
            die(f"{side['flag']} {side['path']}: labels hold classes outside 0..{k - 1}, the {k} classes of the "
                f"classifier ({path}); these labels are of other data")


def _labelled(side):
    return side is not None and side["kind"] in ("folder", "dataset") and side["labels"] is not None


def plan_classifier(args, sides, size, writes):
    """
    Settle the classifier before any network loads or trains: the file to reuse or to write, its training data,
    resolution and channels, and the checks on them. Returns a dict (path, key, size, channels, num_classes,
    class_names, ckpt: the loaded file or None, train: the side to train on or None, epochs).
    """
    samples, ref = sides["samples"], sides["ref"]
    data = None
    if args.classifier_data:
        data = open_side(args.classifier_data, "--classifier-data")
        if not _labelled(data):
            die(f"--classifier-data {args.classifier_data} is {UNLABELLED[data['kind']]}, without class labels: give "
                "an image folder of one subfolder per class (as encode.py reads it) or an encode.py dataset directory")
    elif _labelled(ref):
        data = ref
    if args.classifier and os.path.isfile(args.classifier):
        ckpt = read_classifier(args.classifier)
        if size is not None and size != ckpt["image_size"]:
            die(f"--classifier {args.classifier} was trained at {ckpt['image_size']} px but the samples are {size} px: "
                "pass --image-size {0} or train another (--classifier NEW.pt)".format(ckpt["image_size"]))
        plan = dict(path=args.classifier, ckpt=ckpt, train=None, class_names=ckpt.get("class_names"),
                    **{k: ckpt[k] for k in ("key", "channels", "image_size", "num_classes")})
        _check_labels(sides, ckpt["num_classes"], args.classifier)
        if args.classifier_data and data_key(data, ckpt["image_size"]) != ckpt.get("data_key"):
            die(f"--classifier {args.classifier} was trained on other data ({ckpt.get('trained_on')}) than "
                f"--classifier-data {args.classifier_data}: delete it to train again, pass another --classifier, or "
                "drop --classifier-data to use it as it is")
        return plan
    if data is None:
        die(f"--features classifier trains on labelled real images, and --ref {args.ref} is {UNLABELLED[ref['kind']]}: "
            "pass --classifier-data CLASS_FOLDER (one subfolder per class) or an encode.py dataset directory, or "
            "--classifier FILE.pt of an earlier run")
    if size is None:
        die(f"the resolution to train the classifier at is unknown (SAMPLES {args.samples} holds no images of one "
            "square size): pass --image-size")
    if _from_sources(data, size):
        _check_sources(data, size)
    channels = 1 if single_channel(samples) or all(is_gray(s) for s in (ref, data)) and is_gray(samples) else 3
    train, _ = heldout_split(data["labels"])
    num_classes = len(data["class_names"]) if data["class_names"] else int(data["meta"]["num_classes"])
    if len(train) < 2 or num_classes < 2:
        die(f"--classifier-data {data['path']}: {data['n']} images in {num_classes} classes are too few to train a "
            "classifier; give at least 2 classes and a few images of each")
    _check_labels(sides, num_classes, f"to be trained on {data['path']}")
    epochs = args.classifier_epochs or default_epochs(len(train))
    dkey = data_key(data, size)
    key = classifier_key(dkey, size, channels, epochs, args.classifier_seed)
    path = args.classifier or os.path.join(cache_dir(), f"{key}.pt")
    plan = dict(path=path, key=key, data_key=dkey, channels=channels, image_size=size, num_classes=num_classes,
                class_names=data["class_names"], ckpt=None, train=data, epochs=epochs, seed=args.classifier_seed)
    if os.path.isfile(path):
        plan.update(ckpt=read_classifier(path), train=None)
        return plan
    if args.classifier is None:
        try:
            os.makedirs(cache_dir(), exist_ok=True)
        except OSError as e:
            die(f"cannot create the classifier cache {cache_dir()} ({e.strerror}); pass --classifier FILE.pt in a "
                "writable place, or set XDG_CACHE_HOME")
    writes(path, "--classifier", "choose another --classifier")
    return plan


def classifier_net(plan, device):
    """The planned classifier: loaded from its file, or trained now and saved there atomically."""
    common = _common("--features classifier")
    if plan["ckpt"] is not None:
        ckpt = plan["ckpt"]
        net = Classifier(ckpt["channels"], ckpt["image_size"], ckpt["num_classes"], tuple(ckpt["widths"]))
        try:
            net.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:
            die(f"--classifier {plan['path']} does not fit fid.py's classifier "
                f"({str(e).splitlines()[-1].strip()[:200]}); delete it to train again")
        acc = ckpt.get("heldout_accuracy")
        log(f"classifier: reusing {plan['path']} (trained on {ckpt.get('trained_on')}, held-out accuracy "
            f"{'n/a' if acc is None else f'{acc:.4f}'})")
        return net.to(device).eval().requires_grad_(False), ckpt
    data, size, channels = plan["train"], plan["image_size"], plan["channels"]
    log(f"classifier: training on {data['path']} ({data['n']} images, {plan['num_classes']} classes) at {size} px, "
        f"{channels} channel(s), {plan['epochs']} epochs, seed {plan['seed']}; it will be saved as {plan['path']}")
    images = load_images(data, size, channels)
    t0 = time.time()
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    net, acc, n_train, n_held = train_classifier(images, data["labels"], plan["num_classes"], plan["epochs"],
                                                 plan["seed"], device)
    ckpt = dict(version=CLASSIFIER_VERSION, key=plan["key"], data_key=plan["data_key"],
                state_dict={k: v.cpu() for k, v in net.state_dict().items()}, channels=channels, image_size=size,
                num_classes=plan["num_classes"], class_names=plan["class_names"],
                widths=list(CLASSIFIER_WIDTHS), trained_on=os.path.realpath(data["path"]), epochs=plan["epochs"],
                seed=plan["seed"], heldout_accuracy=acc, num_train=n_train, num_heldout=n_held,
                train_seconds=round(time.time() - t0, 1))
    common.atomic_save(ckpt, plan["path"], "torch")
    log(f"classifier: held-out accuracy {'n/a' if acc is None else f'{acc:.4f}'} on {n_held} images, trained in "
        f"{ckpt['train_seconds']:.0f} s; saved {plan['path']}")
    return net.requires_grad_(False), ckpt


# ----------------------------------------------------------------------------- the DINOv2 feature space

DINOV2_DEFAULT = "dinov2_vitl14"  # the network of FD_DINOv2 (Stein et al., 2023)
DINOV2_RES = 224


def check_dinov2(name):
    """A path that is not there stops before anything loads (a name is looked up when the network loads)."""
    if not os.path.exists(name) and (os.sep in name or name.endswith((".pth", ".pt", ".bin", ".safetensors"))):
        die(f"--dinov2 {name} does not exist: give a local DINOv2 .pth (the official dinov2_vit*14_pretrain.pth or a "
            f"timm state dict) or a name to download ({DINOV2_DEFAULT})")


def dinov2_fn(name, device):
    """uint8 (B, H, W, 3) -> {"feats": the CLS token (B, D)}: /255, ImageNet mean/std, bicubic (antialiased when
    shrinking, as PIL) to 224 px."""
    common = _common("--features dinov2")
    model, _, res = common.load_vis_encoder(name, 256, DINOV2_RES, flag="--dinov2", fix=(
        "pass a local DINOv2 .pth (the official dinov2_vit*14_pretrain.pth or a timm state dict) with --dinov2 FILE, or "
        "--features classifier (a classifier trained on the labelled reference, offline)"))
    model = model.to(device).eval().requires_grad_(False)
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in (common.IMAGENET_MEAN, common.IMAGENET_STD))

    def fn(b):
        x = torch.from_numpy(b).to(device).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate((x - mean) / std, size=(res, res), mode="bicubic", antialias=True)
        return {"feats": model.forward_features(x)[:, 0].float().cpu().numpy()}
    return fn


def inception_fn(net, device):
    def fn(b):
        x = torch.from_numpy(b).to(device).permute(0, 3, 1, 2).float()
        feats, spatial, logits = net(x.contiguous(memory_format=torch.channels_last))
        return {"feats": feats.cpu().numpy(), "spatial": spatial.cpu().numpy(), "logits": logits.cpu().numpy()}
    return fn


def classifier_fn(net, device):
    def fn(b):
        feats, logits = net(torch.from_numpy(b).to(device).permute(0, 3, 1, 2))
        return {"feats": feats.float().cpu().numpy(), "pred": logits.argmax(1).cpu().numpy()}
    return fn


# ----------------------------------------------------------------------------- outputs

def _stem(path):
    path = os.path.normpath(path)
    return path[:-4] if path.endswith(".npz") else path


def _same(a, b):  # one file, also through a symbolic or hard link
    return os.path.realpath(a) == os.path.realpath(b) or os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_new_file(path, flag, fix, inputs, outputs=()):
    """Refuse, before any work, a path that would replace an input or an earlier output, or whose folder does not
    take new files."""
    for other in [*inputs, *outputs]:
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


def inputs_of(args):
    return [p for p in (args.samples, args.ref, args.classifier_data) if p]


def plan_outputs(args, sides):
    """[(path, "metrics" or the side whose statistics go there)], each checked by check_new_file."""
    plan = [(args.out or _stem(args.samples) + "_fid.json", "metrics")] + \
        [(_stem(getattr(args, n)) + "_stats.npz", n) for n, s in sides.items() if args.save_stats and has_images(s)]
    for i, (path, what) in enumerate(plan):
        flag, fix = ("--out", "choose another --out") if what == "metrics" else ("--save-stats", "drop --save-stats")
        check_new_file(path, flag, fix, inputs_of(args), [p for p, _ in plan[:i]])
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


def stats_arrays(side, space):
    """Statistics and per-image features of a side, to be passed as SAMPLES or --ref next time, with the name of
    their feature space."""
    keep = {k: side[k] for k in STAT_KEYS if k in side}
    for s, key in (("", "feats"), ("_s", "spatial")):
        if f"mu{s}" not in keep and key in side:
            keep[f"mu{s}"], keep[f"sigma{s}"] = feature_stats(side[key])
    return {**keep, "features": np.array(space)}


# ----------------------------------------------------------------------------- command line

class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # a None default is spelled out in the help text itself
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.error = lambda msg: die(f"{msg}; see python fid.py --help")  # one line, not usage + message
    p.add_argument("samples", help="samples: .npz (arr_0 uint8 NHWC, optionally labels), folder of images, encode.py "
                   "dataset directory, or statistics .npz")
    p.add_argument("--ref", required=True, help="reference: ADM reference batch .npz, folder (class folder: labelled), "
                   "encode.py dataset directory, or statistics .npz")
    p.add_argument("--out", help="JSON file with the metrics (default: SAMPLES_fid.json)")
    p.add_argument("--features", choices=FEATURES, default="inception",
                   help="feature space: inception (ADM's FID, sFID, IS, precision, recall), classifier (fd, precision, "
                        "recall, class accuracy on a small CNN trained here on labelled real images; offline) or "
                        "dinov2 (fd, precision, recall on DINOv2's CLS token)")
    p.add_argument("--image-size", type=int, help="the resolution image folders and dataset directories are read at "
                   "(the ADM center crop), and for the classifier every side (default: the side of SAMPLES' images)")
    p.add_argument("--inception-weights", default=FID_WEIGHTS_URL, help="path or URL of pytorch-fid's FID Inception")
    p.add_argument("--classifier", help="--features classifier: its file; reused when it exists (it fixes the feature "
                   "space), else trained and saved there (default: ${XDG_CACHE_HOME:-~/.cache}/d2c/classifiers/"
                   "HASH.pt, HASH of the training data, resolution, channels, epochs and seed)")
    p.add_argument("--classifier-data", help="--features classifier: labelled real images to train on: an image folder "
                   "of one subfolder per class (as encode.py reads it) or an encode.py dataset directory (default: "
                   "--ref when it is one of these)")
    p.add_argument("--classifier-epochs", type=int, help=f"--features classifier: passes over its training images "
                   f"(default: {CLASSIFIER_EPOCHS}, or on a small set as many as make {CLASSIFIER_MIN_STEPS} steps of "
                   f"{CLASSIFIER_BATCH} images, at most {CLASSIFIER_MAX_EPOCHS})")
    p.add_argument("--classifier-seed", type=int, help="--features classifier: seed of its initialisation and batch "
                   "order (default: 0)")
    p.add_argument("--dinov2", help="--features dinov2: a local DINOv2 .pth (the official dinov2_vit*14_pretrain.pth "
                   "or a timm state dict; the size is read off the shapes) or a name to download (dinov2_vits14 .. "
                   f"dinov2_vitg14, or a timm name) (default: {DINOV2_DEFAULT})")
    p.add_argument("--batch-size", type=int, default=200, help="images a forward pass of the network")
    p.add_argument("--is-splits", type=int, default=10, help="IS splits (ADM: 5000 images a split, 10 at 50K)")
    p.add_argument("--save-stats", action="store_true", help="also write SIDE_stats.npz (mu, sigma, mu_s, sigma_s, "
                   "feats, logits, features) beside each side given as images, to pass as SAMPLES or --ref next time")
    p.add_argument("--tf32", action="store_true", help="TF32 convolutions on Ampere+ GPUs: faster, features ~1e-3 off")
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--is-splits", args.is_splits),
                        ("--image-size", args.image_size), ("--classifier-epochs", args.classifier_epochs)):
        if value is not None and value < 1:
            die(f"{flag} {value}: must be at least 1")
    only = {"classifier": ("--classifier", "--classifier-data", "--classifier-epochs", "--classifier-seed"),
            "dinov2": ("--dinov2",)}
    for features, flags in only.items():
        for flag in flags:
            if getattr(args, flag[2:].replace("-", "_")) is not None and args.features != features:
                die(f"{flag} applies to --features {features} only; add --features {features} or drop {flag}")
    args.classifier_seed = args.classifier_seed or 0
    args.dinov2 = args.dinov2 or DINOV2_DEFAULT
    return args


def _check_dims(args, sides):
    # Features of two extractors do not compare; checked from the headers, before the Inception pass.
    a, b = ({**({"mu": 2048, "mu_s": 7 * 17 * 17, "feats": 2048} if has_images(side) else {}),
             **{k: side["stored"][k].shape[-1] for k in ("mu", "mu_s", "feats") if k in side["stored"]}}
            for side in sides.values())
    for key in sorted(a.keys() & b.keys()):
        if a[key] != b[key]:
            die(f"{key} has {a[key]} dimensions for {args.samples} but {b[key]} for {args.ref}; "
                "both sides must come from the same feature extractor")


def _check_spaces(args, sides, space=None):
    """Statistics files name their feature space (those without the name are Inception's): both sides must be of
    this run's, `space` once it is known."""
    stats = {n: s for n, s in sides.items() if s["kind"] == "stats"}
    for side in stats.values():
        kind = side["space"].split(":")[0]
        if kind != args.features or space is not None and side["space"] != space:
            want = f"the {space} of this run" if kind == args.features else f"--features {args.features}"
            fix = f"pass --features {kind}" if kind != args.features else \
                "pass the --classifier or --dinov2 they were made with"
            die(f"{side['flag']} {side['path']} holds statistics of {side['space']} features, not of {want}: {fix}, "
                "or give images")
    found = {s["space"] for s in stats.values()}
    if len(found) > 1:
        die(f"SAMPLES {args.samples} and --ref {args.ref} hold statistics of different feature spaces "
            f"({' and '.join(sorted(found))}); both sides must come from the same feature extractor")
    return found.pop() if found else None


def read_size(side, size):
    """The resolution a side is read at: size, or its images' own when SAMPLES gives none."""
    own = size or _square_size(side)
    if own is None:
        die(f"{side['flag']} {side['path']} holds images of several sizes (or not square) and SAMPLES gives no "
            "resolution to read them at: pass --image-size")
    if _from_sources(side, own):
        _check_sources(side, own)
    return own


def class_accuracy(side, pred, ckpt):
    """(share of a side's images the classifier assigns to their labelled class, or None; why None)."""
    flag = side["flag"]
    if side.get("labels") is None:
        return None, f"{flag} has no class labels (sample.py's .npz holds labels, the class each sample was asked for)"
    names = ckpt.get("class_names")
    if side.get("class_names") is not None and names is not None and list(side["class_names"]) != list(names):
        return None, f"the classes of {flag} are not the classifier's ({', '.join(names[:3])}, ...)"
    return float((pred == side["labels"]).mean()), None


def main(argv=None):
    args = parse_args(argv)
    if args.features != "inception":
        _common(f"--features {args.features}")
    sides = {"samples": open_side(args.samples, "SAMPLES"), "ref": open_side(args.ref, "--ref")}
    stats_space = _check_spaces(args, sides)
    imaged = any(has_images(s) for s in sides.values())
    size = args.image_size or (_square_size(sides["samples"]) if has_images(sides["samples"]) else None)
    plan = plan_outputs(args, sides)
    clf, channels, sizes = None, 3, {}
    if args.features != "inception":
        for side in sides.values():  # an image .npz's statistics (an ADM reference batch's) are Inception's
            side["stored"] = {} if side["kind"] == "npz" else \
                {k: v for k, v in side["stored"].items() if k not in ("logits", "mu_s", "sigma_s")}
    if args.features == "inception":
        if imaged:  # statistics need no network
            _check_inception_path(args.inception_weights)
        _check_dims(args, sides)
        space = "inception"
    elif args.features == "dinov2":
        if imaged:
            check_dinov2(args.dinov2)
        space = f"dinov2:{os.path.basename(args.dinov2) if os.path.isfile(args.dinov2) else args.dinov2}"
    elif imaged:
        clf = plan_classifier(args, sides, size, lambda path, flag, fix: check_new_file(
            path, flag, fix, inputs_of(args), [p for p, _ in plan]))
        size, channels, space = clf["image_size"], clf["channels"], f"classifier:{clf['key']}"
    else:
        space = stats_space
    _check_spaces(args, sides, space)
    for name, side in sides.items():
        if has_images(side):  # Inception and DINOv2 resize an .npz's images themselves: they go as they are
            sizes[name] = None if side["kind"] == "npz" and clf is None else read_size(side, size)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    fn, ckpt, speed, data = None, None, {}, {}
    if imaged and args.features == "inception":
        fn = inception_fn(load_inception(args.inception_weights, device), device)
    elif imaged and args.features == "dinov2":
        fn = dinov2_fn(args.dinov2, device)
    elif imaged:
        net, ckpt = classifier_net(clf, device)
        fn = classifier_fn(net, device)
    for name, side in sides.items():
        data[name] = dict(side["stored"])
        if has_images(side):
            out, speed[name] = extract(fn, side_images(side, sizes[name], channels), args.batch_size,
                                       f"{args.features} {name}")
            data[name].update(out)
            shape = f"{side['hw'][1]}x{side['hw'][0]}" if sizes[name] is None else f"{sizes[name]}x{sizes[name]}"
            log(f"{name}: {side['n']} images of {shape}, {speed[name]:.1f} images/s on {device} "
                f"(batch {args.batch_size})")

    # float16 distances only to reproduce ADM's Inception numbers: they round away the small distances of other spaces
    values, why = compute_metrics(data["samples"], data["ref"], is_splits=args.is_splits,
                                  fp16=args.features == "inception")
    metrics = METRICS
    if args.features != "inception":
        values["fd"], why["fd"] = values.pop("fid"), why.pop("fid", None)
        for m in ("sfid", "is"):
            values[m], why[m] = None, "Inception only (--features inception)"
        metrics = ("fd", "sfid", "is", "precision", "recall")
    if ckpt is not None:
        for key, name in (("class_accuracy", "samples"), ("ref_class_accuracy", "ref")):
            side = sides[name]
            values[key], why[key] = class_accuracy(side, data[name]["pred"], ckpt) if has_images(side) else \
                (None, f"{side['flag']} holds statistics, no images to classify")
        metrics += ("class_accuracy", "ref_class_accuracy")
    num = {n: (len(s["feats"]) if "feats" in s else None) for n, s in data.items()}
    if args.features == "inception" and num["samples"] is not None and num["samples"] < 50000:
        log(f"note: {num['samples']} samples; ADM's and the paper's numbers use 50,000 (FID, sFID are biased up at small N)")
    names = {**NAMES, "fd": f"FD ({SPACE_NAMES.get(args.features)})"}
    width = max(len(names[m]) for m in metrics)
    log("metrics:\n" + "\n".join(f"{names[m]:<{width}}  " + (f"{values[m]:.4f}" if values[m] is not None
                                                            else f"n/a ({why[m]})") for m in metrics))
    report = {**{m: values[m] for m in metrics}, "unavailable": {m: why[m] for m in metrics if values[m] is None},
              "features": space, "samples": args.samples, "ref": args.ref, "num_samples": num["samples"],
              "num_ref": num["ref"], "images_per_second": speed}
    if args.features == "inception":
        report["inception_weights"] = args.inception_weights
    elif args.features == "dinov2":
        report["dinov2"] = args.dinov2
    if ckpt is not None:
        report["classifier"] = {"file": os.path.abspath(clf["path"]), "image_size": size, "channels": channels,
                                **{k: ckpt.get(k) for k in ("key", "trained_on", "num_classes", "class_names", "epochs",
                                                            "seed", "heldout_accuracy", "num_train", "num_heldout",
                                                            "train_seconds")}}
    write_outputs({path: (lambda f: f.write(json.dumps(report, indent=2).encode())) if what == "metrics" else
                   (lambda f, side=data[what]: np.savez(f, **stats_arrays(side, space))) for path, what in plan})
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
