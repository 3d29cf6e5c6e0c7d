"""
Sample images from a DiT/SiT checkpoint for FID evaluation.

Reads:  --ckpt, a train.py checkpoint (network config, EMA weights and dataset meta inside) or a
        public one: DiT-XL-2-256x256.pt / DiT-XL-2-512x512.pt and SiT-XL-2-256x256.pt (bare state
        dicts: pass --model), REPA's last.pt. The VAE comes from the dataset meta, else --vae.
Writes: DIR/000000.png ... one PNG per sample index; indices already there are skipped, so a
          killed job continues where it stopped (same settings, any number of processes)
        DIR.npz      arr_0 uint8 (N, H, W, 3) in index order, for the ADM evaluator
        DIR_grid.png the first --grid samples
        DIR/settings.json (what the samples depend on; another setting refuses DIR),
        DIR/log.txt
Sample i depends only on --global-seed, i and the settings, not on the number of processes
or the batch size: its label, initial noise and every stochastic step's noise come from its
own generator, seeded with global_seed * 1_000_003 + i.
On CUDA the network runs compiled in bf16 autocast; --precision fp32 samples in fp32 with TF32
matmuls, as the public DiT/SiT/REPA sampling scripts do.

    torchrun --nproc_per_node=8 sample.py --ckpt results/000-DiT-L-2/checkpoints/0100000.pt \\
        --num-fid-samples 50000 --cfg-scale 1.5 --sample-dir samples/d2c-dit-l
"""
import argparse
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import diffusion
from common import (barrier, cleanup_distributed, create_logger, die, fast_cuda_defaults, load_model,
                    load_vae, setup_distributed)


def seed_of(global_seed, index):
    return global_seed * 1_000_003 + index


def class_balanced_labels(n, num_classes, global_seed):
    """Exactly n / num_classes samples per class, in an order fixed by the seed (same on every rank)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(global_seed, -1)))
    return (torch.arange(n) % num_classes)[perm]


def draw_batch(indices, shape, num_classes, args, balanced):
    """Per-sample generators (kept for the sampler's noise), labels and initial noise."""
    gens = [torch.Generator().manual_seed(seed_of(args.global_seed, i)) for i in indices]
    # the random label is drawn even when balanced labels replace it, so the noise stays the same
    labels = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])
    if balanced is not None:
        labels = balanced[indices]
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return gens, labels, z


def to_uint8(x, vae, latent_scale):
    """Latents (or [-1, 1] pixels without a VAE) -> uint8 (N, H, W, 3)."""
    if vae is not None:
        x = vae.decode(x / latent_scale).sample
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(image, path):
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_grid(images, path):
    k, (h, w) = len(images), images.shape[1:3]
    cols = math.ceil(math.sqrt(k))
    grid = np.zeros((math.ceil(k / cols) * h, cols * w, 3), np.uint8)
    for j, im in enumerate(images):
        r, c = divmod(j, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    save_png(grid, path)


def requested_labels(n, num_classes, args, balanced):
    """The class asked for by every sample index (the first draw of its generator, as draw_batch)."""
    if balanced is not None:
        return balanced.numpy()
    return np.array([int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(
        seed_of(args.global_seed, i)))) for i in range(n)], dtype=np.int64)


def build_npz(out, n, logger, labels):
    """Stack DIR/000000.png ... into DIR.npz (arr_0 uint8 NHWC for the ADM evaluator, and the
    requested class of each sample as `labels`), written under a temporary name."""
    first = np.asarray(Image.open(f"{out}/{0:06d}.png").convert("RGB"))
    arr = np.empty((n, *first.shape), np.uint8)
    for i in tqdm(range(n), desc="npz", leave=False):
        im = np.asarray(Image.open(f"{out}/{i:06d}.png").convert("RGB"))
        if im.shape != first.shape:
            die(f"{out}/{i:06d}.png is {im.shape}, not {first.shape} like sample 0; delete the odd files and re-run")
        arr[i] = im
    tmp = f"{out}.npz.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, arr_0=arr, labels=labels)
    os.replace(tmp, f"{out}.npz")
    logger.info(f"wrote {out}.npz, arr_0 {arr.shape} uint8")
    return arr


def main(args):
    torch.set_grad_enabled(False)
    if args.num_fid_samples < 1 or args.per_proc_batch_size < 1 or args.num_steps < 1:
        die("--num-fid-samples, --per-proc-batch-size and --num-steps must be positive")
    if not 0 <= args.guidance_low <= args.guidance_high <= 1:
        die(f"--guidance-low {args.guidance_low} / --guidance-high {args.guidance_high}: need 0 <= low <= high <= 1")
    rank, world, device = setup_distributed()
    fast_cuda_defaults()
    cuda = device.type == "cuda"

    model, info = load_model(args.ckpt, args.model, use_ema=args.ema, device=device)
    meta = info["meta"] or {}
    sampler = args.sampler or ("ddpm" if info["objective"] == "ddpm" else "sde")
    if diffusion.SAMPLER_OBJECTIVE[sampler] != info["objective"]:
        ok = [k for k, v in diffusion.SAMPLER_OBJECTIVE.items() if v == info["objective"]]
        die(f"--sampler {sampler} does not fit {info['model']} ({info['objective']} objective): use one of {', '.join(ok)}")
    if args.timestep_respacing and sampler not in ("ddpm", "ddim"):
        die("--timestep-respacing applies to --sampler ddpm or ddim only")
    num_classes, C, size = model.num_classes, model.in_channels, info["config"]["input_size"]
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= C:
        die(f"--cfg-channels {args.cfg_channels}: the model has {C} data channels")
    balanced = None
    if args.class_balanced:
        if args.num_fid_samples % num_classes:
            die(f"--class-balanced needs --num-fid-samples divisible by the {num_classes} classes "
                f"({args.num_fid_samples} is not); use e.g. {args.num_fid_samples // num_classes * num_classes or num_classes}")
        balanced = class_balanced_labels(args.num_fid_samples, num_classes, args.global_seed)
    try:  # fail on a bad respacing before any work
        steps_used = len(diffusion.space_timesteps(1000, args.timestep_respacing or args.num_steps)) \
            if sampler in ("ddpm", "ddim") else args.num_steps
    except ValueError as e:
        die(f"--timestep-respacing / --num-steps: {e}")

    vae_name = args.vae or ("none" if meta.get("vae") == "none" else meta.get("vae_id") or meta.get("vae") or "ema")
    vae = load_vae(vae_name, device)
    if vae is None:
        if C != 3:
            die(f"--vae none needs a 3-channel pixel model, but the model has {C} input channels; pass --vae")
        latent_scale, image_size = 1.0, size
    else:
        if vae.config.latent_channels != C:
            die(f"--vae {vae_name} has {vae.config.latent_channels} latent channels but the model takes {C}")
        latent_scale = meta.get("latent_scale", 0.18215)
        image_size = size * 2 ** (len(vae.config.block_out_channels) - 1)

    net = diffusion.ReverseTime(model) if info["reverse_time"] else model
    if cuda and args.compile:
        net = torch.compile(net, dynamic=False)  # B-row and 2B-row (guided) calls: one static graph each

    out = os.path.normpath(args.sample_dir)
    settings = {"ckpt": os.path.abspath(args.ckpt), "model": info["model"], "ema": args.ema, "vae": vae_name,
                "sampler": sampler, "num_steps": args.num_steps, "timestep_respacing": args.timestep_respacing,
                "eta": args.eta, "cfg_scale": args.cfg_scale, "guidance_low": args.guidance_low,
                "guidance_high": args.guidance_high, "cfg_channels": args.cfg_channels,
                "global_seed": args.global_seed, "class_balanced": args.class_balanced,
                "num_fid_samples": args.num_fid_samples if args.class_balanced else None,
                "image_size": image_size, "precision": args.precision if cuda else "fp32"}
    spath = os.path.join(out, "settings.json")
    if os.path.exists(spath):  # every rank checks, so every rank stops with the same message
        with open(spath) as fh:
            old = json.load(fh)
        if old != settings:
            differ = ", ".join(f"{k}: {old.get(k)} != {v}" for k, v in settings.items() if old.get(k) != v)
            die(f"--sample-dir {out} holds samples made with other settings ({differ}); "
                "choose another --sample-dir or delete it")
    barrier()
    if rank == 0 and not os.path.exists(spath):
        os.makedirs(out, exist_ok=True)
        with open(spath + ".tmp", "w") as fh:
            json.dump(settings, fh, indent=2)
        os.replace(spath + ".tmp", spath)
    barrier()
    logger = create_logger(out, rank, name="sample")
    n = args.num_fid_samples
    done = {int(f[:-4]) for f in os.listdir(out) if f.endswith(".png") and f[:-4].isdigit()}
    barrier()  # everyone has listed DIR before anyone writes to it
    todo = [i for i in range(n) if i not in done]
    mine = todo[rank::world]
    logger.info(f"{info['model']} ({'EMA' if args.ema else 'raw'} weights) from {args.ckpt}; sampler {sampler}, "
                f"{steps_used} steps, cfg {args.cfg_scale} on {args.cfg_channels or 'all'} channels for t in "
                f"[{args.guidance_low}, {args.guidance_high}]; vae {vae_name}, {image_size}px; "
                f"{n - len(todo)} of {n} samples exist, {len(todo)} to make on {world} process(es)")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and args.precision == "bf16")
    shape = (C, size, size)
    bar = tqdm(total=len(todo), unit="img", disable=rank != 0)
    # PNG encoding (~14 ms per 256 px image on one core) would otherwise leave the GPU idle
    png_pool, writing = ThreadPoolExecutor(max_workers=4), []
    start = time.time()
    for b in range(0, len(mine), args.per_proc_batch_size):
        idx = mine[b:b + args.per_proc_batch_size]
        gens, y, z = draw_batch(idx, shape, num_classes, args, balanced)

        def noise(gens=gens):  # drawn into pinned memory: the copy does not wait for the device
            n = torch.empty(len(gens), *shape, pin_memory=cuda)
            for row, g in zip(n, gens):
                torch.randn(shape, generator=g, out=row)
            return n.to(device, non_blocking=True)

        f = diffusion.guided_model(net, y.to(device), args.cfg_scale, args.guidance_low, args.guidance_high,
                                   args.cfg_channels, null_class=num_classes)
        kw = {"noise": noise} if sampler in ("ddpm", "ddim", "sde") else {}
        if sampler in ("ddpm", "ddim"):
            kw["spacing"] = args.timestep_respacing
        if sampler == "ddim":
            kw["eta"] = args.eta
        with autocast:
            x = diffusion.SAMPLERS[sampler](f, z.to(device), args.num_steps, **kw)
        images = to_uint8(x, vae, latent_scale)
        for job in writing:  # the previous batch's PNGs were encoded while this batch was sampled
            job.result()
        writing = [png_pool.submit(save_png, im, f"{out}/{i:06d}.png") for i, im in zip(idx, images)]
        bar.update(min(len(idx) * world, bar.total - bar.n))  # rank 0's pace stands for all
    for job in writing:
        job.result()
    png_pool.shutdown()
    bar.close()
    if todo:
        secs = time.time() - start
        logger.info(f"made {len(todo)} samples in {secs:.1f} s on {world} process(es): "
                    f"{len(todo) / max(secs, 1e-9):.2f} samples/s")
    barrier()

    if rank == 0:
        missing = [i for i in range(n) if not os.path.exists(f"{out}/{i:06d}.png")]
        if missing:
            die(f"{len(missing)} samples of {out} are missing (e.g. {missing[0]:06d}.png); run the same command again")
        if todo or not os.path.exists(f"{out}.npz"):
            arr = build_npz(out, n, logger, requested_labels(n, num_classes, args, balanced))
            if args.grid:
                save_grid(arr[:args.grid], f"{out}_grid.png")
                logger.info(f"wrote {out}_grid.png")
        else:
            logger.info(f"{out}.npz is complete; nothing to do")
    cleanup_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=str, required=True)
    parser.add_argument("--model", type=str, default=None,
                        help="network name for bare public checkpoints (DiT-XL/2, SiT-XL/2); ours store it")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="EMA weights of our checkpoints (--no-ema: the raw weights)")
    parser.add_argument("--vae", type=str, default=None,
                        help="ema, mse, hub id, local path or none (default: the dataset's, else ema)")
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--per-proc-batch-size", type=int, default=64)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--sampler", choices=list(diffusion.SAMPLERS), default=None,
                        help="default: ddpm for DiT-*, sde for SiT-*")
    parser.add_argument("--num-steps", type=int, default=250)
    parser.add_argument("--timestep-respacing", type=str, default=None,
                        help='DDPM/DDIM: guided-diffusion respacing such as "250" or "ddim50" (default: --num-steps)')
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--guidance-low", type=float, default=0.0)
    parser.add_argument("--guidance-high", type=float, default=1.0,
                        help="guidance only for t in [low, high] (t = 1 is noise; DDPM: t = step / 1000)")
    parser.add_argument("--cfg-channels", type=int, default=None,
                        help="guide only the first K output channels (3 reproduces DiT/SiT; default: all)")
    parser.add_argument("--class-balanced", action="store_true",
                        help="exactly N / num_classes samples per class (default: uniform random labels)")
    parser.add_argument("--grid", type=int, default=64, help="samples in DIR_grid.png (0: none)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the network on CUDA")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="network precision on CUDA: bf16 autocast, or fp32 with TF32 matmuls as the public "
                             "DiT/SiT/REPA sampling scripts (CPU is always fp32)")
    main(parser.parse_args())
