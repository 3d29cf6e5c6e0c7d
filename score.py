"""
Score every image of a dataset directory by how hard it is for a pretrained diffusion model (the
difficulty score of D2C's Select stage): its class-conditional denoising loss averaged over
timesteps, higher = harder.

Reads:  --data-path DIR: latents.npy (the unflipped view when flips are stored), labels.npy (the
        class condition) and meta.json (num_classes, class_names).
        --ckpt: a train.py checkpoint (its EMA weights; DiT-* or SiT-* from the config inside), the
        public DiT-XL-2-256x256.pt or SiT-XL-2-256x256.pt (bare state dicts: pass --model), or
        REPA's last.pt (its projectors are dropped: they play no part in the loss).
Writes: DIR/scores.npy      float32 (N,), one score per row of latents.npy
        DIR/scores.json     the settings that made it (checkpoint, timesteps, seed, ...)
        DIR/score_log.txt   the log of every attempt, images/s per chunk
        Work in progress lives in DIR/scores.partial (a marker per finished chunk); a killed run
        resumes where it stopped when the same command is run again, with any number of ranks.
        An existing scores.npy made with the same settings is kept (nothing to do); one made with
        other settings, or of unknown origin, is refused unless --overwrite.

    torchrun --nproc_per_node=8 score.py --data-path data/in256 --ckpt pretrained/DiT-XL-2-256x256.pt \\
        --model DiT-XL/2 --num-timesteps 10

The score of image i (latent x, label c) over T timesteps t_j with one noise eps_j each:
    s_i = (1/T) sum_j mean over (C, H, W) of (target_j - model(x_j, t_j, c))^2
  DiT (DDPM, epsilon prediction): x_j = sqrt(abar_t) x + sqrt(1 - abar_t) eps_j, target eps_j,
      the learned-sigma half of the output ignored; t_j = floor((j + u_j) * 1000 / T).
  SiT (linear interpolant, velocity): x_j = (1 - t_j) x + t_j eps_j, target eps_j - x,
      t_j = (j + u_j) / T (t = 1 is noise; official SiT checkpoints are run in reverse time).
  j = 0..T-1, so the T timesteps are stratified over the whole schedule. u_j ~ U[0, 1) and
  eps_j ~ N(0, I) come from a CPU generator seeded by (--global-seed, i) alone (see draws()), so a
  score depends neither on --batch-size, nor on the number of ranks, nor on the device.
The paper does not say how many timesteps it averages; --num-timesteps defaults to 10, the
stratification keeping the estimate's spread small next to the spread between images, and the
cost is linear in T. One forward evaluates the T timesteps of --batch-size images (B*T rows).
On CUDA: bf16 autocast (--precision fp32 to skip), TF32 and torch.compile (--no-compile to skip);
fp32 eager on CPU.
"""
import argparse
import json
import logging
import os
import shutil
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common import (ChunkedWork, atomic_save, barrier, cleanup_distributed, create_logger, die,
                    fast_cuda_defaults, load_dataset, load_model, setup_distributed, unflipped)
from diffusion import DDPMSchedule, ReverseTime, diffusion_loss, linear_betas

NUM_TRAIN_TIMESTEPS = 1000  # the DDPM schedule of DiT


def draws(index, num_timesteps, shape, objective, global_seed=0, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """
    The timesteps and noises of image `index`: (t (T,), noise (T, *shape) float32). A generator
    seeded with global_seed * 1_000_003 + index draws u = rand(T) in float64, then the noise.
    t_j = floor((j + u_j) * num_train_timesteps / T) (int64) for 'ddpm', (j + u_j) / T (float32)
    for 'sit'.
    """
    g = torch.Generator().manual_seed(global_seed * 1_000_003 + index)
    u = torch.rand(num_timesteps, generator=g, dtype=torch.float64)
    noise = torch.randn(num_timesteps, *shape, generator=g)
    j = torch.arange(num_timesteps, dtype=torch.float64)
    if objective == "ddpm":
        t = ((j + u) * num_train_timesteps / num_timesteps).floor().long().clamp(max=num_train_timesteps - 1)
    else:
        t = ((j + u) / num_timesteps).float()
    return t, noise


class ScoreRows(Dataset):
    """Row i -> (i, latent (C, H, W) float32, label, t (T,), noise (T, C, H, W))."""

    def __init__(self, data_path, labels, num_timesteps, objective, global_seed):
        self.path = os.path.join(data_path, "latents.npy")
        self.labels, self.T, self.objective, self.seed = labels, num_timesteps, objective, global_seed
        self.latents = None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.latents is None:  # opened lazily, so each loader worker maps the file itself
            self.latents = unflipped(np.load(self.path, mmap_mode="r"))
        x = torch.from_numpy(np.asarray(self.latents[i], dtype=np.float32))
        t, noise = draws(i, self.T, x.shape, self.objective, self.seed)
        return i, x, self.labels[i], t, noise


def score_batch(model, objective, schedule, x, y, t, noise):
    """
    Scores (B,) of latents x (B, C, H, W) with labels y (B,) and draws t (B, T), noise
    (B, T, C, H, W): the loss of diffusion.py (vb=False) at all B*T rows in one forward.
    """
    B, T = t.shape
    loss, _ = diffusion_loss(objective, model, x.repeat_interleave(T, 0), y.repeat_interleave(T, 0),
                             t.reshape(B * T), noise.reshape(B * T, *x.shape[1:]), schedule, vb=False)
    return loss.view(B, T).mean(1)


def load_scorer(ckpt, model_name, device):
    """(network ready for the loss, info of common.load_model): EMA weights, eval mode (no label
    dropout), REPA projectors dropped, official SiT checkpoints wrapped in ReverseTime."""
    model, info = load_model(ckpt, model_name, use_ema=True, device=device)
    if model_name and model_name != info["model"]:
        die(f"--model {model_name} but --ckpt {ckpt} holds a {info['model']} (stored in the checkpoint): drop --model")
    model.projectors = torch.nn.ModuleList()  # forward then returns the prediction alone
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
    nc, data_nc = info["num_classes"], meta.get("num_classes", int(labels.max()) + 1)
    if nc != data_nc:
        die(f"--ckpt {args.ckpt} ({info['model']}) is conditioned on {nc} classes but {args.data_path}/meta.json "
            f"has num_classes {data_nc}: score with a checkpoint trained on this dataset's classes (the public "
            "DiT/SiT checkpoints take the 1000 ImageNet-1k classes in sorted-folder order)")
    if labels.min() < 0 or labels.max() >= nc:
        die(f"{args.data_path}/labels.npy holds labels in [{labels.min()}, {labels.max()}], outside the "
            f"{nc} classes of --ckpt {args.ckpt}; re-run encode.py")
    ours, theirs = (info["meta"] or {}).get("class_names"), meta.get("class_names")
    if ours and theirs and list(ours) != list(theirs):
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        die(f"--ckpt {args.ckpt} was trained on other classes than {args.data_path}/meta.json lists (class {k}: "
            f"{ours[k] if k < len(ours) else None!r} vs {theirs[k] if k < len(theirs) else None!r}): "
            "score with a checkpoint trained on this dataset's classes")


def settings_of(args, n):
    """What a finished scores.npy (or a partial run) was made with; same settings = same scores."""
    ckpt = os.path.abspath(args.ckpt)
    if not os.path.exists(ckpt):
        die(f"--ckpt {args.ckpt} does not exist")
    return {"ckpt": ckpt, "ckpt_mtime": int(os.stat(ckpt).st_mtime), "model": args.model,
            "num_timesteps": args.num_timesteps, "global_seed": args.global_seed, "count": n}


def main(args):
    rank, world, device = setup_distributed()
    if min(args.num_timesteps, args.batch_size, args.chunk_size) < 1:
        die("--num-timesteps, --batch-size and --chunk-size must be positive")
    latents, labels, meta = load_dataset(args.data_path)
    n = len(labels)
    if n == 0:
        die(f"{args.data_path} holds no images: nothing to score")
    out = os.path.join(args.data_path, "scores.npy")
    out_json = os.path.join(args.data_path, "scores.json")
    partial = os.path.join(args.data_path, "scores.partial")
    settings = settings_of(args, n)

    # A finished scores.npy is never recomputed silently.
    if os.path.exists(out) and not args.overwrite:
        try:
            with open(out_json) as f:
                old = json.load(f)["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            die(f"{out} exists but {out_json} does not say how it was made: pass --overwrite to recompute it")
        if old != settings:
            differ = ", ".join(f"{k}: {old.get(k)} != {v}" for k, v in settings.items() if old.get(k) != v)
            die(f"{out} already holds scores made with other settings ({differ}); pass --overwrite to replace them")
        if rank == 0:
            print(f"{out} is already complete for these settings; nothing to do (--overwrite recomputes it)")
        cleanup_distributed()
        return

    model, info = load_scorer(args.ckpt, args.model, device)
    check_fit(args, info, latents, labels, meta)
    objective = info["objective"]
    schedule = DDPMSchedule(linear_betas(NUM_TRAIN_TIMESTEPS))

    # Rows of a partial run are only valid for the same settings.
    if rank == 0:
        request = os.path.join(partial, "request.json")
        if os.path.isdir(partial):
            try:
                with open(request) as f:
                    stale = json.load(f) != settings
            except (OSError, ValueError):
                stale = True
            if stale:
                print(f"{partial} was made with other settings: starting over")
                shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=True)
        if not os.path.exists(request):
            atomic_save(settings, request)
    barrier()
    logger = create_logger(None, rank, name="score")
    if rank == 0:
        fh = logging.FileHandler(os.path.join(args.data_path, "score_log.txt"))
        fh.setFormatter(logger.handlers[0].formatter)
        logger.addHandler(fh)

    cuda = device.type == "cuda"
    compiled = cuda and not args.no_compile
    bf16 = cuda and args.precision == "bf16"
    if cuda:
        fast_cuda_defaults()
    if compiled:
        model = torch.compile(model)
    work = ChunkedWork(partial, n, args.chunk_size, rank, world)
    scores = work.array("scores.npy", (n,), np.float32)
    chunks = work.chunks()
    remaining = sum(hi - lo for lo, hi in chunks if not os.path.exists(os.path.join(work.marks, str(lo))))
    logger.info(f"{args.data_path}: {n} images, latents {tuple(latents.shape[-3:])}, scorer {info['model']} "
                f"({objective}{', reverse time' if info['reverse_time'] else ''}) from {args.ckpt}, "
                f"{args.num_timesteps} timesteps, seed {args.global_seed}, {world} rank(s), "
                f"{'bf16 autocast' if bf16 else 'fp32'}{', compiled' if compiled else ''}")
    logger.info(f"{len(chunks) - work.num_done()} of {len(chunks)} chunks to do: scoring {remaining} images")

    batches = work.batches(args.batch_size, args.stop_after_chunks)
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    loader = DataLoader(ScoreRows(args.data_path, labels, args.num_timesteps, objective, args.global_seed),
                        batch_sampler=batches, num_workers=workers, pin_memory=cuda)
    start = chunk_start = time.time()
    chunk_images = 0
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", disable=rank != 0, desc="score")
    for idx, x, y, t, noise in loader:
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        x, y, t, noise = (v.to(device, non_blocking=True) for v in (x, y, t, noise))
        B = len(x)
        if compiled and B < args.batch_size:  # pad the short last batch of a chunk: no recompilation
            pad = args.batch_size - B
            x, y, t, noise = (torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) for v in (x, y, t, noise))
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            s = score_batch(model, objective, schedule, x, y, t, noise)[:B].float().cpu()
        if not torch.isfinite(s).all():
            die(f"non-finite loss for images {lo}..{hi - 1} of {args.data_path} with --ckpt {args.ckpt}: the "
                f"checkpoint or the latents are broken (finished chunks are kept in {partial})")
        scores[lo:hi] = s.numpy()
        bar.update(B)
        chunk_images += B
        if work.written(lo, hi):
            now = time.time()
            logger.info(f"chunk {lo // args.chunk_size + 1}/{len(chunks)} done: "
                        f"{chunk_images / max(now - chunk_start, 1e-9):.1f} images/s on rank {rank}")
            chunk_start, chunk_images = now, 0
    bar.close()
    if args.stop_after_chunks is not None:
        barrier()
        die(f"stopped after {args.stop_after_chunks} chunk(s) per rank as --stop-after-chunks asked; "
            f"run again without it to resume ({partial} keeps the finished chunks)")

    if rank == 0 and os.path.exists(out_json):  # never leave old settings beside new scores
        os.remove(out_json)
    work.finish({"scores.npy": out})  # waits for every rank; fails if a chunk is missing
    elapsed = time.time() - start
    if rank == 0:
        atomic_save({"settings": settings, "scorer": info["model"], "objective": objective,
                     "reverse_time": info["reverse_time"], "precision": "bf16" if bf16 else "fp32",
                     "stats": {q: float(np.quantile(scores, p)) for q, p in
                               (("min", 0), ("median", 0.5), ("max", 1))}}, out_json)
        del scores, work
        shutil.rmtree(partial, ignore_errors=True)
        logger.info(f"scored {remaining} images in {elapsed:.1f} s: {remaining / max(elapsed, 1e-9):.1f} images/s "
                    f"on {world} rank(s); wrote {out}")
        fh.close()
    cleanup_distributed()


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=str, required=True, help="dataset directory made by encode.py")
    parser.add_argument("--ckpt", type=str, required=True, help="scorer checkpoint (train.py, DiT, SiT or REPA)")
    parser.add_argument("--model", type=str, default=None,
                        help="network of a bare public checkpoint, e.g. DiT-XL/2 or SiT-XL/2 (ours store it)")
    parser.add_argument("--num-timesteps", type=int, default=10,
                        help="timesteps per image, stratified over the schedule, one noise each (the paper does "
                             "not state it)")
    parser.add_argument("--global-seed", type=int, default=0, help="seeds every image's timesteps and noises")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per forward on each rank (the forward holds batch-size x num-timesteps rows)")
    parser.add_argument("--chunk-size", type=int, default=4096,
                        help="images per resumable unit of work (a killed run loses at most one chunk per rank)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader workers per rank (default 4 on CUDA, 0 on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="network precision on CUDA: bf16 autocast or fp32 (TF32 matmuls); CPU is always fp32")
    parser.add_argument("--overwrite", action="store_true", help="recompute an existing scores.npy")
    parser.add_argument("--stop-after-chunks", type=int, default=None,
                        help="for testing resumption only: stop (exit status 1) after each rank finished this "
                             "many chunks, as if the job had been killed")
    return parser


if __name__ == "__main__":
    main(get_parser().parse_args())
