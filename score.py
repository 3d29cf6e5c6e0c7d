"""
Score every image of a dataset directory by how hard it is for a pretrained diffusion model (the
difficulty score of D2C's Select stage): its class-conditional denoising loss averaged over
timesteps, higher = harder.

Reads:  --data-path DIR: latents.npy (the unflipped view when flips are stored), labels.npy (the
        class condition) and meta.json (num_classes, class_names).
        --ckpt: a train.py checkpoint (its EMA weights; DiT-* or SiT-* from the config inside), the
        public DiT-XL-2-256x256.pt or SiT-XL-2-256x256.pt (bare state dicts: pass --model), or
        REPA's last.pt (its projectors are dropped: they play no part in the loss).
Writes: DIR/scores.npy      float32 (N,), one score per row of latents.npy (--out FILE.npy elsewhere)
        DIR/scores.json     the settings that made it (checkpoint, draws, seed, ...) and the ranking's
                            split-half reliability (FILE.json beside --out)
        DIR/score_log.txt   the log of every attempt, images/s per chunk, the reliability in words
        Work in progress lives in DIR/scores.partial (a marker per finished chunk); a killed run
        resumes where it stopped when the same command is run again, with any number of ranks.
        An existing scores.npy made with the same settings is kept (nothing to do); one made with
        other settings, or of unknown origin, is refused unless --overwrite.

    torchrun --nproc_per_node=8 score.py --data-path data/in256 --ckpt pretrained/DiT-XL-2-256x256.pt \\
        --model DiT-XL/2

The score of image i (latent x, label c) over K = T x R draws (t_k, eps_k), R noises per timestep:
    s_i = (1/K) sum_k mean over (C, H, W) of (target_k - model(x_k, t_k, c))^2
  DiT (DDPM, epsilon prediction): x_k = sqrt(abar_t) x + sqrt(1 - abar_t) eps_k, target eps_k,
      the learned-sigma half of the output ignored; t = floor(tau * 1000).
  SiT (linear interpolant, velocity): x_k = (1 - t_k) x + t_k eps_k, target eps_k - x, t = tau
      (t = 1 is noise; official SiT checkpoints are run in reverse time).
  tau_j = lo + (hi - lo) (j + u_j) / T, j = 0..T-1, u_j ~ U[0, 1): the T timesteps are stratified
  over --t-range (default the whole schedule). --noises-per-timestep draws R noises at each, and
  --antithetic adds -eps for every eps.
The draws are random but the score estimates an expectation, so the ranking of images is only as
good as the estimator: a score is E_{t,eps} of the loss, and what separates two images is their
content, not their draws. Default (measured: docs/stages.md, "How reliable is the score"): --draws
shared, the same (t, eps) set for every image (common random numbers: two images differ only by
their content), with antithetic pairs (eps, -eps), which cancel the loss's term linear in eps, the
one that varies between images; 10 timesteps, 20 forwards per image. --draws item gives every
image its own draws (the estimator before). The draws come from a CPU generator seeded by
(--global-seed, image index) or (--global-seed) alone for shared draws (draw_seed(): a hash, so
two seeds never share a draw), so a score depends neither on the number of ranks nor on the device;
--batch-size changes only the float rounding of the network's matmuls (relative differences of
order 1e-7, far below the differences between images).
Reliability: the scores of the even and of the odd strata form two half scores; their Spearman
correlation within each class, averaged over classes and corrected to the full length with
Spearman-Brown (2r / (1 + r)), goes to scores.json and the log with a one-line reading, beside the
Spearman of the scores with those of a network that outputs zeros on the same draws (a scorer
that has learned little ranks by the images' norms: reliably, and uselessly).
One forward evaluates the K draws of --batch-size images (B*K rows).
On CUDA: bf16 autocast (--precision fp32 to skip), TF32 and torch.compile (--no-compile to skip);
fp32 eager on CPU, bf16 autocast there with --precision bf16 where the CPU computes bf16 natively.
"""
import argparse
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common import (Output, add_compile_flag, add_output_flags, add_precision_flag, add_time_convention_flag,
                    check_output, cleanup_distributed, compile_on, create_logger, die, load_dataset, load_model,
                    parser, progress, quiet_worker, run, setup_distributed, unflipped, use_bf16)
from diffusion import NUM_TIMESTEPS, DDPMSchedule, ReverseTime, diffusion_loss, linear_betas


def draw_seed(global_seed, index=None):
    """The seed of image `index`'s draws (index None: the draws shared by every image). A hash of
    (global_seed, index): two --global-seed values never share a draw, whatever the dataset size."""
    key = [global_seed] if index is None else [global_seed, index + 1]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)


def draws(index, num_timesteps, shape, objective, global_seed=0, noises=1, antithetic=False, t_range=(0.0, 1.0)):
    """
    The timesteps and noises of image `index` (None: the shared draws): (t (K,), noise (K, *shape)
    float32), K = T * R rows with R = noises (x 2 antithetic), stratum-major: rows j*R .. j*R+R-1
    share stratum j's time. A generator seeded with draw_seed(global_seed, index) draws u = rand(T)
    in float64, then noise (T, noises, *shape); antithetic appends -noise to each stratum's draws.
    Unit time tau_j = lo + (hi - lo) (j + u_j) / T over t_range = (lo, hi) (t = 1 is noise);
    t_j = floor(tau_j * NUM_TIMESTEPS) (int64) for 'ddpm', tau_j (float32) for 'sit'.
    """
    g = torch.Generator().manual_seed(draw_seed(global_seed, index))
    u = torch.rand(num_timesteps, generator=g, dtype=torch.float64)
    noise = torch.randn(num_timesteps, noises, *shape, generator=g)
    if antithetic:
        noise = torch.cat([noise, -noise], dim=1)
    lo, hi = t_range
    tau = lo + (hi - lo) * (torch.arange(num_timesteps, dtype=torch.float64) + u) / num_timesteps
    if objective == "ddpm":
        t = (tau * NUM_TIMESTEPS).floor().long().clamp(max=NUM_TIMESTEPS - 1)
    else:
        t = tau.float()
    R = noise.shape[1]
    return t.repeat_interleave(R), noise.reshape(num_timesteps * R, *shape)


def spearman_within_class(a, b, labels):
    """The mean over classes (of 3 or more images) of the Spearman correlation of a and b within
    the class (average ranks for ties); nan when no class qualifies."""
    from scipy.stats import rankdata
    rs = []
    for c in np.unique(labels):
        m = labels == c
        if m.sum() >= 3:
            ra, rb = rankdata(a[m]), rankdata(b[m])
            sa, sb = ra.std(), rb.std()
            rs.append(0.0 if sa == 0 or sb == 0 else float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb)))
    return float(np.mean(rs)) if rs else float("nan")


def spearman_brown(r, factor=2.0):
    """The reliability of a score `factor` times as long as one whose reliability is r."""
    return factor * r / (1 + (factor - 1) * r)


def reliability(halves, labels):
    """Split-half reliability of a ranking from the per-image half scores (N, 2), each half the mean
    over every other stratum: the within-class Spearman of the halves, and its Spearman-Brown
    correction to the full set of draws."""
    r = spearman_within_class(halves[:, 0], halves[:, 1], labels)
    return {"split_half_spearman": r, "spearman_brown": spearman_brown(r),
            "classes": int(sum((labels == c).sum() >= 3 for c in np.unique(labels)))}


class ScoreRows(Dataset):
    """Row i -> (i, latent (C, H, W) float32, label, t (K,), noise (K, C, H, W)): the draws of image
    i, or the shared ones (--draws shared), the same tensors for every row."""

    def __init__(self, data_path, labels, objective, args, shape):
        self.path, self.labels, self.objective, self.args = os.path.join(data_path, "latents.npy"), labels, objective, args
        self.shared = self.draw(None, shape) if args.draws == "shared" else None
        self.latents = None

    def draw(self, index, shape):
        a = self.args
        return draws(index, a.num_timesteps, shape, self.objective, a.global_seed, a.noises_per_timestep,
                     a.antithetic, tuple(a.t_range))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.latents is None:  # opened lazily, so each loader worker maps the file itself
            self.latents = unflipped(np.load(self.path, mmap_mode="r"))
        x = torch.from_numpy(np.asarray(self.latents[i], dtype=np.float32))
        t, noise = self.shared or self.draw(i, x.shape)
        return i, x, self.labels[i], t, noise


def score_batch(model, objective, schedule, x, y, t, noise):
    """
    Per-draw losses (B, K) of latents x (B, C, H, W) with labels y (B,) and draws t (B, K), noise
    (B, K, C, H, W): the loss of diffusion.py (vb=False) at all B*K rows in one forward. A score is
    their mean over K.
    """
    B, K = t.shape
    loss, _ = diffusion_loss(objective, model, x.repeat_interleave(K, 0), y.repeat_interleave(K, 0),
                             t.reshape(B * K), noise.reshape(B * K, *x.shape[1:]), schedule, vb=False)
    return loss.view(B, K)


def trivial_score(objective, x, noise):
    """(B,) the scores a network that outputs zeros gets from the same draws: mean (eps - x)^2 for a
    velocity, mean eps^2 for an epsilon prediction. A scorer whose ranking follows this one ranks the
    draws and the images' norms, not what it learned."""
    x = x.float()[:, None]
    target = noise.float() - x if objective == "sit" else noise.float()
    return (target ** 2).flatten(2).mean(2).mean(1)


def halves_of(losses, num_timesteps):
    """(B, 2): the mean loss over the even and over the odd strata (each half spans the schedule)."""
    per_stratum = losses.view(len(losses), num_timesteps, -1).mean(2)
    return torch.stack([per_stratum[:, 0::2].mean(1), per_stratum[:, 1::2].mean(1)], dim=1)


def load_scorer(ckpt, model_name, device, time_conv="auto"):
    """(network ready for the loss, info of common.load_model): EMA weights, eval mode (no label
    dropout), REPA projectors dropped (by load_model), official SiT checkpoints wrapped in ReverseTime."""
    model, info = load_model(ckpt, model_name, use_ema=True, device=device, time_conv=time_conv)
    if model_name and model_name != info["model"]:
        die(f"--model {model_name} but --ckpt {ckpt} holds a {info['model']} (stored in the checkpoint): drop --model")
    info["in_shape"] = (model.in_channels, *(2 * [int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size]))
    info["num_classes"] = model.num_classes
    return (ReverseTime(model) if info["reverse_time"] else model), info


def check_fit(args, info, latents, labels, meta):
    """The checkpoint must take these latents and these classes; otherwise one clear error."""
    shape, want = tuple(latents.shape[-3:]), info["in_shape"]
    if shape != want:
        die(f"{args.data_path}/latents.npy holds latents of shape (C, H, W) = {shape} but --ckpt {args.ckpt} "
            f"({info['model']}) takes {want}: score with a checkpoint trained on latents of this shape, or encode "
            "the images again with encode.py at the --image-size and --vae that the checkpoint was trained on")
    nc, data_nc = info["num_classes"], meta["num_classes"]
    if nc != data_nc:
        die(f"--ckpt {args.ckpt} ({info['model']}) is conditioned on {nc} classes but {args.data_path}/meta.json "
            f"has num_classes {data_nc}: score with a checkpoint trained on this dataset's classes (the public "
            "DiT/SiT checkpoints take the 1000 ImageNet-1k classes in sorted-folder order)")
    ours, theirs = (info["meta"] or {}).get("class_names"), meta.get("class_names")
    if ours and theirs and list(ours) != list(theirs):
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        die(f"--ckpt {args.ckpt} was trained on other classes than {args.data_path}/meta.json lists (class {k}: "
            f"{ours[k] if k < len(ours) else None!r} vs {theirs[k] if k < len(theirs) else None!r}): "
            "score with a checkpoint trained on this dataset's classes")


def score_chunks(out, model, info, labels, args, device, logger):
    """Score this rank's unfinished chunks into OUT.partial: the scores and the half scores."""
    cuda, compiled = device.type == "cuda", args.compiled
    scores = out.array(os.path.basename(out.out), (len(labels),), np.float32)
    halves = out.array("halves.npy", (len(labels), 2), np.float32)
    trivial = out.array("trivial.npy", (len(labels),), np.float32)
    schedule = DDPMSchedule(linear_betas())
    batches = out.batches(args.batch_size)
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    rows = ScoreRows(args.data_path, labels, info["objective"], args, info["in_shape"])
    loader = DataLoader(rows, batch_sampler=batches, num_workers=workers, pin_memory=cuda, worker_init_fn=quiet_worker)
    chunk_start, chunk_images = time.time(), 0
    with progress(total=sum(map(len, batches)), rank=out.rank, unit="img", desc="score") as bar:
        for idx, x, y, t, noise in loader:
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            x, y, t, noise = (v.to(device, non_blocking=True) for v in (x, y, t, noise))
            B = len(x)
            if compiled and B < args.batch_size:  # pad the short last batch of a chunk: no recompilation
                pad = args.batch_size - B
                x, y, t, noise = (torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) for v in (x, y, t, noise))
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                losses = score_batch(model, info["objective"], schedule, x, y, t, noise)[:B].float().cpu()
            if not torch.isfinite(losses).all():
                die(f"non-finite loss for images {lo}..{hi - 1} of {args.data_path} with --ckpt {args.ckpt}: the "
                    f"checkpoint or the latents are broken (finished chunks are kept in {out.partial})")
            scores[lo:hi] = losses.mean(1).numpy()
            halves[lo:hi] = halves_of(losses, args.num_timesteps).numpy()
            trivial[lo:hi] = trivial_score(info["objective"], x[:B], noise[:B]).cpu().numpy()
            bar.update(B)
            chunk_images += B
            if out.written(idx.tolist()):
                logger.info(f"chunk {lo // args.chunk_size + 1}/{len(out.chunks())} done: "
                            f"{chunk_images / max(time.time() - chunk_start, 1e-9):.1f} images/s on rank {out.rank}")
                chunk_start, chunk_images = time.time(), 0


def reading(rel):
    """One line on how far the ranking can be trusted."""
    if rel is None:
        return "ranking reliability not available (needs --num-timesteps >= 2 and a class of >= 3 images)"
    r = rel["spearman_brown"]
    verdict = ("reliable" if r >= 0.95 else "usable; more draws would sharpen it" if r >= 0.8 else
               "noisy: raise --num-timesteps or use --draws shared --antithetic before trusting the order")
    return (f"ranking reliability {r:.3f} within class (split-half Spearman {rel['split_half_spearman']:.3f}, "
            f"Spearman-Brown corrected, mean over {rel['classes']} classes): {verdict}; agreement with the ranking "
            f"of a zero-output network on the same draws {rel.get('zero_model_spearman', float('nan')):.3f} (near 1: "
            "the scorer ranks the images' norms, not what it learned: train it longer)")


def scheme(args):
    """The estimator's settings, as recorded and compared by Output."""
    return {"num_timesteps": args.num_timesteps, "noises_per_timestep": args.noises_per_timestep,
            "antithetic": args.antithetic, "draws": args.draws, "t_range": list(args.t_range),
            "global_seed": args.global_seed}


def forwards_per_image(args):
    return args.num_timesteps * args.noises_per_timestep * (2 if args.antithetic else 1)


def main(args):
    if min(args.num_timesteps, args.noises_per_timestep, args.batch_size, args.chunk_size) < 1:
        die("--num-timesteps, --noises-per-timestep, --batch-size and --chunk-size must be positive")
    lo, hi = args.t_range
    if not 0 <= lo < hi <= 1:
        die(f"--t-range {lo} {hi}: give 0 <= LO < HI <= 1 (unit time, 1 = pure noise)")
    rank, world, device = setup_distributed()
    latents, labels, meta = load_dataset(args.data_path)
    if len(labels) == 0:
        die(f"{args.data_path} holds no images: nothing to score")
    scores_path = args.out or os.path.join(args.data_path, "scores.npy")
    if not scores_path.endswith(".npy"):
        die(f"--out {scores_path}: name a .npy file (its settings go to the .json beside it)")
    check_output(scores_path, [args.ckpt] + [os.path.join(args.data_path, f) for f in ("latents.npy", "labels.npy")],
                 "--out")
    model, info = load_scorer(args.ckpt, args.model, device, args.time_convention)
    check_fit(args, info, latents, labels, meta)
    ckpt = os.path.abspath(args.ckpt)
    request = {"ckpt": ckpt, "ckpt_mtime": int(os.stat(ckpt).st_mtime), "model": args.model, **scheme(args),
               "count": len(labels), "reverse_time": info["reverse_time"]}
    out = Output(scores_path, request, rank, world, args.overwrite, args.stop_after_chunks,
                 record=os.path.splitext(scores_path)[0] + ".json", flag=None)
    if out.complete:
        return cleanup_distributed()

    args.compiled = compile_on(args, device)
    if args.compiled:
        model = torch.compile(model)
    args.bf16 = use_bf16(args.precision, device, print if rank == 0 else lambda _: None)
    out.start(len(labels), args.chunk_size)
    logger = create_logger(os.path.dirname(scores_path) or ".", rank, name="score", filename="score_log.txt")
    todo, start = out.remaining(), time.time()
    logger.info(f"{args.data_path}: {len(labels)} images, latents {tuple(latents.shape[-3:])}, scorer {info['model']} "
                f"({info['objective']}{', reverse time' if info['reverse_time'] else ''}) from {args.ckpt}, "
                f"{forwards_per_image(args)} forwards per image ({scheme(args)}), {world} rank(s), "
                f"{'bf16 autocast' if args.bf16 else 'fp32'}{', compiled' if args.compiled else ''}; "
                f"{out.summary('images')}")
    init = (info.get("ema") or {}).get("init_weight")
    if init is not None and init > 0.01:
        logger.warning(f"warning: the scorer's EMA weights are still {init:.0%} its initialisation (train it longer "
                       "or with train.py --ema-warmup): its ranking is mostly the images' norms (see the zero-output "
                       "agreement below)")
    score_chunks(out, model, info, labels, args, device, logger)
    out.end_chunks()  # waits for every rank; fails if a chunk is missing
    if rank == 0:
        scores = np.load(out.path(os.path.basename(scores_path)))
        rel = reliability(np.load(out.path("halves.npy")), np.asarray(labels)) if args.num_timesteps >= 2 else None
        rel = rel if rel and rel["classes"] else None
        if rel:
            rel["zero_model_spearman"] = spearman_within_class(scores, np.load(out.path("trivial.npy")),
                                                               np.asarray(labels))
        logger.info(f"scored {todo} images in {time.time() - start:.1f} s on {world} rank(s); wrote {scores_path}")
        logger.info(reading(rel))
        out.commit(logger, record={"scorer": info["model"], "objective": info["objective"],
                                   "precision": "bf16" if args.bf16 else "fp32",
                                   "forwards_per_image": forwards_per_image(args), "reliability": rel,
                                   "stats": {q: float(np.quantile(scores, p)) for q, p in
                                             (("min", 0), ("median", 0.5), ("max", 1))}})
    cleanup_distributed()


def get_parser():
    p = parser(__doc__)
    p.add_argument("--data-path", type=str, required=True, help="dataset directory made by encode.py")
    p.add_argument("--ckpt", type=str, required=True, help="scorer checkpoint (train.py, DiT, SiT or REPA)")
    p.add_argument("--model", type=str, default=None,
                   help="network of a bare public checkpoint, e.g. DiT-XL/2 or SiT-XL/2 (ours store it)")
    add_time_convention_flag(p)
    p.add_argument("--out", type=str, default=None,
                   help="scores file (default DATA/scores.npy; its settings go to the .json beside it): several "
                        "scorings of one dataset, e.g. with two seeds for a test-retest check")
    p.add_argument("--num-timesteps", type=int, default=10,
                   help="timesteps per image, stratified over --t-range (the paper does not state its count)")
    p.add_argument("--noises-per-timestep", type=int, default=1, help="noise draws at each timestep")
    p.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=True,
                   help="pair every noise draw eps with -eps (twice the forwards; cancels the noise's cross term)")
    p.add_argument("--draws", choices=["item", "shared"], default="shared",
                   help="item: every image its own timesteps and noises; shared: the same set for every image "
                        "(common random numbers: images differ by their content, not by their draws)")
    p.add_argument("--t-range", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"),
                   help="the part of the schedule to score over, in unit time (1 = pure noise)")
    p.add_argument("--global-seed", type=int, default=0, help="seeds every image's timesteps and noises")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward on each rank (the forward holds batch-size x num-timesteps rows)")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers per rank (default 4 on CUDA, 0 on CPU)")
    add_compile_flag(p)
    add_precision_flag(p)
    add_output_flags(p, 4096, "images")
    return p


if __name__ == "__main__":
    run(main, get_parser().parse_args())
