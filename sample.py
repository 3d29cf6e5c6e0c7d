"""
Sample images from a DiT/SiT checkpoint for FID evaluation.

Reads:  --ckpt, a train.py checkpoint (network config, EMA weights and dataset meta inside) or a
        public one: DiT-XL-2-256x256.pt / DiT-XL-2-512x512.pt and SiT-XL-2-256x256.pt (bare state
        dicts: pass --model), SiT's and REPA's training checkpoints. The VAE comes from the dataset
        meta, else --vae.
Writes: DIR/000000.png ... one PNG per sample index, DIR/request.json (what the samples depend on)
        and DIR/log.txt; DIR.npz (arr_0 uint8 (N, H, W, 3) in index order for the ADM evaluator,
        labels = the class asked for by each sample); DIR_grid.png, the first --grid samples
        (small images upscaled to at least 256 px wide). A grayscale dataset (meta.json channels
        1) gives grayscale ("L") PNGs and grid; its arr_0 stays (N, H, W, 3), three equal
        channels, the format the ADM evaluator reads. DIR is built in DIR.partial and renamed
        when complete; a killed job keeps its finished chunks there: run the same command again
        (any number of processes). A DIR made with other settings is refused (--overwrite).
Sample i depends only on --global-seed, i and the settings, not on the number of processes
or the batch size: its label, initial noise and every stochastic step's noise come from its
own generator, seeded with common.item_seed(global_seed, i).
On CUDA the network runs compiled in bf16 autocast; --precision fp32 samples in fp32 with TF32
matmuls, as the public DiT/SiT/REPA sampling scripts do. On CPU fp32, or bf16 autocast with
--precision bf16 where the CPU has native bf16.
The EMA weights of a train.py checkpoint are refused while they still give the initial weights
more than 1% (a short run with a fixed --ema-decay): they would sample noise.

    torchrun --nproc_per_node=8 sample.py --ckpt results/dit-l2-d2c10k/checkpoints/0100000.pt \\
        --num-fid-samples 50000 --cfg-scale 1.5 --sample-dir samples/dit-l2-d2c10k
"""
import argparse
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

import diffusion
from common import (Output, add_compile_flag, add_precision_flag, add_time_convention_flag, atomic_write,
                    check_output, cleanup_distributed, compile_on, create_logger, die, item_seed, load_model,
                    load_vae, parser, progress, run, setup_distributed, use_bf16)


def class_balanced_labels(n, num_classes, global_seed):
    """Exactly n / num_classes samples per class, in an order fixed by the seed (same on every rank)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(item_seed(global_seed, -1)))
    return (torch.arange(n) % num_classes)[perm]


def draw_batch(indices, shape, num_classes, global_seed, balanced):
    """Per-sample generators (kept for the sampler's noise), labels and initial noise."""
    gens = [torch.Generator().manual_seed(item_seed(global_seed, i)) for i in indices]
    # the random label is drawn even when balanced labels replace it, so the noise stays the same
    labels = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])
    if balanced is not None:
        labels = balanced[indices]
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return gens, labels, z


def requested_labels(n, num_classes, global_seed, balanced):
    """The class asked for by every sample index (the first draw of its generator, as draw_batch)."""
    if balanced is not None:
        return balanced.numpy()
    return np.array([int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(
        item_seed(global_seed, i)))) for i in range(n)], dtype=np.int64)


ROUNDING = {
    # REPA's generate.py and ADM: clamp(255 (x + 1) / 2), truncated, i.e. rounded down
    "floor": lambda x: (255.0 * (x + 1) / 2).clamp(0, 255),
    # DiT's and SiT's sample_ddp.py: clamp(127.5 x + 128), truncated, i.e. 127.5 (x + 1) rounded half up
    "half-up": lambda x: (127.5 * x + 128.0).clamp(0, 255),
}


# ITU-R 601 luma, PIL's "L": what encode.py made of a grayscale image, and so what a VAE's RGB goes back to
LUMA = (0.299, 0.587, 0.114)


def to_uint8(x, vae, latent_scale, rounding="floor", gray=False):
    """Latents (or [-1, 1] pixels without a VAE) -> uint8 (N, H, W, C): C = 1 for a pixel model of one
    channel, or with gray the luma of the VAE's RGB; else 3."""
    if vae is not None:
        x = vae.decode(x / latent_scale).sample.float()
        if gray:
            x = sum(w * c for w, c in zip(LUMA, x.unbind(1)))[:, None]
    return ROUNDING[rounding](x.float()).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(image, path):
    """uint8 (H, W, 3) as RGB, (H, W, 1) as grayscale ("L")."""
    image = image[..., 0] if image.shape[-1] == 1 else image
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def save_grid(images, path, min_width=256, gray=False):
    """A square-ish grid of the images (N, H, W, 3), upscaled (nearest) to at least min_width pixels wide;
    with gray a grayscale PNG of the first channel."""
    k, (h, w) = len(images), images.shape[1:3]
    images = images[..., :1] if gray else images
    cols = math.ceil(math.sqrt(k))
    grid = np.zeros((math.ceil(k / cols) * h, cols * w, images.shape[-1]), np.uint8)
    for j, im in enumerate(images):
        r, c = divmod(j, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    s = max(1, math.ceil(min_width / grid.shape[1]))
    save_png(grid.repeat(s, 0).repeat(s, 1), path)


def build_npz(folder, n, labels, path):
    """Stack folder/000000.png ... into path (arr_0 uint8 NHWC and the requested `labels`); grayscale
    PNGs become three equal channels."""
    first = np.asarray(Image.open(f"{folder}/{0:06d}.png").convert("RGB"))
    arr = np.empty((n, *first.shape), np.uint8)
    for i in progress(range(n), desc="npz", leave=False):
        arr[i] = np.asarray(Image.open(f"{folder}/{i:06d}.png").convert("RGB"))

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, arr_0=arr, labels=labels)
    atomic_write(path, write)
    return arr


def check_ema(info, args, limit=0.01):
    """Refuse EMA weights that are still mostly the initialisation: sampling them gives noise."""
    ema = info["ema"]
    if not args.ema or ema is None or ema["init_weight"] is None or ema["init_weight"] <= limit:
        return
    how = f"--ema-decay {ema['decay']}{' with --ema-warmup' if ema['warmup'] else ''} after {ema['step']} steps"
    die(f"--ckpt {args.ckpt}: its EMA weights are still {ema['init_weight']:.1%} the initialisation ({how}; "
        f"more than {limit:.0%}): train longer (a fixed decay forgets the start after ~5 / (1 - decay) steps), "
        "retrain with train.py --ema-warmup, or sample the raw weights with --no-ema")


def check_args(args):
    if min(args.num_fid_samples, args.per_proc_batch_size, args.num_steps, args.chunk_size) < 1:
        die("--num-fid-samples, --per-proc-batch-size, --num-steps and --chunk-size must be positive")
    if not 0 <= args.guidance_low <= args.guidance_high <= 1:
        die(f"--guidance-low {args.guidance_low} / --guidance-high {args.guidance_high}: need 0 <= low <= high <= 1")
    if args.grid < 0:
        die(f"--grid {args.grid} must be >= 0")


def pick_sampler(args, info, num_classes, C):
    """(sampler name, network evaluations per sample without guidance), or a clear error."""
    sampler = args.sampler or ("ddpm" if info["objective"] == "ddpm" else "sde")
    if diffusion.SAMPLER_OBJECTIVE[sampler] != info["objective"]:
        ok = [k for k, v in diffusion.SAMPLER_OBJECTIVE.items() if v == info["objective"]]
        die(f"--sampler {sampler} does not fit {info['model']} ({info['objective']} objective): use one of {', '.join(ok)}")
    if args.timestep_respacing and sampler not in ("ddpm", "ddim"):
        die("--timestep-respacing applies to --sampler ddpm or ddim only")
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= C:
        die(f"--cfg-channels {args.cfg_channels}: the model has {C} data channels")
    if args.class_balanced and args.num_fid_samples % num_classes:
        die(f"--class-balanced needs --num-fid-samples divisible by the {num_classes} classes ({args.num_fid_samples} "
            f"is not); use e.g. {args.num_fid_samples // num_classes * num_classes or num_classes}")
    if sampler not in ("ddpm", "ddim"):
        return sampler, args.num_steps
    try:
        return sampler, len(diffusion.space_timesteps(diffusion.NUM_TIMESTEPS, args.timestep_respacing or args.num_steps))
    except ValueError as e:
        die(f"--timestep-respacing / --num-steps: {e}")


def decoder(args, meta, C, size, device):
    """(VAE or None, latent scale, image size) for the model's C x size x size outputs."""
    vae = load_vae(args.vae, device)
    if vae is None:
        if C not in (1, 3):
            die(f"--vae none needs a pixel model of 1 (grayscale) or 3 (RGB) channels, but the model has {C} input "
                "channels; pass --vae")
        return None, 1.0, size
    if vae.config.latent_channels != C:
        die(f"--vae {args.vae} has {vae.config.latent_channels} latent channels but the model takes {C}")
    return vae, meta.get("latent_scale", 0.18215), size * 2 ** (len(vae.config.block_out_channels) - 1)


def sample_batch(net, sampler, idx, shape, num_classes, balanced, args, device, pad_to=None, bf16=False):
    """Samples (len(idx), *shape) of the indices; with pad_to, padded rows keep the compiled shape."""
    gens, y, z = draw_batch(idx, shape, num_classes, args.global_seed, balanced)
    B = len(idx)
    if pad_to and B < pad_to:  # rows with their own generators: the real samples stay unchanged
        gens += [torch.Generator().manual_seed(0) for _ in range(pad_to - B)]
        y, z = torch.cat([y, y[:1].expand(pad_to - B)]), torch.cat([z, z[:1].expand(pad_to - B, *shape)])
    cuda = device.type == "cuda"

    def noise():  # drawn into pinned memory: the copy does not wait for the device
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
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return diffusion.SAMPLERS[sampler](f, z.to(device), args.num_steps, **kw)[:B]


def main(args):
    torch.set_grad_enabled(False)
    check_args(args)
    out_dir = os.path.normpath(args.sample_dir)
    for path in (out_dir, out_dir + ".npz", out_dir + "_grid.png"):
        check_output(path, [args.ckpt], "--sample-dir")
    rank, world, device = setup_distributed()
    model, info = load_model(args.ckpt, args.model, use_ema=args.ema, device=device, time_conv=args.time_convention)
    check_ema(info, args)
    meta = info["meta"] or {}
    bf16 = use_bf16(args.precision, device, log=print if rank == 0 else lambda _: None)
    num_classes, C, size = model.num_classes, model.in_channels, info["config"]["input_size"]
    sampler, steps_used = pick_sampler(args, info, num_classes, C)
    args.vae = args.vae or ("none" if meta.get("vae") == "none" else meta.get("vae_id") or meta.get("vae") or "ema")
    request = dict(ckpt=os.path.abspath(args.ckpt), model=info["model"], sampler=sampler,
                   reverse_time=info["reverse_time"], precision="bf16" if bf16 else "fp32",
                   **{k: getattr(args, k) for k in ("ema", "vae", "num_steps", "timestep_respacing", "eta", "cfg_scale",
                                                    "guidance_low", "guidance_high", "cfg_channels", "global_seed",
                                                    "class_balanced", "num_fid_samples", "rounding")})
    n = args.num_fid_samples
    balanced = class_balanced_labels(n, num_classes, args.global_seed) if args.class_balanced else None
    out = Output(out_dir, request, rank, world, args.overwrite, args.stop_after_chunks, flag="--sample-dir")
    if out.complete:
        if rank == 0 and not os.path.exists(out_dir + ".npz"):
            build_npz(out_dir, n, requested_labels(n, num_classes, args.global_seed, balanced), out_dir + ".npz")
        return cleanup_distributed()

    vae, latent_scale, image_size = decoder(args, meta, C, size, device)
    gray = meta.get("channels", C) == 1  # a grayscale dataset, in pixels or through a VAE as RGB
    net = diffusion.ReverseTime(model) if info["reverse_time"] else model
    compiled = compile_on(args, device)
    if compiled:
        net = torch.compile(net, dynamic=False)  # B-row and 2B-row (guided) calls: one static graph each
    out.start(n, args.chunk_size)
    logger = create_logger(out.partial, rank, name="sample")
    logger.info(f"{info['model']} ({'EMA' if args.ema else 'raw'} weights) from {args.ckpt}; sampler {sampler}, "
                f"{steps_used} steps, cfg {args.cfg_scale} on {args.cfg_channels or 'all'} channels for t in "
                f"[{args.guidance_low}, {args.guidance_high}]; vae {args.vae}, {image_size}px"
                f"{' grayscale' if gray else ''}, {'bf16 autocast' if bf16 else 'fp32'}; "
                f"{out.summary('samples')} on {world} process(es)")

    # PNG encoding (~14 ms per 256 px image on one core) would otherwise leave the GPU idle
    pool, writing, start, made = ThreadPoolExecutor(max_workers=4), [], time.time(), 0
    with progress(total=out.remaining(), rank=rank, unit="img", desc="sample") as bar:
        for idx in out.batches(args.per_proc_batch_size):
            x = sample_batch(net, sampler, idx, (C, size, size), num_classes, balanced, args, device,
                             args.per_proc_batch_size if compiled else None, bf16)
            images = to_uint8(x, vae, latent_scale, args.rounding, gray)
            for rows, jobs in writing:  # the previous batch's PNGs were encoded while this batch was sampled
                [job.result() for job in jobs]
                out.written(rows)
            writing = [(idx, [pool.submit(save_png, im, out.path(f"{i:06d}.png")) for i, im in zip(idx, images)])]
            made += len(idx)
            bar.update(min(len(idx) * world, bar.total - bar.n))  # rank 0's pace stands for all
        for rows, jobs in writing:
            [job.result() for job in jobs]
            out.written(rows)
    pool.shutdown()
    if made:
        logger.info(f"made {made} samples in {time.time() - start:.1f} s on rank {rank}")
    out.end_chunks()

    if rank == 0:
        arr = build_npz(out.partial, n, requested_labels(n, num_classes, args.global_seed, balanced), out_dir + ".npz")
        logger.info(f"wrote {out_dir}.npz, arr_0 {arr.shape} uint8")
        if args.grid:
            save_grid(arr[:args.grid], f"{out_dir}_grid.png", gray=gray)
            logger.info(f"wrote {out_dir}_grid.png")
        out.commit(logger)
    cleanup_distributed()


def get_parser():
    p = parser(__doc__)
    p.add_argument("--ckpt", type=str, required=True, help="train.py checkpoint, or a public DiT/SiT/REPA one")
    p.add_argument("--model", type=str, default=None,
                   help="network of checkpoints that do not name it (bare DiT-XL/2, SiT-XL/2 files); ours store it")
    add_time_convention_flag(p)
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA weights of our checkpoints (--no-ema: the raw weights)")
    p.add_argument("--vae", type=str, default=None,
                   help="ema, mse, hub id, local path or none (default: the dataset's, else ema)")
    p.add_argument("--sample-dir", type=str, default="samples", help="DIR: the PNGs; DIR.npz and DIR_grid.png beside it")
    p.add_argument("--num-fid-samples", type=int, default=50_000, help="number of samples")
    p.add_argument("--per-proc-batch-size", type=int, default=64, help="samples per batch on each process")
    p.add_argument("--global-seed", type=int, default=0, help="seeds every sample's label and noises")
    p.add_argument("--sampler", choices=list(diffusion.SAMPLERS), default=None,
                   help="default: ddpm for DiT-*, sde for SiT-*. heun-sit corrects every step (SiT), heun-repa "
                        "all but the last (REPA's --mode ode --heun)")
    p.add_argument("--num-steps", type=int, default=250, help="sampler steps")
    p.add_argument("--timestep-respacing", type=str, default=None,
                   help='DDPM/DDIM: guided-diffusion respacing such as "250" or "ddim50" (default: --num-steps)')
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1: none)")
    p.add_argument("--guidance-low", type=float, default=0.0, help="guidance only for t >= this (t = 1 is noise)")
    p.add_argument("--guidance-high", type=float, default=1.0,
                   help="guidance only for t <= this (t = 1 is noise; DDPM: t = step / 1000)")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first K output channels (3 reproduces DiT/SiT; default: all)")
    p.add_argument("--class-balanced", action="store_true",
                   help="exactly N / num_classes samples per class (default: uniform random labels)")
    p.add_argument("--rounding", choices=list(ROUNDING), default="floor",
                   help="pixels to uint8: floor = REPA/ADM (255 (x + 1) / 2 rounded down), half-up = DiT/SiT "
                        "sample_ddp.py (127.5 x + 128 truncated)")
    p.add_argument("--grid", type=int, default=64, help="samples in DIR_grid.png (0: none)")
    p.add_argument("--chunk-size", type=int, default=256,
                   help="samples per resumable unit of work (a killed run loses at most one chunk per process)")
    add_compile_flag(p)
    add_precision_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace a DIR made with other settings")
    p.add_argument("--stop-after-chunks", type=int, default=None,
                   help="for testing resumption only: stop (exit status 1) after each process finished this many "
                        "chunks, as if the job had been killed")
    return p


if __name__ == "__main__":
    run(main, get_parser().parse_args())
