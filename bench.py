"""
Throughput on the device present (one device; --batch-size is per device) of the work the
stages do: the training step of train.py, one model evaluation of the samplers with and without
guidance, score.py's scoring, and train.py's data loader, each eager and under torch.compile;
and the memory training at --batch-size needs (states + activations saved for backward, measured
from a forward of 1 and 2 images in --precision, so a CPU predicts a GPU's need).

Reads  nothing: random weights and random latents of shape (4, S/8, S/8) for --image-size S, or
       with --vae none pixels (--channels, S, S) as encode.py --vae none stores them.
       The loader part writes a temporary dataset directory of random float16 latents
       (--loader-images rows) and deletes it.
Writes a Markdown table on stdout; --json FILE writes the same rows as JSON.

FLOPs come from the architecture: forward_macs (multiply-accumulates per image per
forward, as the DiT paper counts Gflops) x 2 per forward; a training step counts 3 forwards'
worth (forward + backward) = 6 x MACs per image. MFU = achieved TFLOP/s over the dense peak of
the GPU (PEAK_TFLOPS, matched on the device name; --peak-tflops overrides; on CPU only with
--peak-tflops). Times are medians over --iters after --warmup iterations, with the device
synchronised around each one. The fast paths are those of the stages: on CUDA bf16 autocast
with fp32 master weights (--precision), TF32, torch.compile, SDPA, fused AdamW, foreach EMA;
fp32 on CPU unless --precision bf16 (honoured where the CPU has native bf16, common.use_bf16).
--compare-precision times the training step and the model evaluations in fp32 and in bf16
autocast, interleaved (one call of each in turn: a load that comes and goes on shared cores
hits both alike), and prints the fp32 / bf16 time ratios.

    python bench.py --model SiT-XL/2 --image-size 256 --batch-size 256 --precision bf16 --proj

The numbers in docs/performance.md came from (CPU: 2 cores of an AMD EPYC):
    python bench.py --model SiT-S/2 --image-size 256 --batch-size 16 --warmup 2 --iters 7 \\
        --only train,loader --json results/bench_cpu_train.json
    OMP_NUM_THREADS=1 python bench.py --model SiT-S/2 --image-size 256 --batch-size 16 --warmup 1 \\
        --iters 5 --only sample,score,loader --json results/bench_cpu_infer_1thread.json
    python bench.py --model SiT-XL/2 --image-size 256 --batch-size 256 --proj --only memory
    python bench.py --model SiT-T/4 --vae none --channels 1 --image-size 28 --batch-size 128 \
        --only train,sample --compare-precision --warmup 2 --iters 7
GPU (one H100 SXM; not yet measured; batch 256 of SiT-XL/2 needs more than its 80 GB, see --only memory):
    bash tools/gpu_check.sh   # the CUDA test tier, then these rows at reduced length: one table
    python bench.py --check-flash
    python bench.py --model SiT-XL/2 --image-size 256 --batch-size 128 --precision bf16 --proj --only train
    python bench.py --model SiT-XL/2 --image-size 256 --batch-size 256 --precision bf16 --proj \\
        --json results/bench_h100.json
    python bench.py --model SiT-XL/2 --image-size 256 --batch-size 256 --only sample --modes compile \\
        --sample-steps 250 --cfg-scale 1.8 --guidance-low 0 --guidance-high 0.7 --json results/bench_h100_sample.json
"""
import os
import resource
import statistics
import tempfile
import time
import warnings
from collections import Counter
from copy import deepcopy

import numpy as np
import torch
import torch.nn.functional as F

from common import PRECISIONS, atomic_save, cpu_has_bf16, die, fast_cuda_defaults, parser, use_bf16
from diffusion import SAMPLERS, DDPMSchedule, guided_model, linear_betas, objective_of, sample_time
from models import SIZES, DiT_models
from score import score_batch
from train import StepBatches, default_encoder_depth, make_step, set_activation_memory_budget, step_noise

PARTS = ("train", "sample", "score", "loader", "memory")
MODES = ("eager", "compile")
TRAIN_FLOPS_PER_MAC = 6   # forward 2 FLOPs per MAC, backward twice the forward
REPA_Z_DIM = 768          # DINOv2-B features, the REPA projector's target
STATE_BYTES_PER_PARAM = 20  # fp32 weight, gradient, AdamW's two moments, EMA copy

# Dense tensor-core TFLOP/s from the vendors' data sheets (no sparsity): bf16, and TF32 for
# --precision fp32 (fast_cuda_defaults runs fp32 matmuls in TF32). First match on the name wins.
PEAK_TFLOPS = [  # (part of torch.cuda.get_device_name(), bf16, tf32)
    ("H100 PCIe", 756, 378),
    ("H100 NVL", 835, 418),
    ("H100", 989, 495),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989, 495),
    ("A100", 312, 156),
    ("L40S", 362, 183),
    ("L40", 181, 90.5),
    ("L4", 121, 60),
]


def peak_tflops(device_name, precision):
    """The table's dense peak for this GPU name and 'bf16' / 'fp32' (TF32), or None if unknown."""
    for key, bf16, tf32 in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return bf16 if precision == "bf16" else tf32
    return None


def rates(images, seconds, flops_per_image, peak=None):
    """(images/s, achieved TFLOP/s, MFU) of `images` done in `seconds`; None where not defined."""
    ips = images / seconds
    tflops = flops_per_image * ips / 1e12 if flops_per_image else None
    return ips, tflops, (tflops / peak if peak and tflops is not None else None)


def forward_macs(model, input_size):
    """
    Multiply-accumulates of one forward pass for one image, counted from the architecture
    (matmuls and convolutions; norms, activations and softmax are not counted, as in the DiT
    paper's Gflops). Attention: QK^T and AV, 2 T^2 D.
    """
    p, D = model.patch_size, model.pos_embed.shape[-1]
    T = (input_size // p) ** 2
    depth = len(model.blocks)
    hidden_mlp = model.blocks[0].mlp.fc1.out_features
    macs = T * model.in_channels * p * p * D                        # patch embedding
    macs += 256 * D + D * D                                          # timestep MLP
    per_block = T * D * 3 * D + 2 * T * T * D + T * D * D            # qkv, attention, out proj
    per_block += 2 * T * D * hidden_mlp + D * 6 * D                  # MLP, adaLN
    macs += depth * per_block
    macs += D * 2 * D + T * D * p * p * model.out_channels          # final layer
    for proj in model.projectors:
        macs += T * sum(m.in_features * m.out_features for m in proj if isinstance(m, torch.nn.Linear))
    return macs


def in_shape(args):
    """(C, H, W) of what the network sees: SD-VAE latents (4, S/8, S/8), or with --vae none pixels."""
    if args.vae == "none":
        return (args.channels or 3, args.image_size, args.image_size)
    return (4, args.image_size // 8, args.image_size // 8)


def build_model(args, device, proj=False):
    """The registry network as train.py builds it for in_shape(args), random weights."""
    C, _, L = in_shape(args)
    kwargs = dict(input_size=L, in_channels=C, num_classes=args.num_classes, learn_sigma=objective_of(args.model) == "ddpm")
    if proj:
        kwargs.update(z_dims=[REPA_Z_DIM], encoder_depth=default_encoder_depth(args.model))
    torch.manual_seed(0)
    return DiT_models[args.model](**kwargs).to(device)


def compile_model(model, mode, dynamic=None):
    return torch.compile(model, dynamic=dynamic) if mode == "compile" else model


class Bench:
    """Shared state of one run: device, timing, memory and the rows measured so far."""

    def __init__(self, args, device):
        self.args, self.device, self.cuda = args, device, device.type == "cuda"
        self.name = torch.cuda.get_device_name(device) if self.cuda else "CPU"
        self.bf16 = use_bf16(args.precision, device)
        self.precision = "bf16" if self.bf16 else "fp32"
        # the precisions the train and sample rows run in: both, interleaved, with --compare-precision
        self.modes_bf16 = (False, True) if args.compare_precision else (self.bf16,)
        self.peak = args.peak_tflops or (peak_tflops(self.name, self.precision) if self.cuda else None)
        self.objective = objective_of(args.model)
        self.shape = in_shape(args)
        self.latent = self.shape[-1]
        self.rows = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn, warmup=None, iters=None):
        """Median seconds of fn() over --iters calls after --warmup calls, synchronised each time."""
        return self.time_each([fn], warmup, iters)[0]

    def time_each(self, fns, warmup=None, iters=None):
        """Median seconds of each fn over --iters rounds after --warmup rounds; a round calls every fn once,
        in turn, synchronised around each call. self.times: the seconds of each call, per fn (of the
        last fn after a single one)."""
        for _ in range(self.args.warmup if warmup is None else warmup):
            for fn in fns:
                fn()
        self.sync()
        times = [[] for _ in fns]
        for _ in range(self.args.iters if iters is None else iters):
            for fn, ts in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                self.sync()
                ts.append(time.perf_counter() - t0)
        self.all_times, self.times = times, times[-1]
        return [statistics.median(ts) for ts in times]

    def autocast(self, bf16=None):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 if bf16 is None else bf16)

    def reset_memory(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gib(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux

    def add(self, part, mode, what, images, seconds, flops_per_image, syncs=None, bf16=None, times=None):
        ips, tflops, mfu = rates(images, seconds, flops_per_image, self.peak) if seconds else (None,) * 3
        bf16 = self.bf16 if bf16 is None else bf16
        self.rows.append(dict(part=part, mode=mode, what=what, precision="bf16" if bf16 else "fp32", images=images,
                              ms=seconds and 1e3 * seconds, ms_each=[1e3 * t for t in (self.times if times is None else times)],
                              images_per_s=ips, flops_per_image=flops_per_image, tflops=tflops, mfu=mfu,
                              peak_mem_gib=self.peak_memory_gib(), syncs=syncs))

    def batch(self, B, rows=None):
        """Latents x, labels y and the objective's times t for B images (rows: B by default)."""
        g = torch.Generator(device=self.device).manual_seed(0)
        shape = (rows or B, *self.shape)
        x = torch.randn(shape, device=self.device, generator=g)
        y = torch.randint(0, self.args.num_classes, (shape[0],), device=self.device, generator=g)
        return x, y, sample_time(self.objective, shape[0], self.device, g)

    def count_syncs(self, fn):
        """Host-device synchronisations in one call of fn (CUDA's sync debug mode); None on CPU."""
        if not self.cuda:
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.sync()
        return sum("synchroniz" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- parts

def bench_train(b, mode):
    """One train.py step: loss (with label dropout), backward, clipping, fused AdamW, EMA; one model
    per precision of b.modes_bf16, timed in turn."""
    args, device, B, L = b.args, b.device, b.args.batch_size, b.latent
    pinned = lambda v: v.pin_memory() if b.cuda else v  # noqa: E731 (as train.py's loader delivers batches)
    x_host, y_host = pinned(torch.randn(B, *b.shape)), pinned(torch.randint(0, args.num_classes, (B,)))
    steps = []
    for bf16 in b.modes_bf16:
        model = build_model(args, device, proj=args.proj)
        ema = deepcopy(model).requires_grad_(False).eval()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.999),
                                weight_decay=0.0, fused=True)
        model.train()
        train_step = make_step(model, ema, opt, b.objective, net=compile_model(model, mode),
                               bf16=bf16)  # train.py's defaults otherwise
        steps.append(train_step)
    h = min(256, (L // model.patch_size) ** 2)
    vis_host = pinned(torch.randn(B, h, REPA_Z_DIM)) if args.proj else None

    def step_fn(train_step):
        step = [0]

        def one():
            x, y = x_host.to(device, non_blocking=True), y_host.to(device, non_blocking=True)
            noise, t, drop = step_noise(b.objective, step[0], (B, *b.shape), device)
            vis = vis_host.to(device, non_blocking=True) if args.proj else None
            train_step(x, y, vis, noise, t, drop)
            step[0] += 1
        return one

    fns = [step_fn(s) for s in steps]
    b.reset_memory()
    seconds = b.time_each(fns)
    macs = forward_macs(model, L)
    for bf16, fn, s, times in zip(b.modes_bf16, fns, seconds, b.all_times):
        b.add("train", mode, f"step{' + REPA projector' if args.proj else ''}", B, s,
              TRAIN_FLOPS_PER_MAC * macs, b.count_syncs(fn), bf16=bf16, times=times)


def bench_sample(b, mode):
    """One model evaluation of a sampler (eval, inference mode): B rows, or 2B with guidance."""
    args, B = b.args, b.args.batch_size
    model = build_model(args, b.device).eval().requires_grad_(False)
    # a guidance interval alternates B and 2B rows: one static graph for each
    net = compile_model(model, mode, dynamic=False)
    macs = forward_macs(model, b.latent)
    x, y, t = b.batch(B)
    for guided in (False, True):
        f = guided_model(net, y, args.cfg_scale if guided else 1.0, null_class=args.num_classes)

        def evaluation(bf16):
            def one():
                with torch.inference_mode(), b.autocast(bf16):
                    f(x, t, 0.5)
            return one
        fns = [evaluation(bf16) for bf16 in b.modes_bf16]
        b.reset_memory()
        seconds = b.time_each(fns)
        what = "model evaluation, cond + uncond in 2B rows" if guided else "model evaluation, B rows"
        for bf16, fn, s, times in zip(b.modes_bf16, fns, seconds, b.all_times):
            b.add("sample", mode, what, B, s, 2 * macs * (2 if guided else 1), b.count_syncs(fn), bf16=bf16,
                  times=times)
    if args.sample_steps:
        bench_sampler(b, mode, net, macs, y)


def bench_sampler(b, mode, net, macs, y):
    """A whole sampler run (sde for SiT, ddpm for DiT) with guidance on the interval; timed once."""
    args, B = b.args, b.args.batch_size
    name = "sde" if b.objective == "sit" else "ddpm"
    rows = [0]

    def counted(x, t, labels):
        rows[0] += x.shape[0]
        return net(x, t, labels)
    f = guided_model(counted, y, args.cfg_scale, args.guidance_low, args.guidance_high, null_class=args.num_classes)
    z = torch.randn(B, *b.shape, device=b.device)

    def run(steps):
        with torch.inference_mode(), b.autocast():
            SAMPLERS[name](f, z, num_steps=steps)
    b.reset_memory()
    run(2)  # both shapes are compiled by now; this only warms the sampler's own ops
    rows[0] = 0
    seconds = b.time(lambda: run(args.sample_steps), 0, 1)
    evals = rows[0] / B
    b.add("sample", mode, f"{name} sampler, {args.sample_steps} steps, cfg {args.cfg_scale} on "
          f"[{args.guidance_low}, {args.guidance_high}] ({evals:g} rows per image)", B, seconds, 2 * macs * evals)


def sampler_evaluations(objective, steps, cfg_scale, low, high):
    """
    (unguided, guided) network evaluations of one run of the stage's default sampler (sde for
    SiT, ddpm for DiT) of `steps` steps with guidance on [low, high]: an unguided one takes B rows,
    a guided one 2B. Counted by running the sampler on a stand-in network of one pixel.

        sampler_evaluations("sit", 250, 1.8, 0.0, 0.7) -> (78, 172)   # REPA's 422 rows per image
    """
    calls = Counter()

    def net(x, t, y):
        calls[len(x)] += 1
        return torch.zeros_like(x)
    f = guided_model(net, torch.zeros(1, dtype=torch.long), cfg_scale, low, high, null_class=1)
    SAMPLERS["sde" if objective == "sit" else "ddpm"](f, torch.zeros(1, 1, 1, 1), num_steps=steps)
    return calls[1], calls[2]


def bench_score(b, mode):
    """score.py's forward: the loss (vb off) at T draws (timestep, noise) of B images in B*T rows, no grad."""
    args, B, T = b.args, b.args.batch_size, b.args.score_timesteps
    model = build_model(args, b.device).eval().requires_grad_(False)
    net = compile_model(model, mode)
    schedule = DDPMSchedule(linear_betas(1000))
    x, y, _ = b.batch(B)
    _, _, t = b.batch(B, rows=B * T)
    t = t.view(B, T)
    noise = torch.randn(B, T, *b.shape, device=b.device)

    def one():
        with torch.no_grad(), b.autocast():
            score_batch(net, b.objective, schedule, x, y, t, noise)
    b.reset_memory()
    seconds = b.time(one)
    b.add("score", mode, f"{T} forwards per image, B*T rows", B, seconds, 2 * forward_macs(model, b.latent) * T,
          b.count_syncs(one))


def saved_activations(b, net, B, params):
    """Bytes of the tensors the training forward of B images saves for backward (saved-tensor
    hooks see eager and compiled graphs alike), leaving out the parameters themselves."""
    x, y, t = b.batch(B)
    store = {}

    def pack(v):
        ptr = v.untyped_storage().data_ptr()
        if ptr not in params:
            store[ptr] = v.untyped_storage().nbytes()
        return v
    # auto counts as bf16: the memory a GPU run (bf16 by default) will need
    with torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=b.args.precision != "fp32"):
        net(x, t, y)  # compiles outside the hooks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            net(x, t, y)
    return sum(store.values())


def bench_memory(b, mode):
    """
    What training at --batch-size needs to hold, measured without running it: the activations
    the forward saves for backward per image (batch 2 minus batch 1, which also gives the part
    that does not grow with the batch, e.g. the bf16 weight copies of autocast), plus
    STATE_BYTES_PER_PARAM per parameter. A lower bound on the peak: the backward's transient
    buffers and DDP's gradient buckets come on top. Runs in --precision on CPU too (CPU autocast),
    so a CPU predicts what a GPU will need. Not a measure of --activation-memory-budget: what the
    partitioner then recomputes depends on the batch (at 1 and 2 images it may drop only the
    weight copies); see its effect in the train rows' peak memory at the real batch.
    """
    args = b.args
    model = build_model(args, b.device, proj=args.proj)
    net = compile_model(model, mode, dynamic=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    one, two = saved_activations(b, net, 1, params), saved_activations(b, net, 2, params)
    per_image, fixed = two - one, 2 * one - two
    states = STATE_BYTES_PER_PARAM * sum(p.numel() for p in model.parameters())
    total = states + fixed + args.batch_size * per_image
    b.times = []
    b.add("memory", mode, f"training at batch {args.batch_size} ({'fp32' if args.precision == 'fp32' else 'bf16'}): "
          f"weights+grads+AdamW+EMA "
          f"{states / 2 ** 30:.2f} GiB + {fixed / 2 ** 30:.2f} GiB + saved activations {per_image / 2 ** 20:.1f} MiB/image "
          f"= at least {total / 2 ** 30:.1f} GiB", None, None, None)
    b.rows[-1].update(states_gib=states / 2 ** 30, fixed_gib=fixed / 2 ** 30,
                      activations_mib_per_image=per_image / 2 ** 20, projected_gib=total / 2 ** 30)


def write_dataset(path, args, h):
    """Random float16 latents (and REPA features with --proj) in train.py's dataset layout."""
    n, rng = args.loader_images, np.random.default_rng(0)
    shape = (n, 2, *in_shape(args)) if args.flip else (n, *in_shape(args))
    arrays = [("latents.npy", shape)] + ([("vis.npy", (n, *shape[1:-3], h, REPA_Z_DIM))] if args.proj else [])
    for name, shp in arrays:
        a = np.lib.format.open_memmap(os.path.join(path, name), mode="w+", dtype=np.float16, shape=shp)
        step = max(1, 2 ** 24 // int(np.prod(shp[1:])))  # 64 MB of float32 at a time
        for lo in range(0, n, step):
            a[lo:lo + step] = rng.standard_normal((min(step, n - lo), *shp[1:]), dtype=np.float32)
        a.flush()
        del a
    labels = rng.integers(0, args.num_classes, n)
    np.save(os.path.join(path, "labels.npy"), labels)
    return labels


def bench_loader(b):
    """train.py's StepBatches through a DataLoader built as train.py builds it (memmaps in the
    page cache: a freshly written file). One timed iteration fetches 4 batches per worker."""
    args, B = b.args, b.args.batch_size
    h = min(256, (b.latent // int(args.model.split("/")[-1])) ** 2)
    per_iter = 4 * max(1, args.num_workers)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as path:
        labels = write_dataset(path, args, h)
        data = StepBatches(path, args.proj, labels, B, 0, 1, 0)
        loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(0, (args.warmup + args.iters + 1) * per_iter),
                                             num_workers=args.num_workers, pin_memory=b.cuda,
                                             persistent_workers=args.num_workers > 0)
        batches = iter(loader)

        def one():
            for _ in range(per_iter):
                _ = [v.to(b.device, non_blocking=True) for v in next(batches)]
        b.reset_memory()
        seconds = b.time(one)
        batches = loader = None  # stop the workers before the directory goes
    b.add("loader", f"{args.num_workers} worker{'s' * (args.num_workers != 1)}",
          f"StepBatches from a {args.loader_images}-image memmap"
          f"{' with flips' if args.flip else ''}{' + vis.npy' if args.proj else ''}, {per_iter} batches per iteration",
          per_iter * B, seconds, None)


# ----------------------------------------------------------------------------- flash check

def sdpa_ops(fn):
    """
    Counter of the scaled-dot-product-attention ATen ops that fn() calls, by name, from
    torch.profiler: which kernel family served the attention. The fused ones are
    aten::_scaled_dot_product_{flash,efficient,cudnn}_attention and their _backward (on CPU
    _flash_attention_for_cpu); the math fallback shows as aten::_scaled_dot_product_attention_math
    eagerly, and compiled as plain matmuls, so no fused op at all. A compiled graph calls the fused
    ops as extern kernels, so they show under torch.compile too.

        sdpa_ops(lambda: model(x, t, y).sum().backward())
        -> Counter({'aten::_scaled_dot_product_flash_attention': depth, ..._backward: depth, ...})
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if "scaled_dot_product" in e.name)


def check_flash(device):
    """One SDPA forward + backward per registry head dim under the flash-only backend:
    [(size, heads, head_dim, 'ok' | 'failed: ...')]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for size, s in SIZES.items():
        hd = s["hidden_size"] // s["num_heads"]
        q, k, v = (torch.randn(2, s["num_heads"], 256, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v).float().sum().backward()
            status = "ok"
        except RuntimeError as e:
            status = "failed: " + str(e).strip().splitlines()[0][:120]
        out.append((size, s["num_heads"], hd, status))
    return out


# ----------------------------------------------------------------------------- output

def device_memory(device):
    """Bytes of memory of the device: the GPU's total, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(b):
    a = b.args
    prec = b.precision + (" (TF32 matmuls)" if b.cuda and b.precision == "fp32" else "")
    if a.compare_precision:
        prec = "fp32 and bf16 autocast, interleaved" + ("" if b.cuda or cpu_has_bf16() else
                                                        " (this CPU has no native bf16: emulated)")
    elif not b.cuda and a.precision == "bf16" and not b.bf16:
        prec += " (this CPU has no native bf16)"
    peak = (f"peak {b.peak:g} TFLOP/s ({'--peak-tflops' if a.peak_tflops else 'table'})" if b.peak
            else "no known peak: MFU needs --peak-tflops")
    mem = "torch.cuda.max_memory_allocated per row" if b.cuda else "process max RSS so far (getrusage), not per row"
    what = "pixels" if a.vae == "none" else "latents"
    lines = [f"{a.model} at {a.image_size}px ({what} {'x'.join(map(str, b.shape))}), batch {a.batch_size} per device, "
             f"{prec}, on {b.name}",
             f"FLOPs: forward = 2 x forward_macs per image, training step = 3 x forward = 6 x MACs; "
             f"{peak}; memory: {mem}",
             "",
             "| part | mode | precision | what | images/s | ms/iter | TFLOP/s | MFU | peak mem GiB | syncs |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in b.rows:
        ips = r["images_per_s"]
        lines.append(f"| {r['part']} | {r['mode']} | {r['precision']} | {r['what']} | "
                     f"{fmt(ips, '.1f' if (ips or 0) >= 10 else '.2f')} | "
                     f"{fmt(r['ms'], '.1f')} | "
                     f"{fmt(r['tflops'], '.3g')} | {fmt(r['mfu'], '.1%')} | {r['peak_mem_gib']:.2f} | "
                     f"{fmt(r['syncs'], 'd')} |")
    ratios = precision_ratios(b.rows)
    if ratios:
        lines += ["", "fp32 time / bf16 time, median over rounds (above 1: bf16 is faster): "
                  + "; ".join(f"{part} {mode} {what}: {r:.2f}x" for (part, mode, what), r in ratios.items())]
    return "\n".join(lines)


def precision_ratios(rows):
    """{(part, mode, what): fp32 / bf16 time} of the rows measured in both precisions: the median over the
    rounds of the ratio within a round, the two calls that ran one after the other (a load that comes and
    goes on shared cores slows both alike)."""
    each = {(r["part"], r["mode"], r["what"], r["precision"]): r["ms_each"] for r in rows if r["ms"]}
    return {k[:3]: statistics.median(a / b for a, b in zip(each[k], each[(*k[:3], "bf16")]))
            for k in each if k[3] == "fp32" and (*k[:3], "bf16") in each}


def check_args(args):
    if args.model not in DiT_models:
        die(f"--model {args.model} is unknown: choose one of {', '.join(DiT_models)}")
    p = int(args.model.split("/")[-1])
    if args.vae == "none":
        if args.image_size % p:
            die(f"--image-size {args.image_size} is not a multiple of the patch size {p} of {args.model}")
    elif args.channels is not None:
        die("--channels is for pixel space: pass --vae none too, or leave --channels out (latents have 4)")
    elif args.image_size % 8 or (args.image_size // 8) % p:
        die(f"--image-size {args.image_size} gives latents of {args.image_size / 8:g}px, not a multiple of the "
            f"patch size {p} of {args.model}: use a multiple of {8 * p}")
    bad = [x for x in args.only if x not in PARTS] + [x for x in args.modes if x not in MODES]
    if bad or not args.only or not args.modes:
        die(f"--only takes some of {','.join(PARTS)} and --modes some of {','.join(MODES)} (got {bad or 'nothing'})")
    if min(args.batch_size, args.iters, args.score_timesteps, args.loader_images) < 1 or \
            min(args.warmup, args.num_workers, args.sample_steps) < 0:
        die("--batch-size, --iters, --score-timesteps and --loader-images must be positive; --warmup, "
            "--num-workers and --sample-steps at least 0")
    if args.tmp_dir is not None and not os.path.isdir(args.tmp_dir):
        die(f"--tmp-dir {args.tmp_dir} is not a directory: create it or leave the flag out")
    if "compile" in args.modes and args.warmup < 1:
        die("--warmup must be at least 1 with --modes compile, so compilation is not timed")
    if "sample" in args.only and args.cfg_scale == 1:
        die("--cfg-scale 1 turns guidance off: the guided sampling rows need a scale other than 1")


def main(args):
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        fast_cuda_defaults()
    if args.check_flash:
        res = check_flash(device)
        where = (f"{torch.cuda.get_device_name(device)}, bf16" if device.type == "cuda"
                 else "CPU, fp32 (the CPU kernel: the check that matters needs a GPU)")
        print(f"SDPA under sdpa_kernel(SDPBackend.FLASH_ATTENTION), 256 tokens, on {where}:\n")
        print("| size | heads | head dim | forward + backward |\n|---|---:|---:|---|")
        for size, heads, hd, status in res:
            print(f"| {size} | {heads} | {hd} | {status} |")
        if any(s != "ok" for *_, s in res):
            die("the flash attention backend refused some head dims (see the table)")
        return
    check_args(args)
    set_activation_memory_budget(args.activation_memory_budget)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    b = Bench(args, device)
    for part in PARTS:
        if part not in args.only:
            continue
        if part == "loader":
            bench_loader(b)
            continue
        for mode in args.modes:
            try:
                {"train": bench_train, "sample": bench_sample, "score": bench_score, "memory": bench_memory}[part](b, mode)
            except torch.OutOfMemoryError:  # say so and go on: the other rows still hold
                b.rows.append(dict(part=part, mode=mode, what=f"out of memory at batch {args.batch_size}", images=None,
                                   ms=None, ms_each=[], images_per_s=None, flops_per_image=None, tflops=None,
                                   mfu=None, peak_mem_gib=b.peak_memory_gib(), syncs=None))
            if b.cuda:
                torch.cuda.empty_cache()
    print(table(b))
    if args.json:
        atomic_save({"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
                     "precision": b.precision, "compare_precision": args.compare_precision,
                     "precision_ratios": {" ".join(k): v for k, v in precision_ratios(b.rows).items()},
                     "vae": args.vae, "in_shape": list(b.shape),
                     "device": b.name, "peak_tflops": b.peak, "proj": args.proj,
                     "device_memory_gib": device_memory(device) / 2 ** 30,
                     "warmup": args.warmup, "iters": args.iters, "score_timesteps": args.score_timesteps,
                     "flops": "forward = 2 x forward_macs per image; train step = 6 x forward_macs per image",
                     "memory": "cuda max_memory_allocated" if b.cuda else "cpu max RSS (getrusage)",
                     "rows": b.rows}, args.json, fmt="json")


def get_parser():
    p = parser(__doc__)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731 (string defaults go through it too)
    p.add_argument("--model", default="SiT-XL/2", help="registry name, e.g. DiT-XL/2 or SiT-S/2")
    p.add_argument("--image-size", type=int, default=256,
                   help="image side; latents are 4 x size/8 x size/8 (pixels C x size x size with --vae none)")
    p.add_argument("--vae", choices=["sd", "none"], default="sd",
                   help="sd: the SD-VAE's latents; none: pixel space, as encode.py --vae none stores images")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="with --vae none: 1 (grayscale) or 3 (RGB) pixel channels; None: 3")
    p.add_argument("--batch-size", type=int, default=32, help="images per step on the one device")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="as train.py's: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 also on a CPU with native "
                        "bf16; fp32 (TF32 matmuls on CUDA). --only memory counts activations in bf16 unless fp32, "
                        "on CPU too")
    p.add_argument("--compare-precision", action="store_true",
                   help="time the train and sample rows in fp32 and in bf16 autocast, interleaved, and print the "
                        "ratios")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="classes of the random labels (the label embedding has one more, the null class)")
    p.add_argument("--proj", action="store_true", help="train with a REPA projector and the projection loss")
    p.add_argument("--only", type=csv, default=",".join(PARTS), help="comma-separated parts to run")
    p.add_argument("--modes", type=csv, default=",".join(MODES), help="comma-separated: eager, compile or both")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations; the median is reported")
    p.add_argument("--score-timesteps", type=int, default=20,
                   help="forwards per image of the scoring rows (score.py's default: 10 timesteps x 2 antithetic noises)")
    p.add_argument("--cfg-scale", type=float, default=1.8, help="guidance scale of the guided sampling rows")
    p.add_argument("--guidance-low", type=float, default=0.0,
                   help="lower end of the guidance interval of --sample-steps (t, 1 = noise)")
    p.add_argument("--guidance-high", type=float, default=0.7,
                   help="upper end of the guidance interval of --sample-steps (t, 1 = noise)")
    p.add_argument("--sample-steps", type=int, default=0,
                   help="also time one whole sampler run of this many steps (sde for SiT, ddpm for DiT); 0: none")
    p.add_argument("--loader-images", type=int, default=4096, help="rows of the loader's temporary dataset")
    p.add_argument("--flip", action="store_true", help="loader dataset stores flips, (N, 2, C, H, W)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (train.py's default)")
    p.add_argument("--tmp-dir", default=None,
                   help="where the loader's temporary dataset goes; None: the system's (TMPDIR)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU; None: the table of known GPUs (no MFU on CPU)")
    p.add_argument("--activation-memory-budget", type=float, default=1.0,
                   help="torch.compile's activation memory budget in (0, 1]: below 1 the compiled training step "
                        "saves fewer activations and recomputes more (as train.py's flag)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file; None: no file")
    p.add_argument("--check-flash", action="store_true",
                   help="only check that the flash SDPA backend takes every registry head dim, then exit")
    return p


def parse_args(argv=None):
    return get_parser().parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
