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
            OUT.json lists every class where k' != k). --k auto picks k per class: the largest k
            with (ipc-1)k < span * n, spreading the picks over the easiest --span of the class
            (the paper's ImageNet settings span 0.61-0.77 of a 1,281-image class; OUT.json lists k).
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
import os

import numpy as np

from common import atomic_save, atomic_write, check_output, die, load_array, load_dataset, parser, progress, run, unflipped

METHODS = ("interval", "random", "min", "max", "medium", "kcenter", "herding")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
CHUNK_BYTES = 1 << 20  # float64 working memory per distance chunk: cache-sized chunks run ~8x faster than 32 MB


# ----------------------------------------------------------------------------- score-based picks

def interval_step(n, ipc, k):
    """The largest k' <= k with (ipc - 1) * k' < n: the interval that still gives ipc images."""
    return k if ipc <= 1 else min(k, (n - 1) // (ipc - 1))


def auto_step(n, ipc, span):
    """--k auto: the largest k with (ipc - 1) * k < span * n (at least 1), so the ipc picks spread
    over the easiest fraction `span` of the class."""
    return 1 if ipc <= 1 else max(1, (int(np.ceil(span * n)) - 1) // (ipc - 1))


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

def select(labels, num_classes, method, ipc, scores=None, k=None, features=None, seed=0, allow_short=False,
           span=None):
    """
    Row indices (int64, sorted) of the per-class selection, and a dict with "k_used" {class: k'}
    where the interval had to shrink (or, with k="auto", the k of every class, from `span`) and
    "short_classes" {class: n} taken whole.
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
    for c in progress(range(num_classes), desc=method, disable=not slow, leave=False):
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
                step = auto_step(n, ipc, span) if k == "auto" else interval_step(n, ipc, k)
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


def k_counts(k_used):
    """{class: k} as "21 (8 classes), 22 (2 classes)": each k with the number of classes that use it."""
    ks, counts = np.unique(list(k_used.values()), return_counts=True)
    return ", ".join(f"{k} ({c} class{'es' if c > 1 else ''})" for k, c in zip(ks.tolist(), counts.tolist()))


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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- main

def load_scores(data_path, n):
    scores = load_array(os.path.join(data_path, "scores.npy"), f"run score.py --data-path {data_path} first",
                        mmap=False)
    if scores.shape != (n,) or scores.dtype.kind != "f":
        die(f"{data_path}/scores.npy is {scores.dtype} {scores.shape} but labels.npy has {n} rows; re-run score.py on "
            "this directory")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        die(f"{data_path}/scores.npy has {len(bad)} NaN/inf scores (first at row {bad[0]}); re-run score.py for "
            "those rows")
    return scores.astype(np.float32)


def load_features(path, n):
    feats = load_array(path, "give an (N, D) .npy file with one row per image")
    if feats.ndim != 2 or feats.shape[0] != n:
        die(f"--features {path} has shape {feats.shape}; expected (N, D) with N = {n} (the rows of labels.npy)")
    return feats


def check_args(args):
    if args.method not in METHODS:
        die(f"--method {args.method} is unknown; choose one of {', '.join(METHODS)}")
    if not args.out.endswith(".npy"):
        die(f"--out {args.out} must end in .npy (the summary is written beside it as .json)")
    if args.global_seed < 0:
        die(f"--global-seed {args.global_seed} must be >= 0")
    if args.method == "interval" and not (args.k == "auto" or (args.k or "").isdigit() and int(args.k) >= 1):
        die("--method interval needs --k >= 1 or --k auto (the paper: --ipc 10 --k 96, --ipc 50 --k 16, "
            "--ipc 100 --k 10)")
    if not 0 < args.span <= 1:
        die(f"--span {args.span}: use a fraction in (0, 1]")
    if args.features and args.method not in ("kcenter", "herding"):
        die(f"--features is used by kcenter and herding only, not --method {args.method}")
    if args.ipc is not None and args.ipc < 1:
        die(f"--ipc {args.ipc} must be >= 1")
    args.k = int(args.k) if args.method == "interval" and args.k != "auto" else args.k


def summary(args, chosen, info, labels, scores, num_classes, ipc, budget, features):
    q = lambda v: np.quantile(v, QUANTILES).tolist() if len(v) else None  # noqa: E731
    return {
        "method": args.method, "num_selected": int(len(chosen)), "num_images": len(labels),
        "num_classes": num_classes, "ipc": ipc, "budget": budget,
        "k": args.k if args.method == "interval" else None,
        "span": args.span if args.k == "auto" else None,
        "k_used": {str(c): k for c, k in info["k_used"].items()},
        "k_policy": ("--k auto: per class the largest k with (ipc-1)*k < span*n" if args.k == "auto" else
                     "a class too small for k uses the largest k' <= k with (ipc-1)*k' < n"),
        "short_classes": {str(c): m for c, m in info["short_classes"].items()},
        "per_class_counts": np.bincount(labels[chosen], minlength=num_classes).tolist(),
        "features": (args.features or "latents.npy (unflipped, flattened)") if features is not None else None,
        "first_centre": "closest to the class mean" if args.method == "kcenter" else None,
        "score_quantiles": None if scores is None else {"q": list(QUANTILES), "selected": q(scores[chosen]),
                                                        "all": q(scores)},
        "args": vars(args),
    }


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    inputs = [args.data_path] + ([args.features] if args.features else [])
    for path in (args.out, args.out[:-len(".npy")] + ".json") + ((args.plot,) if args.plot else ()):
        check_output(path, inputs)
    latents, labels, meta = load_dataset(args.data_path)
    n, num_classes = len(labels), meta["num_classes"]
    needs_scores = args.method in ("interval", "min", "max", "medium") or args.plot
    scores_path = os.path.join(args.data_path, "scores.npy")
    scores = load_scores(args.data_path, n) if needs_scores or os.path.exists(scores_path) else None
    budget = None
    if args.budget is not None:
        ipc, images = ipc_from_budget(args.budget, n, num_classes)
        budget = {"budget": args.budget, "images": images,
                  "rule": "ipc = images // num_classes (images = floor(b * N) for a fraction b)"}
    else:
        ipc = args.ipc
    features = None
    if args.method in ("kcenter", "herding"):
        features = load_features(args.features, n) if args.features else unflipped(latents)

    chosen, info = select(labels, num_classes, args.method, ipc, scores=scores, k=args.k, features=features,
                          seed=args.global_seed, allow_short=args.allow_short, span=args.span)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save(summary(args, chosen, info, labels, scores, num_classes, ipc, budget, features),
                args.out[:-len(".npy")] + ".json")
    atomic_save(chosen, args.out)  # last: its presence means the summary exists too

    line = f"{args.method}: {len(chosen)} of {n} images ({ipc} per class, {num_classes} classes"
    if info["k_used"]:
        line += f"; k per class: {k_counts(info['k_used'])}" if args.k == "auto" else \
            f"; --k {args.k} lowered to {k_counts(info['k_used'])}"
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


def get_parser():
    p = parser(__doc__)
    p.add_argument("--data-path", type=str, required=True, help="dataset directory (encode.py), with scores.npy")
    p.add_argument("--method", type=str, default="interval", help="|".join(METHODS))
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--ipc", type=int, help="images per class")
    size.add_argument("--budget", type=float, help="fraction (0<b<1) or count (>=1) of images")
    p.add_argument("--k", type=str, default=None,
                   help="interval between sorted positions (interval), or auto: per class from --span")
    p.add_argument("--span", type=float, default=0.7,
                   help="with --k auto: the easiest fraction of each class the picks spread over")
    p.add_argument("--features", type=str, default=None, help="(N, D) .npy for kcenter/herding (default: latents)")
    p.add_argument("--global-seed", type=int, default=0, help="seeds the random method, per class")
    p.add_argument("--allow-short", action="store_true", help="take all of a class smaller than ipc")
    p.add_argument("--out", type=str, required=True, help="indices .npy (a .json summary goes beside it)")
    p.add_argument("--plot", type=str, default=None, help="PNG of the score distributions")
    return p


if __name__ == "__main__":
    run(main, None)
