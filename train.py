"""
Train a DiT (DDPM, epsilon) or SiT (linear interpolant, velocity) on a dataset directory: the
full data or a condensed subset, with the same command.

Reads  DIR/latents.npy, labels.npy, meta.json; DIR/vis.npy when present (REPA-style alignment
       of the tokens after block --encoder-depth to the stored visual features, weight
       --proj-coeff); DIR/text.pt with --text-cond (DC-Embedding).
Writes RESULTS/checkpoints/0000100.pt ... (model, EMA, optimizer, step, args, RNG, data
       position, the model config and the dataset meta), RESULTS/log.txt.
Running the same command again continues from the newest checkpoint in RESULTS, exactly as an
uninterrupted run would.

    torchrun --nproc_per_node=8 train.py --data-path data/d2c10k --model SiT-L/2 \
        --text-cond --results-dir results/sit-l2-d2c10k --max-steps 100000
"""
import argparse
import functools
import glob
import os
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import atomic_save, cleanup_distributed, create_logger, die, fast_cuda_defaults, load_dataset, setup_distributed
from diffusion import DDPMSchedule, diffusion_loss, linear_betas, objective_of, projection_loss, sample_time
from models import SIZES, DiT_models

# Arguments that define a run: a resumed run must not change them.
RUN_DEFINING = ("data_path", "model", "global_batch_size", "global_seed", "text_cond", "proj_coeff",
                "encoder_depth", "learn_sigma", "qk_norm", "time_weighting", "use_vis")


class StepBatches(torch.utils.data.Dataset):
    """
    Item s = this rank's slice of the global batch of step s. The order is a fresh permutation
    of the data each epoch, and flips are drawn per position, both from (seed, epoch/step) only:
    the data seen at step s does not depend on the number of ranks, workers or restarts.
    """

    def __init__(self, data_path, use_vis, labels, global_batch, rank, world, seed):
        self.paths = [os.path.join(data_path, "latents.npy"), os.path.join(data_path, "vis.npy") if use_vis else None]
        self.labels, self.latents, self.vis = labels, None, None
        self.B, self.lo, self.hi = global_batch, rank * global_batch // world, (rank + 1) * global_batch // world
        self.seed, self.perms = seed, {}

    def __len__(self):
        return 2 ** 62

    def _perm(self, epoch):
        if epoch not in self.perms:
            self.perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))}
        return self.perms[epoch]

    def __getitem__(self, step):
        if self.latents is None:  # opened here so that each loader worker maps the files itself
            self.latents = np.load(self.paths[0], mmap_mode="r")
            self.vis = np.load(self.paths[1], mmap_mode="r") if self.paths[1] else None
        n = len(self.labels)
        pos = np.arange(step * self.B, (step + 1) * self.B)
        idx = np.concatenate([self._perm(e)[pos[pos // n == e] % n] for e in np.unique(pos // n)])[self.lo:self.hi]
        flip = (np.random.default_rng([self.seed, step, 1]).random(self.B) < 0.5)[self.lo:self.hi]
        order = np.argsort(idx)  # memmaps read fastest in ascending order
        inv = np.argsort(order)
        x = np.asarray(self.latents[idx[order]])[inv]
        if x.ndim == 5:                                    # (B, 2, C, H, W): pick the flip
            x = x[np.arange(len(idx)), flip.astype(np.int64)]
        out = [torch.from_numpy(x.astype(np.float32)), torch.from_numpy(self.labels[idx])]
        if self.vis is not None:
            v = np.asarray(self.vis[idx[order]])[inv]
            if v.ndim == 4:                                # (B, 2, h, D)
                v = v[np.arange(len(idx)), flip.astype(np.int64)]
            out.append(torch.from_numpy(v.astype(np.float32)))
        return out


def step_noise(args, objective, step, shape, device, lo, hi):
    """Noise, times and label-dropout mask of the global batch of one step, sliced to this rank."""
    g = torch.Generator(device=device).manual_seed(args.global_seed * 1_000_003 + step)
    B = shape[0]
    noise = torch.randn(shape, generator=g, device=device)[lo:hi]
    t = sample_time(objective, B, device, g, weighting=args.time_weighting)[lo:hi]
    drop = (torch.rand(B, generator=g, device=device) < args.class_dropout_prob)[lo:hi]
    return noise, t, drop


def default_encoder_depth(model_name):
    """REPA's block for the alignment: 8 for L and XL, 4 for the smaller sizes."""
    return 8 if model_name.split("-")[1].startswith(("L", "XL")) else 4


def set_activation_memory_budget(budget):
    """Below 1, torch.compile's partitioner keeps at most this fraction of the activations it would
    save for backward and recomputes the rest: the way to fit a larger batch (no effect eager)."""
    if not 0 < budget <= 1:
        die(f"--activation-memory-budget {budget}: use a fraction in (0, 1]")
    import torch._functorch.config as aot_config
    if not hasattr(aot_config, "activation_memory_budget"):
        if budget != 1:
            die(f"--activation-memory-budget needs a newer torch than {torch.__version__}: upgrade or leave the flag out")
        return
    aot_config.activation_memory_budget = budget


@torch.no_grad()
def update_ema(ema_params, params, decay):
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def train_step(net, model, opt, ema_params, x, y, vis, noise, t, drop, objective, schedule, autocast, args):
    """
    One optimisation step: L_diff (+ proj_coeff * L_proj with vis), backward, clipping, AdamW,
    EMA. net is the (DDP/compiled) model to call, model the bare one. Returns the two losses as
    detached device scalars, so the step never waits on the device.
    """
    with autocast:
        fwd = functools.partial(net, force_drop_ids=drop.long())
        loss_diff, zs = diffusion_loss(objective, fwd, x, y, t, noise, schedule)
        loss_diff = loss_diff.mean()
        loss_proj = projection_loss(zs, [vis]).mean() if vis is not None else torch.zeros((), device=x.device)
        loss = loss_diff + args.proj_coeff * loss_proj
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    opt.step()
    update_ema(ema_params, list(model.parameters()), args.ema_decay)
    return loss_diff.detach(), loss_proj.detach()


def check_inputs(args, world):
    """Every bad-input error, before anything is written."""
    if args.model not in DiT_models:
        die(f"--model {args.model} is unknown: choose one of {', '.join(DiT_models)}")
    if args.global_batch_size % world:
        die(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} ranks; "
            f"use a multiple of {world}")
    latents, labels, meta = load_dataset(args.data_path)
    vis = None
    vis_path = os.path.join(args.data_path, "vis.npy")
    if args.use_vis and os.path.exists(vis_path):
        vis = np.load(vis_path, mmap_mode="r")
        if len(vis) != len(labels):
            die(f"{vis_path} has {len(vis)} rows but the dataset has {len(labels)}: re-run attach.py for this directory")
        if vis.ndim not in (3, 4) or (vis.ndim == 4) != (latents.ndim == 5):
            die(f"{vis_path} has shape {vis.shape}; expected (N, h, D), or (N, 2, h, D) when latents store flips: re-run attach.py")
    text = None
    if args.text_cond:
        tp = os.path.join(args.data_path, "text.pt")
        if not os.path.exists(tp):
            die(f"--text-cond needs {tp}: run attach.py on {args.data_path} (or drop --text-cond)")
        text = torch.load(tp, map_location="cpu")
        if text["emb"].shape[0] != meta["num_classes"]:
            die(f"{tp} has {text['emb'].shape[0]} classes but meta.json says {meta['num_classes']}: re-run attach.py")
    H = latents.shape[-1]
    p = int(args.model.split("/")[-1])
    depth = SIZES[args.model.split("-")[1].split("/")[0]]["depth"]
    if H % p:
        die(f"latents of {args.data_path} are {H}x{H}, not divisible by the patch size of {args.model}")
    if vis is not None and vis.shape[-2] > (H // p) ** 2:
        die(f"{vis_path} has {vis.shape[-2]} tokens per image but {args.model} at {H}x{H} has {(H // p) ** 2}: "
            "re-run attach.py with a smaller --vis-tokens")
    if args.encoder_depth > depth:
        die(f"--encoder-depth {args.encoder_depth} exceeds the {depth} blocks of {args.model}")
    return latents, labels, meta, vis, text


def latest_checkpoint(results_dir):
    ckpts = sorted(glob.glob(os.path.join(results_dir, "checkpoints", "*.pt")))
    return ckpts[-1] if ckpts else None


def main(args):
    rank, world, device = setup_distributed()
    if args.encoder_depth is None:
        args.encoder_depth = default_encoder_depth(args.model)
    latents, labels, meta, vis, text = check_inputs(args, world)
    set_activation_memory_budget(args.activation_memory_budget)
    resume = latest_checkpoint(args.results_dir)
    ckpt = torch.load(resume, map_location="cpu", weights_only=False) if resume else None
    if ckpt is not None:
        for k in RUN_DEFINING:
            if ckpt["args"].get(k) != vars(args).get(k):
                die(f"{args.results_dir} holds a run with --{k.replace('_', '-')} {ckpt['args'].get(k)}, not "
                    f"{vars(args).get(k)}: use the same flags to resume, or another --results-dir")

    cuda = device.type == "cuda"
    if cuda:
        fast_cuda_defaults()
    torch.manual_seed(args.global_seed)  # same initial weights on every rank
    objective = objective_of(args.model)
    C, H = latents.shape[-3], latents.shape[-1]
    kwargs = dict(input_size=H, in_channels=C, num_classes=meta["num_classes"], qk_norm=args.qk_norm,
                  learn_sigma=args.learn_sigma if args.learn_sigma is not None else objective == "ddpm",
                  class_dropout_prob=args.class_dropout_prob)
    if vis is not None:
        kwargs.update(z_dims=[vis.shape[-1]], encoder_depth=args.encoder_depth)
    if text is not None:
        kwargs.update(text_len=text["emb"].shape[1], text_dim=text["emb"].shape[2])
    model = DiT_models[args.model](**kwargs)
    if text is not None:
        model.y_embedder.text_emb.copy_(text["emb"].float())
        model.y_embedder.text_mask.copy_(text["mask"].bool())
    ema = deepcopy(model).requires_grad_(False)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
    model.to(device)
    ema.to(device).eval()
    # Built after the move: load_state_dict puts the moments on the parameters' device.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, 0.999), weight_decay=args.weight_decay, fused=cuda)
    step = 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    ddp = DDP(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    compile_on = cuda if args.compile is None else args.compile
    net = torch.compile(ddp) if compile_on else ddp
    ema_params = list(ema.parameters())

    if rank == 0:
        os.makedirs(os.path.join(args.results_dir, "checkpoints"), exist_ok=True)
    logger = create_logger(args.results_dir, rank)
    logger.info(f"{args.model} ({objective}) on {args.data_path}: {len(labels)} images, latents {tuple(latents.shape[1:])}, "
                f"{sum(p.numel() for p in model.parameters()):,} parameters, vis={'yes' if vis is not None else 'no'}, "
                f"text={'yes' if text is not None else 'no'}, {world} ranks, compile={compile_on}")
    if resume:
        logger.info(f"resumed from {resume} at step {step}")
    if step >= args.max_steps:
        logger.info(f"already at step {step} >= --max-steps {args.max_steps}; nothing to do")
        cleanup_distributed()
        return

    data = StepBatches(args.data_path, vis is not None, labels, args.global_batch_size, rank, world, args.global_seed)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(step, args.max_steps),
                                         num_workers=args.num_workers, pin_memory=cuda,
                                         persistent_workers=args.num_workers > 0)
    schedule = DDPMSchedule(linear_betas(1000))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and args.precision == "bf16")
    lo, hi = data.lo, data.hi
    shape = (args.global_batch_size, C, H, H)
    run_loss = torch.zeros(2, device=device)
    log_steps, t0 = 0, time.time()
    writer = None
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.results_dir, "tb"))

    model.train()
    for batch in tqdm(loader, initial=step, total=args.max_steps, disable=rank != 0, dynamic_ncols=True):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        noise, t, drop = step_noise(args, objective, step, shape, device, lo, hi)
        vis_batch = batch[2].to(device, non_blocking=True) if vis is not None else None
        losses = train_step(net, model, opt, ema_params, x, y, vis_batch, noise, t, drop, objective, schedule, autocast, args)
        run_loss += torch.stack(losses)
        step += 1
        log_steps += 1

        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.max_steps:
            if world > 1:
                dist.all_reduce(run_loss)
            avg = (run_loss / (log_steps * world)).tolist()
            if not all(np.isfinite(avg)):
                last = latest_checkpoint(args.results_dir)
                die(f"loss became {avg[0]} (non-finite) before step {step}; the last good checkpoint is "
                    f"{last or 'none'}: lower --lr or check the data")
            if step % args.log_every == 0 or step == args.max_steps:
                dt = time.time() - t0
                logger.info(f"step {step:07d} loss {avg[0]:.4f} proj {avg[1]:.4f} "
                            f"steps/s {log_steps / dt:.2f} img/s {log_steps * args.global_batch_size / dt:.1f}")
                if writer:
                    writer.add_scalar("loss", avg[0], step)
                    writer.add_scalar("proj_loss", avg[1], step)
            run_loss.zero_()
            log_steps, t0 = 0, time.time()
        if (step % args.ckpt_every == 0 or step == args.max_steps) and rank == 0:
            path = os.path.join(args.results_dir, "checkpoints", f"{step:07d}.pt")
            atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "args": vars(args), "step": step, "data_pos": step * args.global_batch_size,
                         "rng": {"torch": torch.get_rng_state()},
                         "config": {"model": args.model, "kwargs": kwargs}, "meta": meta}, path)
            logger.info(f"saved {path}")
        if step >= args.max_steps:
            break
    logger.info("done")
    cleanup_distributed()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="dataset directory (encode.py / attach.py output)")
    p.add_argument("--results-dir", required=True, help="this run's directory; rerunning resumes from it")
    p.add_argument("--model", default="SiT-XL/2", help="DiT-* (DDPM) or SiT-* (interpolant), e.g. DiT-L/2")
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--class-dropout-prob", type=float, default=0.1)
    p.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="learned variance (default: on for DiT, off for SiT)")
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--time-weighting", choices=["uniform", "lognormal"], default="uniform", help="SiT time sampling")
    p.add_argument("--proj-coeff", type=float, default=0.5, help="weight of the alignment loss (with vis.npy)")
    p.add_argument("--encoder-depth", type=int, default=None, help="block after which tokens are aligned (default 8 for L/XL, 4 for S/B)")
    p.add_argument("--vis", dest="use_vis", action=argparse.BooleanOptionalAction, default=True,
                   help="align to DIR/vis.npy when present (--no-vis ignores it)")
    p.add_argument("--text-cond", action="store_true", help="DC-Embedding from DIR/text.pt")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast on CUDA; CPU is always fp32")
    p.add_argument("--activation-memory-budget", type=float, default=1.0,
                   help="with --compile, a fraction in (0, 1] of the activations to keep for backward; lower "
                        "recomputes more to fit a larger batch (bench.py --only memory measures the need)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=10_000)
    p.add_argument("--tensorboard", action="store_true", help="also log to RESULTS/tb")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
