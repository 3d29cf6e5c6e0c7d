"""
The CUDA paths that the CPU suite cannot reach: bf16 autocast, torch.compile of the DDP-wrapped
network, NCCL, fused AdamW with its moments on the GPU after a resume, the fused SDPA kernels,
pinned-memory copies, compiled bf16 sampling and scoring, the FID Inception on the GPU, and the
memory model of bench.py. The stage scripts run as a user runs them, on tiny data made here
(nothing is downloaded), and every result is held against an independent reference: a run that
never stopped, the eager or the fp32 computation, the CPU. Each tolerance is stated where it is
used, with the reason for its size.

    python -m pytest -m cuda          # one GPU: a few minutes; bash tools/gpu_check.sh adds the benchmarks

Without CUDA every test here is skipped, and says so.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import fid  # noqa: E402
import models  # noqa: E402
from common import fast_cuda_defaults  # noqa: E402
from launch import script_cmd  # noqa: E402
from test_fid import random_inception_state  # noqa: E402
from test_sample import tiny_checkpoint  # noqa: E402
from test_score import make_data, random_net  # noqa: E402
from test_train import make_dataset  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False): this tier needs a GPU")]

TWO_GPUS = torch.cuda.device_count() >= 2
FUSED = ("flash", "efficient", "cudnn")  # the fused SDPA kernel families of CUDA; "math" is the slow fallback


# ----------------------------------------------------------------------------- running the scripts

def torchrun(script, nproc):
    """The command line of `script` under torchrun on nproc local GPUs (NCCL), also for one."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]


def start(cmd, log, **env):
    """Start cmd in the repository root, stdout and stderr into the file `log`."""
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **env}, stdout=f,
                                stderr=subprocess.STDOUT)
    proc.log = str(log)
    return proc


def finish(proc, timeout=600):
    """Wait for a started command; its log, after asserting that it succeeded."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log = open(proc.log).read()
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited with {proc.returncode}:\n{log[-4000:]}"
    return log


def losses(log):
    """{step: (diffusion loss, alignment loss or None)} of train.py's log lines (proj only with alignment)."""
    return {int(s): (float(a), float(b) if b else None)
            for s, a, b in re.findall(r"step (\d+) loss (\S+)(?: proj (\S+))?", log)}


def load(results, step):
    return torch.load(os.path.join(results, "checkpoints", f"{step:07d}.pt"), weights_only=False)


def gap(a, b, ref):
    """|a - b| / |a - ref| (Euclidean, over every floating tensor): how far two states of a run lie
    apart, as a fraction of how far the run moved from `ref` to `a`."""
    keys = [k for k in a if a[k].is_floating_point()]
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
    den = sum(float(((a[k].double() - ref[k].double()) ** 2).sum()) for k in keys)
    return math.sqrt(num / den)


def moments(opt_state):
    """AdamW's state as one flat dict, 'i.exp_avg' etc."""
    return {f"{i}.{k}": v for i, st in opt_state["state"].items() for k, v in st.items() if k != "step"}


# ----------------------------------------------------------------------------- train.py

TRAIN = ["--model", "SiT-T/2", "--text-cond", "--global-batch-size", 16, "--max-steps", 60, "--ckpt-every", 1000,
         "--log-every", 1, "--lr", 1e-3, "--ema-decay", 0.9, "--num-workers", 2, "--compile", "--precision", "bf16"]


def test_training_on_one_nccl_rank_stops_on_sigterm_and_resumes_as_if_it_never_stopped(tmp_path, record_property):
    # train.py as a one-GPU torchrun job: NCCL, DDP, torch.compile of the DDP-wrapped network, bf16
    # autocast, fused AdamW, the REPA alignment (vis.npy) and DC-Embedding (--text-cond). One run
    # goes straight to step 60; another gets SIGTERM (a cluster's preemption notice; torchrun passes
    # it to its worker) after step 10, saves the step it is at, and is run again.
    data = make_dataset(tmp_path / "data", n=48, classes=4, vis_tokens=8, size=16)  # 64 tokens of SiT-T/2
    cmd = lambda results: torchrun("train.py", 1) + ["--data-path", data, "--results-dir", results, *TRAIN]  # noqa: E731
    straight = start(cmd(tmp_path / "straight"), tmp_path / "straight.log")  # alongside: compiling is CPU work
    with open(tmp_path / "stopped.err", "w") as err:
        stopped = subprocess.Popen([str(c) for c in cmd(tmp_path / "stopped")], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=err, text=True)
    watchdog = threading.Timer(600, stopped.kill)
    watchdog.start()
    for line in stopped.stdout:
        if re.search(r"step 0000010 loss", line):
            stopped.send_signal(signal.SIGTERM)
    stopped.wait()
    watchdog.cancel()
    err = (tmp_path / "stopped.err").read_text()
    ckpts = tmp_path / "stopped" / "checkpoints"
    saved = sorted(os.listdir(ckpts)) if ckpts.exists() else []
    assert len(saved) == 1, err[-4000:]
    s = int(saved[0][:7])
    assert 10 <= s < 60, f"the run saved step {s}: the signal came too late to test a resume"
    assert f"error: interrupted at step {s}: saved" in err, err[-4000:]

    resumed = finish(start(cmd(tmp_path / "stopped"), tmp_path / "resumed.log"))
    assert f"at step {s}" in resumed and "1 ranks, compile=True" in resumed, resumed[-3000:]
    straight_log = finish(straight)
    a, b, mid = load(tmp_path / "straight", 60), load(tmp_path / "stopped", 60), load(tmp_path / "stopped", s)

    # After the resume the optimiser state lives on the GPU (load_state_dict moves the moments to the
    # parameters; the checkpoint was read to the CPU): fused AdamW would refuse it anywhere else.
    # torch.load gives every tensor back on the device it was saved from.
    state = b["opt"]["state"]
    assert state and all(v.is_cuda and v.dtype == torch.float32 for st in state.values() for v in st.values())

    # Tolerance. On CPU the resumed run is bit-identical (test_train.py). On a GPU two runs of the
    # same command are not: inductor times its candidate reduction kernels in each process and may
    # pick another summation order, and the attention and embedding gradients are summed with
    # atomics. Such differences are of the order of float rounding in a few gradient entries, and
    # AdamW normalises every update, so after 50 steps the runs are still ~1e-6 of their motion
    # apart. A resume that restored anything wrongly (data position, noise, AdamW moments or step
    # count, EMA) is off by a good part of the motion itself: 1% lies orders of magnitude from both.
    gaps = {part: gap(a[part], b[part], mid[part]) for part in ("model", "ema")}
    gaps["adam moments"] = gap(moments(a["opt"]), moments(b["opt"]), moments(mid["opt"]))
    record_property("stopped at", s)
    record_property("gap / motion", ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    assert all(v < 1e-2 for v in gaps.values()), gaps
    # and every step after the resume logs the loss of the uninterrupted run (4 decimals)
    after, ref = losses(resumed), losses(straight_log)
    assert sorted(after) == list(range(s + 1, 61))
    assert max(abs(after[k][0] - ref[k][0]) + abs(after[k][1] - ref[k][1]) for k in after) <= 1e-3


# ----------------------------------------------------------------------------- sample.py and score.py

SAMPLE = ["--num-fid-samples", 8, "--per-proc-batch-size", 4, "--chunk-size", 4, "--num-steps", 10,
          "--cfg-scale", 1.5, "--guidance-high", 0.7, "--grid", 0]
SCORE = ["--num-timesteps", 4, "--batch-size", 4, "--chunk-size", 8]
SCORE_KW = dict(input_size=16, in_channels=4, num_classes=4)
SCORE_META = {"num_classes": 4, "class_names": ["a", "b", "c", "d"], "latent_shape": [4, 16, 16], "count": 16}
ON_CPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """
    sample.py (SiT-T/2, pixel space) and score.py (DiT-T/2 on 16x16 latents) on the CPU (fp32,
    eager: the reference), on the GPU compiled in bf16 and in fp32 (TF32 matmuls), and with two GPUs
    on two ranks: all at once, one process each (compiling is CPU work; the GPU is far from full).
    Chunks and batches hold 4 items, so one and two ranks run batches of the same samples.
    Returns {("sample" | "score", "cpu" | "bf16" | "fp32" | "bf16, 2 ranks"): uint8 images | scores}.
    """
    root = tmp_path_factory.mktemp("stages")
    sit = tiny_checkpoint(root / "sit.pt", name="SiT-T/2", input_size=16)
    dit = root / "dit.pt"
    sd = random_net("DiT-T/2", 0, **SCORE_KW).state_dict()
    torch.save({"config": {"model": "DiT-T/2", "kwargs": SCORE_KW}, "model": sd, "ema": sd, "meta": SCORE_META}, dit)
    latents = np.random.default_rng(0).standard_normal((16, 4, 16, 16)).astype(np.float16)
    gpu = ["--compile", "--precision"]
    runs = {"cpu": (1, [], ON_CPU), "bf16": (1, gpu + ["bf16"], {}), "fp32": (1, gpu + ["fp32"], {})}
    if TWO_GPUS:
        runs["bf16, 2 ranks"] = (2, gpu + ["bf16"], {})
    cmd = lambda script, nproc: torchrun(script, nproc) if nproc > 1 else script_cmd(script)  # noqa: E731
    procs, outputs = {}, {}
    for i, (name, (nproc, flags, env)) in enumerate(runs.items()):
        samples, data = root / f"samples{i}", make_data(root / f"data{i}", latents, np.arange(16) % 4, SCORE_META)
        procs["sample", name] = start(cmd("sample.py", nproc) + ["--ckpt", sit, "--sample-dir", samples, *SAMPLE, *flags],
                                      root / f"sample{i}.log", **env)
        procs["score", name] = start(cmd("score.py", nproc) + ["--data-path", data, "--ckpt", dit, *SCORE, *flags],
                                     root / f"score{i}.log", **env)
        outputs["sample", name], outputs["score", name] = f"{samples}.npz", os.path.join(data, "scores.npy")
    for proc in procs.values():
        finish(proc)
    return {k: np.load(path)["arr_0"] if k[0] == "sample" else np.load(path) for k, path in outputs.items()}


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_compiled_sampling_in_bf16_and_in_fp32_gives_the_cpu_samples(stage_runs, record_property):
    # 8 samples of the 10-step SDE with guidance 1.5 on t <= 0.7, noise drawn on the CPU per sample,
    # so every device starts from the same noise. Pixels in [-1, 1] (uint8 / 127.5 - 1).
    cpu, bf16, fp32 = (stage_runs["sample", k] / 127.5 - 1 for k in ("cpu", "bf16", "fp32"))
    assert cpu.shape == (8, 16, 16, 3) and cpu.std() > 0.3
    # Tolerance: bf16 keeps 8 significant bits (0.4% per rounding), TF32 11 (0.05%), on the inputs
    # of every matmul. Measured through CPU autocast on this network, bf16 samples lie 0.5% from
    # fp32 (relative L2, after rounding to uint8), TF32 will lie ~8x closer: 3% and 1% leave room
    # for the GPU's other kernels and summation orders, and are far below a wrong sample (~100%).
    record_property("relative L2 to the CPU", f"bf16 {relative(bf16, cpu):.1e}, fp32 {relative(fp32, cpu):.1e}")
    assert relative(fp32, cpu) < 1e-2
    assert 0 < relative(bf16, cpu) < 3e-2
    assert not np.array_equal(bf16, fp32)  # the bf16 run really ran in bf16


def test_compiled_scoring_in_bf16_and_in_fp32_gives_the_cpu_scores(stage_runs, record_property):
    # 16 images x 4 timesteps; each score averages 4 x 1024 squared errors, which averages the
    # rounding out: through CPU autocast bf16 scores lie within 5e-4 (relative) of fp32. 1e-2 for
    # bf16 and 2e-3 for TF32 leave room for the GPU kernels, and stay below the spread of the scores
    # between images (~4% here), which is what Select ranks.
    cpu, bf16, fp32 = (stage_runs["score", k] for k in ("cpu", "bf16", "fp32"))
    rel = lambda a: float(np.abs(a / cpu - 1).max())  # noqa: E731
    record_property("largest relative difference to the CPU", f"bf16 {rel(bf16):.1e}, fp32 {rel(fp32):.1e}")
    assert cpu.shape == (16,) and np.isfinite(cpu).all() and cpu.std() > 0
    assert rel(fp32) < 2e-3
    assert 0 < rel(bf16) < 1e-2


@pytest.mark.skipif(not TWO_GPUS, reason=f"needs two GPUs for the 1-vs-2-rank identity (found {torch.cuda.device_count()})")
def test_two_gpus_give_the_samples_and_scores_of_one(stage_runs):
    names = {torch.cuda.get_device_name(i) for i in range(2)}
    if len(names) > 1:
        pytest.skip(f"the two GPUs differ ({', '.join(sorted(names))}): their kernels may round differently")
    # Sample i and the score of image i depend on the seed and i alone (test_sample / test_score
    # check it bit for bit on CPU), and here both rank counts run batches of the same 4 items. The
    # one freedom left is inductor's choice of reduction kernels, made in each process by timing
    # candidates, which can move a float's last bit: so at most one uint8 level on a few pixels, and
    # scores within 1e-4. Samples from wrong seeds or shards differ everywhere.
    one, two = stage_runs["sample", "bf16"].astype(int), stage_runs["sample", "bf16, 2 ranks"].astype(int)
    assert np.abs(one - two).max() <= 1 and (one != two).mean() < 0.01
    np.testing.assert_allclose(stage_runs["score", "bf16, 2 ranks"], stage_runs["score", "bf16"], rtol=1e-4)


# ----------------------------------------------------------------------------- bench.py's memory model

def test_measured_training_peak_memory_is_within_15_percent_of_the_memory_model(tmp_path, record_property):
    # bench.py --only memory counts weights, gradients, AdamW moments and EMA (20 bytes a parameter)
    # plus the activations the forward saves for backward, measured at 1 and 2 images. The real peak
    # adds what the backward holds briefly (one block's gradient buffers, the flash-attention
    # accumulator, cuBLAS workspace): a few percent at a batch where the activations dominate.
    out = tmp_path / "bench.json"
    proc = start([sys.executable, "bench.py", "--model", "SiT-XL/2", "--image-size", 256, "--batch-size", 64, "--proj",
                  "--only", "train,memory", "--modes", "eager", "--warmup", 1, "--iters", 2, "--json", out],
                 tmp_path / "bench.log")
    finish(proc)
    rows = {r["part"]: r for r in json.load(open(out))["rows"]}
    measured, predicted = rows["train"]["peak_mem_gib"], rows["memory"]["projected_gib"]
    record_property("peak / predicted", f"{measured:.2f} / {predicted:.2f} GiB = {measured / predicted:.3f}")
    assert rows["train"]["images_per_s"] > 0
    assert abs(measured / predicted - 1) <= 0.15


# ----------------------------------------------------------------------------- in this process

@pytest.fixture
def tf32_restored():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def training_steps(bf16, compiled, n=3):
    """train.py's step on SiT-T/2 (64 tokens) with every part on (REPA projector, DC-Embedding,
    clipping, fused AdamW, EMA), from one set of random weights and one batch: (the (L_diff, L_proj)
    of n steps (n, 2), the first step's gradient, flat)."""
    from copy import deepcopy
    from train import make_step, step_noise
    g = torch.Generator().manual_seed(0)
    model = models.DiT_models["SiT-T/2"](input_size=16, num_classes=10, z_dims=[32], encoder_depth=2, text_len=5,
                                         text_dim=12)
    with torch.no_grad():  # away from adaLN-Zero's all-zero start, which would hide the precision
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.y_embedder.text_emb.copy_(torch.randn(10, 5, 12, generator=g))
        model.y_embedder.text_mask.fill_(True)
    x, y = torch.randn(8, 4, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    vis = torch.randn(8, 8, 32, generator=g)
    model, x, y, vis = model.cuda(), x.cuda(), y.cuda(), vis.cuda()
    ema = deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = make_step(model, ema, opt, "sit", net=torch.compile(model) if compiled else model, bf16=bf16, ema_decay=0.9)
    out, grad = [], None
    for s in range(n):
        out.append(torch.stack(step(x, y, vis, *step_noise("sit", s, x.shape, x.device))))
        if s == 0:
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return torch.stack(out).cpu(), grad.double().cpu()


def test_the_compiled_training_step_gives_the_eager_losses_and_gradients(tf32_restored, record_property):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref_loss, ref_grad = training_steps(bf16=False, compiled=False)  # fp32, no TF32: the reference
    fast_cuda_defaults()                                              # TF32 as train.py sets it
    eager_loss, eager_grad = training_steps(bf16=True, compiled=False)
    comp_loss, comp_grad = training_steps(bf16=True, compiled=True)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    record_property("gradient, relative L2", f"compiled vs eager {rel(comp_grad, eager_grad):.1e}, "
                                             f"eager vs fp32 {rel(eager_grad, ref_grad):.1e}")
    # Tolerance. Compiled and eager call the same matmul and attention kernels; inductor fuses the
    # elementwise work between them and keeps it in fp32 registers where eager rounds every result
    # to bf16. Through CPU autocast on this network the compiled losses lie within 0.1% of the eager
    # ones and both within 0.4% of fp32, the first gradient within 0.7% and 1% (relative L2): 1% / 3%
    # for the losses and 3% / 5% for the gradient leave room for the GPU's kernels. A wrong
    # compiled backward (a missing term, a wrong sign) moves the gradient by tens of percent, and
    # through the AdamW step (lr 1e-3) the losses of steps 2 and 3.
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-2, atol=1e-3)
    for loss in (eager_loss, comp_loss):
        torch.testing.assert_close(loss, ref_loss, rtol=3e-2, atol=1e-3)
    assert not torch.equal(eager_loss, ref_loss)  # bf16 really ran
    assert rel(comp_grad, eager_grad) < 3e-2 and rel(eager_grad, ref_grad) < 5e-2 and rel(comp_grad, ref_grad) < 5e-2


def head_dim_sizes():
    """Every registry size, by head dim (the first size of each head dim, for compiling)."""
    dims = {}
    for size, s in models.SIZES.items():
        dims.setdefault(s["hidden_size"] // s["num_heads"], []).append(size)
    return dims


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_attention_of_every_model_size_runs_a_fused_sdpa_kernel_forward_and_backward(mode, tf32_restored,
                                                                                     record_property):
    # A one-block network of each size at 256 px (32x32 latents, 256 tokens), forward and backward in
    # bf16 autocast as train.py runs it. The profiler names the ATen op that served the attention:
    # the check is the kernel, not the output (the math fallback gives the same output, slowly).
    # Compiled, the first size of each head dim stands for the others: the kernel choice depends on
    # the head dim, dtype and layout, not on the width.
    sizes = [s for group in head_dim_sizes().values() for s in (group if mode == "eager" else group[:1])]
    found, wrong = {}, {}
    for size in sizes:
        cfg = models.SIZES[size]
        torch.manual_seed(0)
        net = models.DiT(input_size=32, patch_size=2, hidden_size=cfg["hidden_size"], depth=1,
                         num_heads=cfg["num_heads"], num_classes=10).cuda()
        f = torch.compile(net, dynamic=False) if mode == "compile" else net
        x, t, y = (v.cuda() for v in (torch.randn(2, 4, 32, 32), torch.rand(2), torch.tensor([1, 2])))

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = f(x, t, y)
            out.float().square().mean().backward()
        step()  # compiles
        ops = bench.sdpa_ops(step)
        torch.cuda.synchronize()
        fwd = [k for k in FUSED if ops[f"aten::_scaled_dot_product_{k}_attention"]]
        bwd = [k for k in FUSED if ops[f"aten::_scaled_dot_product_{k}_attention_backward"]]
        found[size] = f"{'/'.join(fwd) or 'none'} (head dim {cfg['hidden_size'] // cfg['num_heads']})"
        if len(fwd) != 1 or len(bwd) != 1 or ops["aten::_scaled_dot_product_attention_math"]:
            wrong[size] = dict(ops)
    record_property("kernels", ", ".join(f"{k}: {v}" for k, v in found.items()))
    assert not wrong, f"sizes whose attention did not run one fused SDPA kernel each way: {wrong}"


def test_inception_features_on_cuda_equal_the_cpu_features(tmp_path, tf32_restored):
    # fid.py's network (random weights in the pytorch-fid layout) through fid.py's own loading and
    # feature loop, with TF32 off as fid.py sets it by default. Float32 convolutions of cuDNN and of
    # the CPU differ in summation order only: ~1e-6 relative after the 20 layers, so 1e-4 holds.
    torch.save(random_inception_state(), tmp_path / "inception.pth")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    side = (images.shape, lambda bs: (images[i:i + bs] for i in range(0, len(images), bs)))
    feats = {}
    for dev in ("cpu", "cuda"):
        net = fid.load_inception(str(tmp_path / "inception.pth"), torch.device(dev))
        feats[dev] = fid.inception_features(net, side, 4, torch.device(dev), f"inception {dev}")[:3]
    for name, cpu, cuda in zip(("pool_3", "spatial", "logits"), feats["cpu"], feats["cuda"]):
        assert cpu.std() > 0.1, name  # random weights that still carry a signal
        np.testing.assert_allclose(cuda, cpu, rtol=1e-4, atol=1e-4, err_msg=name)
