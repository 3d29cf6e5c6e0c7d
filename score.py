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
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common import (Output, add_compile_flag, add_output_flags, add_time_convention_flag, check_output,
                    cleanup_distributed, compile_on, create_logger, die, item_seed, load_dataset,
                    load_model, parser, progress, quiet_worker, run, setup_distributed, unflipped)
from diffusion import NUM_TIMESTEPS, DDPMSchedule, ReverseTime, diffusion_loss, linear_betas


def draws(index, num_timesteps, shape, objective, global_seed=0):
    """
    The timesteps and noises of image `index`: (t (T,), noise (T, *shape) float32). A generator
    seeded with item_seed(global_seed, index) draws u = rand(T) in float64, then the noise.
    t_j = floor((j + u_j) * NUM_TIMESTEPS / T) (int64) for 'ddpm', (j + u_j) / T (float32) for 'sit'.
    """
    g = torch.Generator().manual_seed(item_seed(global_seed, index))
    u = torch.rand(num_timesteps, generator=g, dtype=torch.float64)
    noise = torch.randn(num_timesteps, *shape, generator=g)
    j = torch.arange(num_timesteps, dtype=torch.float64)
    if objective == "ddpm":
        t = ((j + u) * NUM_TIMESTEPS / num_timesteps).floor().long().clamp(max=NUM_TIMESTEPS - 1)
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


def load_scorer(ckpt, model_name, device, time_conv="auto"):
    """(network ready for the loss, info of common.load_model): EMA weights, eval mode (no label
    dropout), REPA projectors dropped, official SiT checkpoints wrapped in ReverseTime."""
    model, info = load_model(ckpt, model_name, use_ema=True, device=device, time_conv=time_conv)
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
    """Score this rank's unfinished chunks into OUT.partial/scores.npy."""
    cuda, compiled = device.type == "cuda", args.compiled
    scores = out.array("scores.npy", (len(labels),), np.float32)
    schedule = DDPMSchedule(linear_betas())
    batches = out.batches(args.batch_size)
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    loader = DataLoader(ScoreRows(args.data_path, labels, args.num_timesteps, info["objective"], args.global_seed),
                        batch_sampler=batches, num_workers=workers, pin_memory=cuda, worker_init_fn=quiet_worker)
    chunk_start, chunk_images = time.time(), 0
    with progress(total=sum(map(len, batches)), rank=out.rank, unit="img", desc="score") as bar:
        for idx, x, y, t, noise in loader:
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            x, y, t, noise = (v.to(device, non_blocking=True) for v in (x, y, t, noise))
            B = len(x)
            if compiled and B < args.batch_size:  # pad the short last batch of a chunk: no recompilation
                pad = args.batch_size - B
                x, y, t, noise = (torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) for v in (x, y, t, noise))
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and args.precision == "bf16"):
                s = score_batch(model, info["objective"], schedule, x, y, t, noise)[:B].float().cpu()
            if not torch.isfinite(s).all():
                die(f"non-finite loss for images {lo}..{hi - 1} of {args.data_path} with --ckpt {args.ckpt}: the "
                    f"checkpoint or the latents are broken (finished chunks are kept in {out.partial})")
            scores[lo:hi] = s.numpy()
            bar.update(B)
            chunk_images += B
            if out.written(idx.tolist()):
                logger.info(f"chunk {lo // args.chunk_size + 1}/{len(out.chunks())} done: "
                            f"{chunk_images / max(time.time() - chunk_start, 1e-9):.1f} images/s on rank {out.rank}")
                chunk_start, chunk_images = time.time(), 0


def main(args):
    if min(args.num_timesteps, args.batch_size, args.chunk_size) < 1:
        die("--num-timesteps, --batch-size and --chunk-size must be positive")
    rank, world, device = setup_distributed()
    latents, labels, meta = load_dataset(args.data_path)
    if len(labels) == 0:
        die(f"{args.data_path} holds no images: nothing to score")
    scores_path = os.path.join(args.data_path, "scores.npy")
    check_output(scores_path, [args.ckpt] + [os.path.join(args.data_path, f) for f in ("latents.npy", "labels.npy")])
    model, info = load_scorer(args.ckpt, args.model, device, args.time_convention)
    check_fit(args, info, latents, labels, meta)
    ckpt = os.path.abspath(args.ckpt)
    request = {"ckpt": ckpt, "ckpt_mtime": int(os.stat(ckpt).st_mtime), "model": args.model,
               "num_timesteps": args.num_timesteps, "global_seed": args.global_seed, "count": len(labels),
               "reverse_time": info["reverse_time"]}
    out = Output(scores_path, request, rank, world, args.overwrite, args.stop_after_chunks,
                 record=os.path.join(args.data_path, "scores.json"), flag=None)
    if out.complete:
        return cleanup_distributed()

    args.compiled = compile_on(args, device)
    if args.compiled:
        model = torch.compile(model)
    out.start(len(labels), args.chunk_size)
    logger = create_logger(args.data_path, rank, name="score", filename="score_log.txt")
    bf16 = device.type == "cuda" and args.precision == "bf16"
    todo, start = out.remaining(), time.time()
    logger.info(f"{args.data_path}: {len(labels)} images, latents {tuple(latents.shape[-3:])}, scorer {info['model']} "
                f"({info['objective']}{', reverse time' if info['reverse_time'] else ''}) from {args.ckpt}, "
                f"{args.num_timesteps} timesteps, seed {args.global_seed}, {world} rank(s), "
                f"{'bf16 autocast' if bf16 else 'fp32'}{', compiled' if args.compiled else ''}; {out.summary('images')}")
    score_chunks(out, model, info, labels, args, device, logger)
    out.end_chunks()  # waits for every rank; fails if a chunk is missing
    if rank == 0:
        scores = np.load(out.path("scores.npy"))
        logger.info(f"scored {todo} images in {time.time() - start:.1f} s on {world} rank(s); wrote {scores_path}")
        out.commit(logger, record={"scorer": info["model"], "objective": info["objective"],
                                   "precision": "bf16" if bf16 else "fp32",
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
    p.add_argument("--num-timesteps", type=int, default=10,
                   help="timesteps per image, stratified over the schedule, one noise each (the paper does not state it)")
    p.add_argument("--global-seed", type=int, default=0, help="seeds every image's timesteps and noises")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward on each rank (the forward holds batch-size x num-timesteps rows)")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers per rank (default 4 on CUDA, 0 on CPU)")
    add_compile_flag(p)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="network precision on CUDA: bf16 autocast or fp32 (TF32 matmuls); CPU is always fp32")
    add_output_flags(p, 4096, "images")
    return p


if __name__ == "__main__":
    run(main, get_parser().parse_args())
