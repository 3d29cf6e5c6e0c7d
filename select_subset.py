"""
Select a class-balanced subset of a dataset directory: D2C interval sampling over difficulty
scores, or one of the baselines the paper compares against.

Reads DATA/labels.npy, DATA/scores.npy (float32, higher = harder, from score.py; the random,
kcenter and herding methods run without it) and DATA/latents.npy (the default feature space for
kcenter and herding). Writes OUT.npy (int64 row indices into DATA, sorted ascending), OUT.json
(per-class counts, the interval actually used where it had to shrink, score quantiles of the
selection and of the whole set, the arguments) and with --plot a PNG of the score distributions.

    python select_subset.py --data-path data/in256 --method interval --ipc 10 --k 96 --out data/in256_10k.npy

Methods, each applied per class with the same number of images per class (ipc):
  interval  sort the class ascending by score (stable sort, so ties keep row order) and take the
            sorted positions 0, k, 2k, ..., (ipc-1)k: easy-to-medium images, spread out, never the
            hardest tail. If the class is too small for k, it uses the largest k' <= k with
            (ipc-1)k' < n, which still gives ipc images (the paper does not say what it does;
            OUT.json lists every class where k' != k).
  random    ipc images uniformly without replacement; class c draws from the generator seeded
            by (--global-seed, c) alone, so nothing else (scores, other classes) changes it.
  min       the ipc easiest: sorted positions 0 .. ipc-1.
  max       the ipc hardest: the last ipc sorted positions.
  medium    grow outward from the median: with m = n // 2, sorted positions m, m+1, m-1, m+2,
            m-2, ... (positions outside 0..n-1 skipped) until ipc are taken.
  kcenter   greedy farthest point in Euclidean distance: the first centre is the point closest to
            the class mean, then repeatedly the point whose distance to its nearest chosen
            centre is largest.
  herding   greedy mean matching: at step i (from 0) the unselected point closest to
            (i+1) * mean - (sum of the points selected so far).
Ties go to the lowest row index. kcenter and herding use --features (N, D) or, by default, the
flattened unflipped latents; they keep only O(n) distances per class and read a class's
features as float32 (distances computed in float64 chunks).

A class with fewer than ipc images is an error unless --allow-short, which takes all of it.
--budget replaces --ipc: a fraction 0 < b < 1 of the N images, or a count >= 1 of images;
ipc = floor(images) // num_classes.
"""
import argparse
import os

import numpy as np
from tqdm import tqdm

from common import atomic_save, die, load_dataset, unflipped

METHODS = ("interval", "random", "min", "max", "medium", "kcenter", "herding")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
CHUNK_BYTES = 1 << 20  # float64 working memory per distance chunk: cache-sized chunks run ~8x faster than 32 MB


# ----------------------------------------------------------------------------- score-based picks

def interval_step(n, ipc, k):
    """The largest k' <= k with (ipc - 1) * k' < n: the interval that still gives ipc images."""
    return k if ipc <= 1 else min(k, (n - 1) // (ipc - 1))


def medium_positions(n, ipc):
    """Sorted positions m, m+1, m-1, m+2, m-2, ... with m = n // 2, the first ipc of them."""
    p = np.arange(n)
    return np.argsort(2 * np.abs(p - n // 2) - (p > n // 2), kind="stable")[:ipc]


# ----------------------------------------------------------------------------- feature-based picks

def _chunk(dim):
    return max(1, CHUNK_BYTES // (8 * dim))


def _sqnorms(x):
    out = np.empty(len(x))
    step = _chunk(x.shape[1])
    for lo in range(0, len(x), step):
        c = x[lo:lo + step].astype(np.float64)
        out[lo:lo + step] = np.einsum("ij,ij->i", c, c)
    return out


def _mean(x):
    step = _chunk(x.shape[1])
    return sum(x[lo:lo + step].astype(np.float64).sum(0) for lo in range(0, len(x), step)) / len(x)


def _sqdist(x, sqnorms, y):
    """Squared Euclidean distance of every row of x (float32) to y, in float64 chunks."""
    y = np.asarray(y, np.float64)
    dots = np.empty(len(x))
    step = _chunk(x.shape[1])
    for lo in range(0, len(x), step):
        dots[lo:lo + step] = x[lo:lo + step].astype(np.float64) @ y
    return np.maximum(sqnorms - 2 * dots + y @ y, 0)


def kcenter(x, m):
    """Greedy farthest-point selection of m rows of x, starting from the row closest to the mean."""
    sq = _sqnorms(x)
    first = int(np.argmin(_sqdist(x, sq, _mean(x))))
    chosen = [first]
    mind = _sqdist(x, sq, x[first])  # distance of each row to its nearest chosen centre
    mind[first] = -np.inf
    while len(chosen) < m:
        c = int(np.argmax(mind))
        chosen.append(c)
        mind = np.minimum(mind, _sqdist(x, sq, x[c]))
        mind[c] = -np.inf
    return np.array(chosen, dtype=np.int64)


def herding(x, m):
    """Greedy mean matching: step i takes the unselected row closest to (i+1)*mean - sum(selected)."""
    sq, mean = _sqnorms(x), _mean(x)
    total = np.zeros(x.shape[1])
    taken = np.zeros(len(x), dtype=bool)
    chosen = []
    for i in range(m):
        d = _sqdist(x, sq, (i + 1) * mean - total)
        d[taken] = np.inf
        c = int(np.argmin(d))
        chosen.append(c)
        taken[c] = True
        total += x[c]
    return np.array(chosen, dtype=np.int64)


def class_features(features, idx):
    """Rows idx of an (N, ...) array or memmap as a float32 (n, D) array, read in chunks."""
    dim = int(np.prod(features.shape[1:]))
    out = np.empty((len(idx), dim), dtype=np.float32)
    step = _chunk(dim)
    for lo in range(0, len(idx), step):
        out[lo:lo + step] = np.asarray(features[idx[lo:lo + step]]).reshape(-1, dim)
    return out


# ----------------------------------------------------------------------------- selection

def select(labels, num_classes, method, ipc, scores=None, k=None, features=None, seed=0, allow_short=False):
    """
    Row indices (int64, sorted) of the per-class selection, and a dict with "k_used"
    {class: k'} where the interval had to shrink and "short_classes" {class: n} taken whole.
    """
    counts = np.bincount(labels, minlength=num_classes)
    short = {c: int(n) for c, n in enumerate(counts) if n < ipc}
    if short and not allow_short:
        c = min(short, key=short.get)
        die(f"--ipc {ipc}: {len(short)} classes have fewer images (class {c} has {short[c]}); "
            "lower --ipc or pass --allow-short to take all images of those classes")
    order = np.argsort(labels, kind="stable")  # rows grouped by class, ascending within a class
    starts = np.concatenate([[0], np.cumsum(counts)])
    chosen, k_used = [], {}
    slow = method in ("kcenter", "herding")
    for c in tqdm(range(num_classes), desc=method, disable=not slow, leave=False):
        idx = order[starts[c]:starts[c + 1]]
        n = len(idx)
        if n < ipc:
            chosen.append(idx)
            continue
        if method == "random":
            pos = np.random.default_rng([seed, c]).choice(n, size=ipc, replace=False)
        elif method in ("kcenter", "herding"):
            pos = (kcenter if method == "kcenter" else herding)(class_features(features, idx), ipc)
        else:
            by_score = np.argsort(scores[idx], kind="stable")
            if method == "interval":
                step = interval_step(n, ipc, k)
                if step != k:
                    k_used[c] = step
                pos = by_score[np.arange(ipc) * step]
            elif method == "min":
                pos = by_score[:ipc]
            elif method == "max":
                pos = by_score[n - ipc:]
            else:
                pos = by_score[medium_positions(n, ipc)]
        chosen.append(idx[pos])
    out = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    return out, {"k_used": k_used, "short_classes": short}


def ipc_from_budget(budget, n, num_classes):
    """Images per class for --budget: a fraction (0 < b < 1) of n images or a count (>= 1)."""
    if budget <= 0:
        die(f"--budget {budget}: give a fraction 0 < b < 1 of the images or a count >= 1")
    if budget < 1:
        images = int(np.floor(budget * n + 1e-6))
    elif budget != int(budget):
        die(f"--budget {budget}: a budget >= 1 is a number of images and must be a whole number")
    else:
        images = int(budget)
    if images // num_classes < 1:
        die(f"--budget {budget} gives {images} images for {num_classes} classes, less than one per class; raise it")
    return images // num_classes, images


# ----------------------------------------------------------------------------- plot

def plot(path, scores, labels, chosen, num_classes, class_names):
    """Score histograms per class (up to 10 classes) or pooled, with the selection marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(range(num_classes)) if num_classes <= 10 else [None]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 1.6 * len(groups) + 0.8), squeeze=False)
    sel_scores, sel_labels = scores[chosen], labels[chosen]
    for ax, c in zip(axes[:, 0], groups):
        if c is None:
            ax.hist(scores, bins=100, density=True, color="0.7", label=f"all ({len(scores)})")
            ax.hist(sel_scores, bins=100, density=True, histtype="step", color="C3", label=f"selected ({len(chosen)})")
            ax.set_title(f"all {num_classes} classes pooled", fontsize=9)
        else:
            ax.hist(scores[labels == c], bins=30, color="0.7", label="all")
            s = sel_scores[sel_labels == c]
            ax.plot(s, np.zeros_like(s), "|", color="C3", ms=14, mew=1.5, label="selected")
            name = class_names[c] if c < len(class_names) else str(c)
            ax.set_title(f"class {c}: {name}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("difficulty score (higher = harder)")
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------- main

def load_scores(data_path, n):
    path = os.path.join(data_path, "scores.npy")
    if not os.path.exists(path):
        die(f"{data_path} has no scores.npy: run score.py --data-path {data_path} first")
    scores = np.load(path)
    if scores.shape != (n,):
        die(f"{path} has shape {scores.shape} but labels.npy has {n} rows; re-run score.py on this directory")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        die(f"{path} has {len(bad)} NaN/inf scores (first at row {bad[0]}); re-run score.py for those rows")
    return scores.astype(np.float32)


def load_features(path, n):
    if not os.path.exists(path):
        die(f"--features {path} does not exist: give an (N, D) .npy file with one row per image")
    try:
        feats = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        die(f"--features {path} is not a readable .npy array ({e}); give an (N, D) .npy file")
    if feats.ndim != 2 or feats.shape[0] != n:
        die(f"--features {path} has shape {feats.shape}; expected (N, D) with N = {n} (the rows of labels.npy)")
    return feats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=str, required=True)
    parser.add_argument("--method", type=str, default="interval", help="|".join(METHODS))
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--ipc", type=int, help="images per class")
    size.add_argument("--budget", type=float, help="fraction (0<b<1) or count (>=1) of images")
    parser.add_argument("--k", type=int, default=None, help="interval between sorted positions (interval)")
    parser.add_argument("--features", type=str, default=None, help="(N, D) .npy for kcenter/herding")
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--allow-short", action="store_true", help="take all of a class smaller than ipc")
    parser.add_argument("--out", type=str, required=True, help="indices .npy (a .json summary goes beside it)")
    parser.add_argument("--plot", type=str, default=None, help="PNG of the score distributions")
    args = parser.parse_args(argv)

    if args.method not in METHODS:
        die(f"--method {args.method} is unknown; choose one of {', '.join(METHODS)}")
    if not args.out.endswith(".npy"):
        die(f"--out {args.out} must end in .npy (the summary is written beside it as .json)")
    if args.global_seed < 0:
        die(f"--global-seed {args.global_seed} must be >= 0")
    if args.method == "interval" and (args.k is None or args.k < 1):
        die("--method interval needs --k >= 1 (the paper: --ipc 10 --k 96, --ipc 50 --k 16, --ipc 100 --k 10)")
    if args.features and args.method not in ("kcenter", "herding"):
        die(f"--features is used by kcenter and herding only, not --method {args.method}")

    latents, labels, meta = load_dataset(args.data_path)
    n = len(labels)
    num_classes = int(meta.get("num_classes", labels.max() + 1 if n else 0))
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        die(f"{args.data_path}/labels.npy has labels outside 0..{num_classes - 1} (meta.json num_classes); re-run encode.py")
    needs_scores = args.method in ("interval", "min", "max", "medium") or args.plot
    scores_path = os.path.join(args.data_path, "scores.npy")
    scores = load_scores(args.data_path, n) if needs_scores or os.path.exists(scores_path) else None

    if args.budget is not None:
        ipc, images = ipc_from_budget(args.budget, n, num_classes)
        budget = {"budget": args.budget, "images": images,
                  "rule": "ipc = images // num_classes (images = floor(b * N) for a fraction b)"}
    else:
        ipc, budget = args.ipc, None
        if ipc < 1:
            die(f"--ipc {ipc} must be >= 1")

    features = None
    if args.method in ("kcenter", "herding"):
        features = load_features(args.features, n) if args.features else unflipped(latents)

    chosen, info = select(labels, num_classes, args.method, ipc, scores=scores, k=args.k, features=features,
                          seed=args.global_seed, allow_short=args.allow_short)

    per_class = np.bincount(labels[chosen], minlength=num_classes)
    summary = {
        "method": args.method,
        "num_selected": int(len(chosen)),
        "num_images": n,
        "num_classes": num_classes,
        "ipc": ipc,
        "budget": budget,
        "k": args.k if args.method == "interval" else None,
        "k_used": {str(c): k for c, k in info["k_used"].items()},
        "k_policy": "a class too small for k uses the largest k' <= k with (ipc-1)*k' < n",
        "short_classes": {str(c): m for c, m in info["short_classes"].items()},
        "per_class_counts": per_class.tolist(),
        "features": (args.features or "latents.npy (unflipped, flattened)") if features is not None else None,
        "first_centre": "closest to the class mean" if args.method == "kcenter" else None,
        "score_quantiles": None if scores is None else {
            "q": list(QUANTILES),
            "selected": np.quantile(scores[chosen], QUANTILES).tolist() if len(chosen) else None,
            "all": np.quantile(scores, QUANTILES).tolist() if n else None,
        },
        "args": vars(args),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save(summary, args.out[:-len(".npy")] + ".json")
    atomic_save(chosen, args.out)  # last: its presence means the summary exists too

    line = f"{args.method}: {len(chosen)} of {n} images ({ipc} per class, {num_classes} classes"
    if info["k_used"]:
        line += f"; k lowered in {len(info['k_used'])} classes"
    if info["short_classes"]:
        line += f"; {len(info['short_classes'])} classes short"
    line += ")"
    if scores is not None and len(chosen):
        line += f", median score {np.median(scores[chosen]):.4g} (all {np.median(scores):.4g})"
    print(f"{line} -> {args.out}")

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"--plot {args.plot} skipped: matplotlib is not installed (pip install matplotlib); "
                  f"the indices were written to {args.out}")
            return
        plot(args.plot, scores, labels, chosen, num_classes, meta.get("class_names", []))


if __name__ == "__main__":
    main()
