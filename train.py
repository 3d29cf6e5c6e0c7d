"""
Train a DiT (DDPM, epsilon) or SiT (linear interpolant, velocity) on a dataset directory: the
full data or a condensed subset, with the same command.

Reads  DIR/latents.npy, labels.npy, meta.json; DIR/vis.npy when present (REPA-style alignment
       of the tokens after block --encoder-depth to the stored visual features, weight
       --proj-coeff); DIR/text.pt with --text-cond (DC-Embedding).
Writes RESULTS/checkpoints/0000100.pt ... (model, EMA, optimizer, step, args, the model config,
       the dataset meta and ema_init_weight, the weight the EMA still gives the initial weights,
       which sample.py checks), RESULTS/log.txt.
Running the same command again continues from the newest readable checkpoint in RESULTS, exactly
as an uninterrupted run would. Ctrl-C or SIGTERM (a cluster's preemption notice) finishes the
current step on every rank, saves a checkpoint at it and stops; a second one stops at once.

    torchrun --nproc_per_node=8 train.py --data-path data/d2c10k --model SiT-L/2 \\
        --text-cond --results-dir results/sit-l2-d2c10k --max-steps 100000
"""
import argparse
import functools
import os
import signal
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (add_compile_flag, add_precision_flag, atomic_save, check_output, cleanup_distributed, compile_on,
                    create_logger, die, ema_decay_at, ema_init_weight, item_seed, load_array, load_dataset,
                    newest_checkpoint, ema_of_checkpoint, parser, progress, quiet_worker, run, setup_distributed,
                    use_bf16)
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


def step_noise(objective, step, shape, device, lo=0, hi=None, *, global_seed=0, time_weighting="uniform",
               class_dropout_prob=0.1):
    """Noise, times and label-dropout mask of the global batch `shape` of one step, rows lo:hi of it."""
    g = torch.Generator(device=device).manual_seed(item_seed(global_seed, step))
    B = shape[0]
    noise = torch.randn(shape, generator=g, device=device)[lo:hi]
    t = sample_time(objective, B, device, g, weighting=time_weighting)[lo:hi]
    drop = (torch.rand(B, generator=g, device=device) < class_dropout_prob)[lo:hi]
    return noise, t, drop


def make_step(model, ema, opt, objective, *, net=None, bf16=False, proj_coeff=0.5, max_grad_norm=1.0,
              ema_decay=0.9999):
    """
    train.py's optimisation step: returns step(x, y, vis, noise, t, drop, decay=ema_decay) ->
    (L_diff, L_proj) as detached device scalars (the step never waits on the device), after
    L_diff + proj_coeff * L_proj (vis=None: no alignment) in bf16 autocast (fp32 weights, moments
    and losses) or fp32, backward, clipping, AdamW and the EMA update with this step's decay. net
    is what to call (DDP-wrapped or compiled), model the bare network.
    """
    net, schedule = model if net is None else net, DDPMSchedule(linear_betas())  # a compiled module has no truth value
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def step(x, y, vis, noise, t, drop, decay=ema_decay):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            fwd = functools.partial(net, force_drop_ids=drop.long())
            loss_diff, zs = diffusion_loss(objective, fwd, x, y, t, noise, schedule)
            loss_diff = loss_diff.mean()
            loss_proj = projection_loss(zs, [vis]).mean() if vis is not None else torch.zeros((), device=x.device)
            loss = loss_diff + proj_coeff * loss_proj
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        return loss_diff.detach(), loss_proj.detach()
    return step


def warn_short_ema(args, logger, horizons=5):
    """One warning line when a fixed EMA decay cannot forget the initial weights within --max-steps:
    after n steps the EMA still gives them decay ** n, about exp(-5) < 1% after 5 horizons of
    1 / (1 - decay) steps."""
    horizon = 1 / (1 - args.ema_decay)
    if args.ema_warmup or args.max_steps >= horizons * horizon:
        return
    left = ema_init_weight(args.max_steps, args.ema_decay)
    logger.info(f"warning: --max-steps {args.max_steps} is shorter than {horizons} horizons of --ema-decay "
                f"{args.ema_decay} ({horizons} x {horizon:.0f} = {horizons * horizon:.0f} steps): the EMA weights will "
                f"still be {left:.0%} the initialisation and sample.py will refuse them; add --ema-warmup, lower "
                f"--ema-decay (e.g. {max(0.0, 1 - horizons / args.max_steps):.4g}) or raise --max-steps")


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


def check_inputs(args, world):
    """Every bad-input error, before anything is written: (latents, labels, meta, vis or None, text or None)."""
    if args.model not in DiT_models:
        die(f"--model {args.model} is unknown: choose one of {', '.join(DiT_models)}")
    if args.global_batch_size % world or args.global_batch_size < 1:
        die(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} ranks; use a positive "
            f"multiple of {world}")
    if min(args.max_steps, args.log_every, args.ckpt_every) < 1:
        die("--max-steps, --log-every and --ckpt-every must be positive")
    if not 0 <= args.ema_decay < 1:
        die(f"--ema-decay {args.ema_decay}: use a decay in [0, 1), e.g. 0.9999 (the paper's) or 0.999 for short runs")
    check_output(args.results_dir, [args.data_path], "--results-dir")
    latents, labels, meta = load_dataset(args.data_path)
    vis, vis_path = None, os.path.join(args.data_path, "vis.npy")
    if args.use_vis and os.path.exists(vis_path):
        vis = load_array(vis_path, f"re-run attach.py for {args.data_path}, or pass --no-vis")
        if len(vis) != len(labels) or vis.ndim not in (3, 4) or (vis.ndim == 4) != (latents.ndim == 5):
            die(f"{vis_path} has shape {vis.shape} for {len(labels)} rows; expected (N, h, D), or (N, 2, h, D) when "
                f"the latents store flips: re-run attach.py for {args.data_path}, or pass --no-vis")
    text, tp = None, os.path.join(args.data_path, "text.pt")
    if args.text_cond:
        try:
            text = torch.load(tp, map_location="cpu")
            ok = text["emb"].ndim == 3 and text["mask"].shape == text["emb"].shape[:2]
        except Exception:  # noqa: BLE001 (missing, truncated or not ours)
            ok = False
        if not ok or text["emb"].shape[0] != meta["num_classes"]:
            die(f"--text-cond needs {tp} with the class texts of the {meta['num_classes']} classes: run attach.py on "
                f"{args.data_path} (or drop --text-cond)")
    H, p = latents.shape[-1], int(args.model.split("/")[-1])
    if H % p or latents.shape[-2] != H:
        die(f"latents of {args.data_path} are {latents.shape[-2]}x{H}, not square and divisible by the patch size {p} "
            f"of {args.model}: pick a patch size that divides {H} (e.g. {args.model.split('/')[0]}/{2 if H % 2 == 0 else 1})")
    if vis is not None and vis.shape[-2] > (H // p) ** 2:
        die(f"{vis_path} has {vis.shape[-2]} tokens per image but {args.model} at {H}x{H} has {(H // p) ** 2}: "
            "re-run attach.py with a smaller --vis-tokens")
    if args.encoder_depth > SIZES[args.model.split("-")[1].split("/")[0]]["depth"]:
        die(f"--encoder-depth {args.encoder_depth} exceeds the blocks of {args.model}")
    return latents, labels, meta, vis, text


def build(args, latents, meta, vis, text, ckpt):
    """(model, EMA copy, constructor kwargs): initialised from --global-seed, or from the checkpoint."""
    torch.manual_seed(args.global_seed)  # same initial weights on every rank
    kwargs = dict(input_size=latents.shape[-1], in_channels=latents.shape[-3], num_classes=meta["num_classes"],
                  qk_norm=args.qk_norm, class_dropout_prob=args.class_dropout_prob,
                  learn_sigma=args.learn_sigma if args.learn_sigma is not None else objective_of(args.model) == "ddpm")
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
        for k in RUN_DEFINING:
            if ckpt["args"].get(k) != vars(args).get(k):
                die(f"{args.results_dir} holds a run with --{k.replace('_', '-')} {ckpt['args'].get(k)}, not "
                    f"{vars(args).get(k)}: use the same flags to resume, or another --results-dir")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
    return model, ema, kwargs


def stop_requests(world):
    """Ctrl-C / SIGTERM ask for a stop after the current step (a second one stops at once). Returns
    requested() -> the signal number or 0, the same on every rank: a CPU all-reduce over gloo, so
    the training step never waits for it on the GPU."""
    got = [0]

    def handler(signum, frame):
        if got[0]:
            raise KeyboardInterrupt
        got[0] = signum
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    group = dist.new_group(backend="gloo") if world > 1 else None

    def requested():
        if group is None:
            return got[0]
        flag = torch.tensor([got[0]])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag)
    return requested


def tensorboard(results_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        die("--tensorboard needs the tensorboard package: pip install tensorboard, or leave the flag out")
    return SummaryWriter(os.path.join(results_dir, "tb"))


def main(args):
    rank, world, device = setup_distributed()
    requested = stop_requests(world)
    cuda = device.type == "cuda"
    args.encoder_depth = args.encoder_depth or default_encoder_depth(args.model)
    latents, labels, meta, vis, text = check_inputs(args, world)
    set_activation_memory_budget(args.activation_memory_budget)
    resume, ckpt = newest_checkpoint(args.results_dir, warn=print if rank == 0 else lambda _: None)
    model, ema, kwargs = build(args, latents, meta, vis, text, ckpt)
    model.to(device).train()
    ema.to(device).eval()
    # built after the move: load_state_dict then puts the moments on the parameters' device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.weight_decay, fused=True)
    step = 0 if ckpt is None else ckpt["step"]
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
    net = DDP(model, device_ids=[device.index] if cuda else None) if dist.is_initialized() else model
    net = torch.compile(net) if compile_on(args, device) else net
    logger = create_logger(args.results_dir, rank)
    bf16 = use_bf16(args.precision, device, log=logger.info)
    train_step = make_step(model, ema, opt, objective_of(args.model), net=net, bf16=bf16,
                           proj_coeff=args.proj_coeff, max_grad_norm=args.max_grad_norm, ema_decay=args.ema_decay)
    # the weight the EMA still gives the initial weights: sample.py refuses an EMA that is mostly initialisation
    init_weight = 1.0 if ckpt is None else ema_of_checkpoint(ckpt)["init_weight"]
    logger.info(f"{args.model} on {args.data_path}: {len(labels)} images, latents {tuple(latents.shape[1:])}, "
                f"{sum(p.numel() for p in model.parameters()):,} parameters, vis={vis is not None}, "
                f"text={text is not None}, {world} ranks, compile={compile_on(args, device)}, "
                f"{'bf16 autocast' if bf16 else 'fp32'}" + (f"; resumed from {resume} at step {step}" if resume else ""))
    warn_short_ema(args, logger)

    data = StepBatches(args.data_path, vis is not None, labels, args.global_batch_size, rank, world, args.global_seed)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(step, args.max_steps), pin_memory=cuda,
                                         num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                                         worker_init_fn=quiet_worker)
    shape = (args.global_batch_size, latents.shape[-3], latents.shape[-1], latents.shape[-1])
    noise_args = dict(global_seed=args.global_seed, time_weighting=args.time_weighting,
                      class_dropout_prob=args.class_dropout_prob)
    run_loss, log_steps, t0, stopped = torch.zeros(2, device=device), 0, time.time(), 0
    writer = tensorboard(args.results_dir) if args.tensorboard and rank == 0 else None
    for batch in progress(loader, rank=rank, initial=step, total=args.max_steps):
        x, y, *v = (b.to(device, non_blocking=True) for b in batch)
        noise, t, drop = step_noise(objective_of(args.model), step, shape, device, data.lo, data.hi, **noise_args)
        decay = ema_decay_at(step, args.ema_decay, args.ema_warmup)
        run_loss += torch.stack(train_step(x, y, v[0] if v else None, noise, t, drop, decay))
        init_weight *= decay
        step, log_steps = step + 1, log_steps + 1
        stopped = requested()
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.max_steps or stopped:
            if world > 1:
                dist.all_reduce(run_loss)
            avg = (run_loss / (log_steps * world)).tolist()
            if not all(np.isfinite(avg)):
                die(f"loss became {avg[0]} (non-finite) before step {step}; the last good checkpoint is "
                    f"{resume or 'none'}: lower --lr or check the data")
            logger.info(f"step {step:07d} loss {avg[0]:.4f}" + (f" proj {avg[1]:.4f}" if vis is not None else "")
                        + f" steps/s {log_steps / (time.time() - t0):.2f} "
                        f"img/s {log_steps * args.global_batch_size / (time.time() - t0):.1f}")
            if writer:
                writer.add_scalar("loss", avg[0], step)
                if vis is not None:
                    writer.add_scalar("proj_loss", avg[1], step)
            run_loss.zero_()
            log_steps, t0 = 0, time.time()
        if step % args.ckpt_every == 0 or step == args.max_steps or stopped:
            resume = os.path.join(args.results_dir, "checkpoints", f"{step:07d}.pt")
            if rank == 0:
                os.makedirs(os.path.dirname(resume), exist_ok=True)
                atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                             "args": vars(args), "step": step, "config": {"model": args.model, "kwargs": kwargs},
                             "meta": meta, "ema_init_weight": init_weight}, resume)
                logger.info(f"saved {resume}")
        if stopped or step >= args.max_steps:
            break
    cleanup_distributed()
    if stopped and step < args.max_steps:
        die(f"interrupted at step {step}: saved {resume}; rerun the same command to resume", code=128 + stopped)
    logger.info(f"done: step {step} of --max-steps {args.max_steps}")


def get_parser():
    p = parser(__doc__)
    p.add_argument("--data-path", required=True, help="dataset directory (encode.py / attach.py output)")
    p.add_argument("--results-dir", required=True, help="this run's directory; rerunning resumes from it")
    p.add_argument("--model", default="SiT-XL/2", help="DiT-* (DDPM) or SiT-* (interpolant), e.g. DiT-L/2")
    p.add_argument("--global-batch-size", type=int, default=128, help="images per step over all ranks")
    p.add_argument("--global-seed", type=int, default=0, help="seeds the initial weights, data order and noises")
    p.add_argument("--max-steps", type=int, default=100_000, help="train until this step (a rerun extends a run)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 disables clipping)")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay per step, fixed as in DiT/SiT/REPA (it averages over ~1 / (1 - decay) steps)")
    p.add_argument("--ema-warmup", action="store_true",
                   help="the usual EMA warm-up for short runs: decay min(--ema-decay, (1 + s) / (10 + s)) at step s "
                        "(default off: the fixed decay of the paper's runs)")
    p.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="learned variance (default: on for DiT, off for SiT)")
    p.add_argument("--qk-norm", action="store_true", help="LayerNorm on queries and keys")
    p.add_argument("--time-weighting", choices=["uniform", "lognormal"], default="uniform", help="SiT time sampling")
    p.add_argument("--proj-coeff", type=float, default=0.5, help="weight of the alignment loss (with vis.npy)")
    p.add_argument("--encoder-depth", type=int, default=None,
                   help="block after which tokens are aligned (default 8 for L/XL, 4 for T/S/B)")
    p.add_argument("--vis", dest="use_vis", action=argparse.BooleanOptionalAction, default=True,
                   help="align to DIR/vis.npy when present (--no-vis ignores it)")
    p.add_argument("--text-cond", action="store_true", help="DC-Embedding from DIR/text.pt")
    add_compile_flag(p)
    add_precision_flag(p)
    p.add_argument("--activation-memory-budget", type=float, default=1.0,
                   help="with --compile, a fraction in (0, 1] of the activations to keep for backward; lower "
                        "recomputes more to fit a larger batch (bench.py --only memory measures the need)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=10_000, help="steps between checkpoints")
    p.add_argument("--tensorboard", action="store_true", help="also log the losses to RESULTS/tb")
    return p


if __name__ == "__main__":
    run(main, get_parser().parse_args())
