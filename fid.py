"""
FID, sFID, Inception Score, precision and recall as the ADM evaluator computes them
(openai/guided-diffusion evaluations/evaluator.py), in PyTorch.

Reads two sides, SAMPLES and --ref, each one of
  - an .npz with arr_0: uint8 images (N, H, W, 3), as sample.py and the ADM reference batches write it;
    an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) also holds mu/sigma/mu_s/sigma_s, which
    are used for FID/sFID as ADM does, while its arr_0 images give the features for precision/recall;
  - a folder of images (png/jpg/..., searched recursively, all of one resolution);
  - a statistics .npz (mu, sigma, mu_s, sigma_s; optionally feats and logits), e.g. from --save-stats.
Prints FID, sFID, IS (of SAMPLES), precision and recall and writes them to a JSON file (--out, default
SAMPLES_fid.json beside SAMPLES). Metrics the inputs cannot give (precision and recall against a statistics-only
reference, IS of statistics without logits) are reported as not available.

Inception: the TF "2015-12-05" FID network in the pytorch-fid file format (pt_inception-2015-12-05-6726825d.pth),
written out here. Preprocessing as the TF graph ADM feeds: TF1 resize_bilinear to 299 (align_corners=False,
no half-pixel centres), then (x - 128) / 128 (pytorch-fid uses F.interpolate and (x - 127.5) / 127.5 instead).
Features: pool_3 (2048) for FID, precision, recall; mixed_6/conv (Mixed_6d.branch1x1) first 7 channels at
17x17 in NHWC order (2023) for sFID; pool_3 @ fc.weight.T (1008 logits, no bias) for IS.

    python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz
"""
import argparse
import os
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from scipy.special import softmax, xlogy
from tqdm import tqdm

from common import atomic_save, create_logger, die

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
METRICS = ("fid", "sfid", "is", "precision", "recall")
NAMES = {"fid": "FID", "sfid": "sFID", "is": "Inception Score", "precision": "Precision", "recall": "Recall"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- metrics on feature arrays

def feature_stats(feats):
    """Mean and unbiased covariance (np.cov, as ADM) of (N, D) features, in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed as ADM's FIDStatistics.frechet_distance: scipy's
    sqrtm, an eps diagonal offset when the product is singular, and a tolerance for tiny imaginary parts.
    """
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
    """
    IS of (N, C) class probabilities (rows are softmax outputs, not logits): exp of the mean KL divergence
    between p(y|x) and the split's marginal p(y), averaged over `splits` contiguous splits. ADM uses splits
    of 5000 images, which is 10 splits at 50K samples.
    """
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
    """
    Pairwise squared Euclidean distances |u_i - v_j|^2 as ADM's DistanceBlock: in float16 (each op rounded
    as TF rounds it, products accumulated in float32) unless that overflows, then in float32.
    """
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
    Improved precision and recall (Kynkaanniemi et al.) as ADM's ManifoldEstimator: a point is in the manifold
    of a set if its squared distance to some point of the set is <= that point's squared distance to its k-th
    nearest neighbour in the set. precision = fraction of samples in the reference manifold, recall = fraction
    of reference points in the sample manifold. fp16=True reproduces ADM's float16 distances; block is the
    row/column batch (ADM: 10000), a memory trade-off that only matters for where fp16 overflow falls back.
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
    if f"mu{suffix}" in side:  # stored statistics win, as in ADM (a reference batch's statistics cover the whole dataset)
        return side[f"mu{suffix}"], side[f"sigma{suffix}"]
    return feature_stats(side[key]) if key in side else None


def compute_metrics(samples, ref, k=3, is_splits=10):
    """
    samples, ref: dicts holding any of
      feats (N, D): FID, precision, recall;   spatial (N, D'): sFID;   logits (N, C): IS (samples only);
      mu/sigma, mu_s/sigma_s: stored statistics, used instead of feats/spatial for FID/sFID.
    Any feature extractor's arrays work. Returns ({metric: float or None}, {metric: why it is None}).
    """
    values, why = {}, {}
    for name, key, suffix in (("fid", "feats", ""), ("sfid", "spatial", "_s")):
        a, b = _stats(samples, key, suffix), _stats(ref, key, suffix)
        if a is None or b is None:
            why[name] = f"needs {key} features or mu{suffix}/sigma{suffix} statistics on both sides"
            continue
        try:
            values[name] = frechet_distance(*a, *b)
        except ValueError as e:
            why[name] = str(e)
    if "logits" in samples:
        try:
            values["is"] = inception_score(softmax(np.asarray(samples["logits"], np.float64), axis=1), is_splits)
        except ValueError as e:
            why["is"] = str(e)
    else:
        why["is"] = "needs the samples' class logits (images, or a statistics file with logits)"
    if "feats" in samples and "feats" in ref:
        try:
            values["precision"], values["recall"] = precision_recall(ref["feats"], samples["feats"], k)
        except ValueError as e:
            why["precision"] = why["recall"] = str(e)
    else:
        why["precision"] = why["recall"] = "needs per-image features on both sides (images, or feats in a statistics file)"
    return {m: values.get(m) for m in METRICS}, why


# ----------------------------------------------------------------------------- the FID Inception network

def resize_tf1(x, size=299):
    """
    Bilinear resize of float (N, C, H, W) to size x size as TF1's resize_bilinear (align_corners=False,
    half_pixel_centers=False), in its float32 arithmetic: src = dst * (in / out), lower = floor(src),
    upper = min(ceil(src), in - 1), lerp = src - floor(src); rows interpolated first, then columns.
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


class Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3) and ReLU; keys conv.*, bn.* as in the weights file."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # TF's SAME average pool divides by the number of unpadded pixels
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class BlockA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class BlockB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, (1, 7), padding=(0, 3)), Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = Conv(c7, c7, (7, 1), padding=(3, 0)), Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4, self.branch7x7dbl_5 = Conv(c7, c7, (7, 1), padding=(3, 0)), Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                          self.branch_pool(avg_pool(x))], 1)


class BlockD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1), padding=(3, 0)), Conv(192, 192, 3, stride=2)

    def forward(self, x):
        d = x
        for i in range(1, 5):
            d = getattr(self, f"branch7x7x3_{i}")(d)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d, F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):  # Mixed_7b/7c, 8x8
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's Mixed_7c pools with max, not average
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """The FID Inception (TF inception-2015-12-05) with pytorch-fid's state-dict keys."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, padding=1), Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = BlockD(768), BlockE(1280, False), BlockE(2048, True)
        self.fc = nn.Linear(2048, 1008)

    def features(self, x):
        """(N, 3, 299, 299) resized and normalised -> pool_3 (N, 2048), spatial (N, 2023), logits (N, 1008)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(F.max_pool2d(x, 3, 2)))))))
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]  # mixed_6/conv; Mixed_6d recomputes it, a cheap 1x1 conv
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = x.mean((2, 3))
        # NHWC flattening as the TF graph, so that statistics agree with a reference batch's mu_s/sigma_s
        return pool, spatial.permute(0, 2, 3, 1).flatten(1), pool @ self.fc.weight.T

    def forward(self, images):
        """Float (N, 3, H, W) in [0, 255] -> features() of the image resized to 299 and scaled to [-1, 1)."""
        return self.features((resize_tf1(images, 299) - 128) / 128)


def load_inception(weights, device):
    """The network with weights from a path or URL in the pytorch-fid format, loaded strictly."""
    try:
        if weights.startswith(("http://", "https://")):
            state = torch.hub.load_state_dict_from_url(weights, map_location="cpu", progress=True)
        elif not os.path.isfile(weights):
            die(f"--inception-weights {weights} does not exist: give pt_inception-2015-12-05-6726825d.pth or its URL")
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (network, pickle and format errors all mean the same to a user)
        die(f"--inception-weights {weights}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"download {FID_WEIGHTS_URL} and pass its local path")
    net = InceptionV3()
    if not isinstance(state, dict):
        die(f"--inception-weights {weights} holds a {type(state).__name__}, not a state dict of the FID Inception")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = sorted(k for k in set(net.state_dict()) - set(state) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(state) - set(net.state_dict()))
        detail = f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})" \
            if missing or unexpected else str(e).splitlines()[1].strip()
        die(f"--inception-weights {weights} is not the FID Inception layout of pt_inception-2015-12-05-6726825d.pth: {detail}")
    return net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- reading the two sides

def _npz_images(path, member):
    """arr_0's header and a reader of its rows that never holds the whole array (50K images are ~10 GB)."""
    zf = zipfile.ZipFile(path)
    f = zf.open(member)
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        die(f"{path}: arr_0 is in .npy format {version}; re-save it with np.savez")
    shape, fortran, dtype = read_header(f)
    if fortran or dtype.hasobject:
        die(f"{path}: arr_0 is {'Fortran-ordered' if fortran else 'an object array'}; re-save it as a C-ordered uint8 array")

    def batches(bs):
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for i in range(0, shape[0], bs):
            m = min(bs, shape[0] - i)
            buf = f.read(m * row)
            if len(buf) != m * row:
                die(f"{path}: arr_0 is truncated after {i} images; write the file again")
            yield np.frombuffer(bytearray(buf), dtype=dtype).reshape(m, *shape[1:])  # writable for torch
        zf.close()
    return shape, dtype, batches


def _read_image(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        die(f"{path}: cannot read the image ({type(e).__name__}: {e})")


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
    return (len(files), *first.shape), np.dtype(np.uint8), batches


def open_side(path, flag):
    """
    Check one side and return (dict of what it stores, images) where images is None or
    (shape, batches(bs) -> iterator of uint8 (B, H, W, 3) arrays). Exits with a clear error on bad input.
    """
    if not os.path.exists(path):
        die(f"{flag} {path} does not exist: give an .npz (arr_0 images or mu/sigma statistics) or a folder of images")
    if os.path.isdir(path):
        shape, dtype, batches = _folder_images(path)
        return {}, (shape, batches)
    try:
        npz = np.load(path)
    except Exception as e:  # noqa: BLE001
        die(f"{flag} {path} is not a readable .npz ({type(e).__name__}); give an .npz or a folder of images")
    if not isinstance(npz, np.lib.npyio.NpzFile):
        die(f"{flag} {path} is a single .npy array; save images as np.savez(path, arr_0=uint8 (N, H, W, 3) array)")
    keys = set(npz.files)
    stored = {k: npz[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "feats", "logits") if k in keys}
    for s in ("", "_s"):
        if (f"mu{s}" in stored) != (f"sigma{s}" in stored):
            die(f"{path} has only one of mu{s} and sigma{s}; both are needed")
        if f"mu{s}" in stored and stored[f"sigma{s}"].shape != stored[f"mu{s}"].shape * 2:
            die(f"{path}: sigma{s} {stored[f'sigma{s}'].shape} does not match mu{s} {stored[f'mu{s}'].shape}")
    if "feats" in stored and (stored["feats"].ndim != 2 or len(stored["feats"]) < 2):
        die(f"{path}: feats has shape {stored['feats'].shape}; expected (N, D) with N >= 2")
    if "arr_0" not in keys or "feats" in stored:
        if not stored:
            die(f"{path} has neither arr_0 images nor mu/sigma statistics (keys: {', '.join(sorted(keys)[:6])}"
                f"{', ...' if len(keys) > 6 else ''})")
        return stored, None
    shape, dtype, batches = _npz_images(path, "arr_0.npy")
    if len(shape) != 4 or shape[3] != 3:
        die(f"{path}: arr_0 has shape {shape}; expected (N, H, W, 3) RGB images as sample.py writes them")
    if shape[0] < 2:
        die(f"{path}: arr_0 holds {shape[0]} image; at least 2 are needed")
    if dtype != np.uint8:
        die(f"{path}: arr_0 is {dtype}; expected uint8 in [0, 255] "
            "(from [-1, 1] floats: ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))")
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
    i, t0 = 0, time.time()
    with tqdm(total=n, desc=desc, unit="img") as bar:
        for b in _prefetch(batches(batch_size)):
            x = torch.from_numpy(b).to(device).permute(0, 3, 1, 2).float()
            for o, f in zip(out, net(x.contiguous(memory_format=torch.channels_last))):
                o[i:i + len(b)] = f.cpu().numpy()
            i += len(b)
            bar.update(len(b))
    return (*out, n / (time.time() - t0))


def save_stats(side, path):
    """Statistics and per-image features of a side, to be passed as SAMPLES or --ref next time."""
    keep = {k: side[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "feats", "logits") if k in side}
    for s, key in (("", "feats"), ("_s", "spatial")):
        if f"mu{s}" not in keep and key in side:
            keep[f"mu{s}"], keep[f"sigma{s}"] = feature_stats(side[key])
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **keep)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _stem(path):
    path = os.path.normpath(path)
    return path[:-4] if path.endswith(".npz") else path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", help="samples: .npz (arr_0 uint8 NHWC), folder of images, or statistics .npz")
    parser.add_argument("--ref", required=True, help="reference: ADM reference batch .npz, folder, or statistics .npz")
    parser.add_argument("--out", default=None, help="JSON file with the metrics (default: SAMPLES_fid.json)")
    parser.add_argument("--inception-weights", default=FID_WEIGHTS_URL,
                        help="path or URL of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--is-splits", type=int, default=10, help="IS splits (ADM: 5000 images a split, 10 at 50K)")
    parser.add_argument("--save-stats", action="store_true",
                        help="write SIDE_stats.npz (mu, sigma, mu_s, sigma_s, feats, logits) beside each side computed "
                             "from images; pass it as SAMPLES or --ref next time")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 convolutions on Ampere+ GPUs: faster, features change by ~1e-3 (default: exact fp32)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        die(f"--batch-size {args.batch_size}: must be at least 1")
    out = args.out or _stem(args.samples) + "_fid.json"
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        die(f"--out {out}: its directory does not exist")

    sides = {"samples": open_side(args.samples, "SAMPLES"), "ref": open_side(args.ref, "--ref")}
    logger = create_logger(os.path.dirname(os.path.abspath(out)), 0, "fid")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    net, speed = None, {}
    data = {}
    for name, (stored, images) in sides.items():
        side = dict(stored)
        if images is not None:
            if net is None:
                net = load_inception(args.inception_weights, device)
            side["feats"], side["spatial"], side["logits"], speed[name] = \
                inception_features(net, images, args.batch_size, device, f"inception {name}")
            logger.info(f"{name}: {images[0][0]} images of {images[0][2]}x{images[0][1]}, "
                        f"{speed[name]:.1f} images/s on {device} (batch {args.batch_size})")
            if args.save_stats:
                path = _stem(getattr(args, name)) + "_stats.npz"
                save_stats(side, path)
                logger.info(f"saved {name} statistics and features to {path}")
        data[name] = side
    for keys in (("mu", "feats"), ("mu_s", "spatial"), ("feats",)):  # features of two extractors do not compare
        dims = {n: next((s[k].shape[-1] for k in keys if k in s), None) for n, s in data.items()}
        if None not in dims.values() and dims["samples"] != dims["ref"]:
            die(f"{keys[0]} has {dims['samples']} dimensions for {args.samples} but {dims['ref']} for {args.ref}; "
                "both sides must come from the same feature extractor")

    values, why = compute_metrics(data["samples"], data["ref"], is_splits=args.is_splits)
    num = {n: (len(s["feats"]) if "feats" in s else None) for n, s in data.items()}
    if num["samples"] is not None and num["samples"] < 50000:
        logger.info(f"note: {num['samples']} samples; the ADM/paper numbers use 50,000 "
                    "(FID and sFID are biased upwards at small N)")
    width = max(map(len, NAMES.values()))
    lines = [f"{NAMES[m]:<{width}}  " + (f"{values[m]:.4f}" if values[m] is not None else f"n/a ({why[m]})")
             for m in METRICS]
    logger.info("metrics:\n" + "\n".join(lines))
    atomic_save({**values, "unavailable": {m: why[m] for m in METRICS if values[m] is None},
                 "samples": args.samples, "ref": args.ref, "num_samples": num["samples"], "num_ref": num["ref"],
                 "inception_weights": args.inception_weights, "images_per_second": speed}, out, "json")
    logger.info(f"wrote {out}")


if __name__ == "__main__":
    main()
