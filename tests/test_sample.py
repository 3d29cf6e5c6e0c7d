"""
Samplers (diffusion.py) and sample.py.

The samplers are checked against data whose optimal denoiser is known in closed form: class c
has x ~ N(mu_c, S^2 I); the "model" returns E[eps | x_t, c] (DDPM) or E[eps - x | x_t, c]
(interpolant), and for the null class the same under the equal mixture of classes. For such
data the deterministic samplers must carry noise z to mu_c + S z, the stochastic ones must
produce N(mu_c, S^2 I). The CLI is run as a subprocess on a tiny random network in pixel space.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffusion as D  # noqa: E402
import models  # noqa: E402
import launch
from launch import script_cmd

S = 0.5                                   # data standard deviation
MU = (-1.0, 1.5)                          # class means (every coordinate)
SHAPE = (2, 2, 2)
N = 4000


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(old)


class ClosedForm(nn.Module):
    """
    The optimal prediction for two Gaussian classes, class 2 = null (the mixture). x_t = a x + b eps
    with (a, b) = (sqrt(abar_t), sqrt(1 - abar_t)) for DDPM (integer t) or (1 - t, t) for the
    interpolant. Given c, x_t ~ N(a mu_c, (a^2 S^2 + b^2) I), so E[eps | x_t, c] = b (x_t - a mu_c) / var
    and E[x | x_t, c] = mu_c + a S^2 (x_t - a mu_c) / var. Counts calls and rows.
    """

    def __init__(self, kind, var_channel=None):
        super().__init__()
        self.kind, self.var_channel, self.num_classes = kind, var_channel, 2
        self.abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
        self.calls, self.rows, self.times = 0, 0, []

    def forward(self, x, t, y):
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        self.times.append(t[0].item())
        if self.kind == "ddpm":
            ab = self.abar[t].float().view(-1, 1, 1, 1)
            a, b = ab.sqrt(), (1 - ab).sqrt()
        else:
            tt = t.float().view(-1, 1, 1, 1)
            a, b = 1 - tt, tt
        var = a * a * S * S + b * b
        preds, logp = [], []
        for mu in MU:
            r = x - a * mu
            eps = b * r / var
            preds.append(eps if self.kind == "ddpm" else eps - (mu + a * S * S * r / var))
            logp.append(-(r ** 2).sum((1, 2, 3)) / (2 * var.flatten()))
        w = torch.softmax(torch.stack(logp), 0).view(2, -1, 1, 1, 1)
        preds = torch.stack(preds)
        out = torch.where((y == 2).view(-1, 1, 1, 1), (w * preds).sum(0), preds[y.clamp(max=1), torch.arange(len(y))])
        if self.var_channel is not None:
            out = torch.cat([out, torch.full_like(out, self.var_channel)], 1)
        return out


def run(sampler, model, z, y, steps, cfg=1.0, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    noise = lambda: torch.randn(z.shape, generator=g)  # noqa: E731
    if sampler in ("ddpm", "ddim", "sde"):
        kw["noise"] = noise
    return D.SAMPLERS[sampler](D.guided_model(model, y, cfg, **kw.pop("guide", {})), z, steps, **kw)


def data(n=N, label=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.full((n,), label, dtype=torch.long)


def assert_gaussian(x, mu, rel_var=0.04):
    se = S / (x.numel() ** 0.5)
    assert abs(x.mean().item() - mu) < 5 * se + 0.005, (x.mean().item(), mu)
    assert abs(x.var().item() / S ** 2 - 1) < rel_var, x.var().item()


# ----------------------------------------------------------------------------- exact references

def test_deterministic_samplers_carry_noise_to_the_exact_transport_map():
    # For isotropic Gaussian data the probability-flow ODE is affine: z -> mu + S z.
    z, y = data(2000)
    target = MU[1] + S * z
    heun = run("heun-sit", ClosedForm("sit"), z, y, 50)
    assert (heun - target).abs().max() < 2e-3                                   # second order
    for sampler, kind in (("euler", "sit"), ("ddim", "ddpm")):
        err50 = (run(sampler, ClosedForm(kind), z, y, 50) - target).abs().mean()
        err250 = (run(sampler, ClosedForm(kind), z, y, 250) - target).abs().mean()
        assert err250 < 0.01 and 3 < err50 / err250 < 7, (sampler, err50, err250)  # first order


def test_ddpm_respaced_250_steps_samples_the_data_distribution():
    z, y = data()
    large = run("ddpm", ClosedForm("ddpm", var_channel=1.0), z, y, 250)       # v = +1: variance beta_t
    assert_gaussian(large, MU[1])
    small = run("ddpm", ClosedForm("ddpm", var_channel=-1.0), z, y, 250)      # v = -1: posterior variance
    assert small.var() < large.var() - 0.005                                  # the variance channel is used


def test_euler_maruyama_sde_samples_the_data_distribution():
    z, y = data()
    assert_gaussian(run("sde", ClosedForm("sit"), z, y, 250), MU[1])


def test_ddpm_feeds_the_network_the_original_timesteps_of_the_respacing():
    model = ClosedForm("ddpm", var_channel=0.0)
    z, y = data(4)
    run("ddpm", model, z, y, 10)
    stride = 999 / 9
    assert model.times == [round(i * stride) for i in range(10)][::-1]


# ----------------------------------------------------------------------------- guidance

@pytest.mark.parametrize("sampler,kind", [("ddpm", "ddpm"), ("ddim", "ddpm"), ("euler", "sit"),
                                          ("heun-sit", "sit"), ("heun-repa", "sit"), ("sde", "sit")])
def test_guidance_scale_one_is_no_guidance_and_larger_scales_push_past_the_class_mean(sampler, kind):
    z, y = data(1000)
    var = 1.0 if kind == "ddpm" else None
    plain_model = ClosedForm(kind, var)
    g = torch.Generator().manual_seed(1)
    kw = {"noise": lambda: torch.randn(z.shape, generator=g)} if sampler in ("ddpm", "ddim", "sde") else {}
    plain = D.SAMPLERS[sampler](lambda x, t, _: plain_model(x, t, y), z, 50, **kw)
    one_model = ClosedForm(kind, var)
    one = run(sampler, one_model, z, y, 50, cfg=1.0)
    assert torch.equal(one, plain) and one_model.rows == plain_model.rows   # no unconditional rows
    # scale 0 is the unconditional model: the mixture of both classes (mean 0.25, variance S^2 + 1.5625)
    uncond = run(sampler, ClosedForm(kind, var), z, y, 50, cfg=0.0)
    assert abs(uncond.mean() - 0.25) < 0.15 and abs(uncond.var() - (S * S + 1.5625)) < 0.25
    # scale 3 moves the class away from the other one: mean beyond mu_1 = 1.5
    strong = run(sampler, ClosedForm(kind, var), z, y, 50, cfg=3.0)
    assert strong.mean() > one.mean() + 0.01 > uncond.mean() + 0.5


def heun_by_hand(v, z, n, last_correction):
    """Heun written out step by step from its definition, on t_i = 1 - i / n (float64)."""
    x = z.double()
    for i in range(n):
        t0, t1 = 1 - i / n, 1 - (i + 1) / n
        d0 = v(x, t0)
        euler = x + (t1 - t0) * d0
        x = euler if (i == n - 1 and not last_correction) else x + (t1 - t0) * (d0 + v(euler, t1)) / 2
    return x.float()


@pytest.mark.parametrize("name,last", [("heun-sit", True), ("heun-repa", False)])
def test_heun_sit_corrects_every_step_and_heun_repa_all_but_the_last(name, last):
    # SiT's fixed-grid solver (torchdiffeq heun2) corrects every step: 2N evaluations; REPA's
    # `--mode ode --heun` skips the correction of the last step: 2N - 1.
    z, y = data(5)
    model = ClosedForm("sit")
    got = run(name, model, z, y, 6)
    assert model.calls == (12 if last else 11)

    def v(x, t):
        return ClosedForm("sit")(x.float(), torch.full((len(x),), float(t)), y).double()
    torch.testing.assert_close(got, heun_by_hand(v, z, 6, last), rtol=0, atol=1e-6)
    other = heun_by_hand(v, z, 6, not last)
    assert (got - other).abs().max() > 1e-3                                   # the two variants differ


def test_pixel_rounding_floor_is_repa_and_half_up_is_dit():
    sys.path.insert(0, ROOT)
    import sample
    x = torch.tensor([-1.0, -0.9961, 0.0, 0.5, 0.999, 1.0, 1.2]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    # by hand: 127.5 (x + 1) = 0, 0.4973, 127.5, 191.25, 254.87, 255, 280.5
    assert sample.to_uint8(x, None, 1.0, "floor")[0, 0, :, 0].tolist() == [0, 0, 127, 191, 254, 255, 255]
    assert sample.to_uint8(x, None, 1.0, "half-up")[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255, 255]


def test_guidance_interval_evaluates_unconditional_rows_only_inside_it():
    z, y = data(3)
    model = ClosedForm("sit")
    run("sde", model, z, y, 250, cfg=1.8, guide={"high": 0.7})
    t = np.linspace(1, 0.04, 250)                             # REPA's grid; the last step starts at 0.04
    inside = int((t <= 0.7).sum())
    assert model.calls == 250 and model.rows == 3 * (250 + inside)
    model = ClosedForm("ddpm", var_channel=0.0)
    run("ddpm", model, z, y, 250, cfg=1.5, guide={"low": 0.2, "high": 0.6})
    kept = {round(i * 999 / 249) for i in range(250)}
    inside = sum(0.2 <= k / 1000 <= 0.6 for k in kept)
    assert model.calls == 250 and model.rows == 3 * (250 + inside)


def test_cfg_channels_guides_only_the_first_channels_and_keeps_the_rest_conditional():
    def model(x, t, y):  # conditional rows predict 1, unconditional 0, in 8 channels
        return (y < 5).float().view(-1, 1, 1, 1).expand(-1, 8, *x.shape[2:])
    x, y = torch.zeros(2, 4, 2, 2), torch.tensor([0, 1])
    out = D.guided_model(model, y, 1.5, channels=3, null_class=5)(x, torch.zeros(2), 0.5)
    assert torch.equal(out[:, :3], torch.full_like(out[:, :3], 1.5)) and torch.equal(out[:, 3:], torch.ones_like(out[:, 3:]))
    out = D.guided_model(model, y, 1.5, null_class=5)(x, torch.zeros(2), 0.5)   # default: the 4 data channels
    assert (out[:, :4] == 1.5).all() and (out[:, 4:] == 1).all()


# ----------------------------------------------------------------------------- DDPM respacing

@pytest.mark.parametrize("name,sampler", [("DiT-T/4", "ddpm"), ("DiT-T/4", "ddim"), ("SiT-T/4", "sde"),
                                          ("SiT-T/4", "heun-sit")])
def test_samplers_under_bf16_autocast_return_fp32_within_bf16_rounding_of_fp32(name, sampler):
    # sample.py's CUDA precision, run through CPU autocast: same ops, same dtype rules. bf16 keeps
    # 8 significant bits (0.4% per rounding), so 10 guided steps land within a few percent.
    torch.manual_seed(0)
    net = models.DiT_models[name](input_size=16, num_classes=10, learn_sigma=name.startswith("DiT")).eval()
    for p in net.parameters():  # the zero-initialised output layer would hide the precision
        p.data.normal_(0, 0.1)
    y, z = torch.randint(0, 10, (3,)), torch.randn(3, 4, 16, 16)
    out = []
    for bf16 in (False, True):
        g = torch.Generator().manual_seed(1)
        kw = {"noise": lambda: torch.randn(3, 4, 16, 16, generator=g)} if sampler != "heun-sit" else {}
        f = D.guided_model(net, y, 1.5, 0.0, 0.7, null_class=10)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(D.SAMPLERS[sampler](f, z, 10, **kw))
    fp32, bf16 = out
    assert bf16.dtype == torch.float32
    rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < rel < 0.05  # > 0: the network really ran in bf16


def test_space_timesteps_follows_the_guided_diffusion_definition():
    assert D.space_timesteps(1000, "250") == [round(i * 999 / 249) for i in range(250)]
    assert D.space_timesteps(1000, 250) == D.space_timesteps(1000, "250")
    assert D.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert D.space_timesteps(1000, "1000") == list(range(1000))
    # three sections of 100 steps, 10 / 15 / 20 steps from each at stride 99 / (n - 1), the
    # position accumulated in floating point: 7 strides of 99/14 sum to just under 49.5, so 149
    expect = []
    for sec, n in enumerate((10, 15, 20)):
        pos = 0.0
        for _ in range(n):
            expect.append(100 * sec + round(pos))
            pos += 99 / (n - 1)
    assert D.space_timesteps(300, "10,15,20") == sorted(expect) and 149 in expect
    with pytest.raises(ValueError):
        D.space_timesteps(1000, "ddim300")              # no integer stride gives 300 of 1000


def test_respaced_betas_keep_the_marginals_of_the_kept_steps():
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    kept = D.space_timesteps(1000, "250")
    s, steps = D.respace(D.DDPMSchedule(D.linear_betas()), kept)
    prev = np.concatenate([[1.0], abar[kept][:-1]])
    np.testing.assert_allclose(s.betas, 1 - abar[kept] / prev, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod, abar[kept], rtol=1e-10)
    assert steps.tolist() == kept


# ----------------------------------------------------------------------------- sample.py

def cli(*args, nproc=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:   # forked from the tests' preloaded server
        p = launch.run("sample.py", args, ROOT, env, timeout=300)
    else:
        p = subprocess.run(script_cmd("sample.py", nproc) + [*map(str, args)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def tiny_checkpoint(path, name="SiT-S/8", input_size=8, saved_input_size=None, **extra):
    """Our train.py layout, random weights (the real init makes the output 0), pixel space; extra:
    more constructor kwargs (z_dims etc.)."""
    kw = dict(input_size=input_size, in_channels=3, num_classes=4, learn_sigma=name.startswith("DiT"), **extra)
    torch.manual_seed(0)
    net = models.DiT_models[name](**{**kw, "input_size": saved_input_size or input_size})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    meta = {"vae": "none", "vae_id": None, "latent_scale": 1.0, "image_size": input_size, "num_classes": 4,
            "class_names": ["a", "b", "c", "d"]}
    sd = net.state_dict()
    torch.save({"config": {"model": name, "kwargs": kw}, "model": sd, "ema": sd, "meta": meta}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "sit.pt")


def pngs(d, n):
    return np.stack([np.asarray(Image.open(f"{d}/{i:06d}.png")) for i in range(n)])


SETTINGS = ["--num-fid-samples", 7, "--num-steps", 4, "--cfg-scale", 2.0, "--guidance-high", 0.7]


def test_samples_do_not_depend_on_processes_or_batch_size_and_npz_matches_the_pngs(ckpt, tmp_path):
    cli("--ckpt", ckpt, "--sample-dir", tmp_path / "a", "--per-proc-batch-size", 4, *SETTINGS)
    cli("--ckpt", ckpt, "--sample-dir", tmp_path / "b", "--per-proc-batch-size", 3, *SETTINGS)
    # 2 ranks over 4 chunks: every rank checks every chunk marker before rank 0 commits them away
    cli("--ckpt", ckpt, "--sample-dir", tmp_path / "c", "--per-proc-batch-size", 2, "--chunk-size", 2, *SETTINGS,
        nproc=2)
    a = np.load(tmp_path / "a.npz")["arr_0"]
    assert a.shape == (7, 8, 8, 3) and a.dtype == np.uint8 and a.std() > 10
    np.testing.assert_array_equal(a, pngs(tmp_path / "a", 7))           # arr_0[i] is DIR/i.png
    for other in ("b", "c"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{other}.npz")["arr_0"], a)
    assert len(set(map(bytes, a))) == 7                                 # every sample differs
    # labels: the first draw of each sample's generator, seeded global_seed * 1_000_003 + i (seed 0)
    expected = [int(torch.randint(4, (), generator=torch.Generator().manual_seed(i))) for i in range(7)]
    assert np.load(tmp_path / "a.npz")["labels"].tolist() == expected
    grid = np.asarray(Image.open(tmp_path / "a_grid.png"))
    assert grid.shape == (3 * 8 * 11, 3 * 8 * 11, 3)                   # 24 px upscaled 11x to >= 256 px
    np.testing.assert_array_equal(grid[8 * 11:16 * 11:11, 0:8 * 11:11], a[3])
    assert (grid[::11, ::11].repeat(11, 0).repeat(11, 1) == grid).all()  # nearest: 11x11 blocks


def test_a_stopped_run_makes_only_the_missing_chunks_and_a_finished_one_nothing(ckpt, tmp_path):
    d = tmp_path / "s"
    args = ("--ckpt", ckpt, "--sample-dir", d, "--per-proc-batch-size", 2, "--chunk-size", 3, *SETTINGS)
    p = cli(*args, "--stop-after-chunks", 1, check=False)  # as if killed after the first chunk
    assert p.returncode == 1 and "--stop-after-chunks" in p.stderr.splitlines()[-1]
    assert not d.exists() and sorted(os.listdir(f"{d}.partial"))[:3] == ["000000.png", "000001.png", "000002.png"]
    os.utime(f"{d}.partial/000000.png", (1, 1))                         # a finished chunk stays untouched
    p = cli(*args)
    assert "1 of 3 chunks already done; 4 samples to do" in p.stdout
    assert os.stat(d / "000000.png").st_mtime == 1 and not os.path.exists(f"{d}.partial")
    full = tmp_path / "full"
    cli("--ckpt", ckpt, "--sample-dir", full, "--per-proc-batch-size", 4, *SETTINGS)
    np.testing.assert_array_equal(pngs(d, 7), pngs(full, 7))
    np.testing.assert_array_equal(np.load(f"{d}.npz")["arr_0"], pngs(full, 7))
    assert "already complete" in cli(*args).stdout


# ----------------------------------------------------------------------------- short runs, grayscale

@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """20 steps of train.py at --ema-decay 0.999 on a grayscale pixel dataset (N, 1, 8, 8), with a
    fixed decay and with --ema-warmup: {"fixed": ckpt, "warmup": ckpt}."""
    root = tmp_path_factory.mktemp("short")
    data = root / "data"
    os.makedirs(data)
    rng = np.random.default_rng(0)
    np.save(data / "latents.npy", rng.uniform(-1, 1, (16, 1, 8, 8)).astype(np.float16))
    np.save(data / "labels.npy", np.arange(16) % 2)
    json.dump({"num_classes": 2, "class_names": ["Ankle boot", "Bag"], "image_size": 8, "channels": 1,
               "vae": "none", "vae_id": None, "latent_scale": 1.0}, open(data / "meta.json", "w"))
    runs = {}
    for name, extra in (("fixed", []), ("warmup", ["--ema-warmup"])):
        argv = ["--data-path", data, "--results-dir", root / name, "--model", "SiT-T/4", "--max-steps", 20,
                "--ema-decay", 0.999, "--global-batch-size", 8, "--num-workers", 0, "--ckpt-every", 20, *extra]
        p = launch.run("train.py", argv, ROOT, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = str(root / name / "checkpoints" / "0000020.pt")
    return runs


SHORT = ["--num-fid-samples", 4, "--num-steps", 2, "--sampler", "euler", "--grid", 4]


def test_an_ema_still_mostly_the_initialisation_is_refused_with_one_line_naming_the_fixes(short_runs, tmp_path):
    p = cli("--ckpt", short_runs["fixed"], "--sample-dir", tmp_path / "s", *SHORT, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    # 0.999 ** 20 of the initial weights is left
    assert lines[0].startswith(f"error: --ckpt {short_runs['fixed']}: its EMA weights are still 98.0% the initialisation")
    assert all(s in lines[0] for s in ("--ema-decay 0.999 after 20 steps", "train longer", "--ema-warmup", "--no-ema"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("run,flags", [("warmup", []), ("fixed", ["--no-ema"])])
def test_a_warmed_up_ema_or_the_raw_weights_sample_and_grayscale_stays_grayscale(short_runs, run, flags, tmp_path):
    d = tmp_path / "s"
    cli("--ckpt", short_runs[run], "--sample-dir", d, *SHORT, *flags)
    arr = np.load(f"{d}.npz")["arr_0"]
    assert arr.shape == (4, 8, 8, 3) and arr.dtype == np.uint8 and arr.std() > 1
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
    for i in range(4):
        img = Image.open(d / f"{i:06d}.png")
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), arr[i, ..., 0])
    grid = Image.open(f"{d}_grid.png")
    assert grid.mode == "L" and grid.size == (2 * 8 * 16, 2 * 8 * 16)


def test_a_grayscale_dataset_through_a_vae_comes_back_as_the_luma_of_the_decoded_rgb():
    import sample
    from types import SimpleNamespace
    rgb = torch.rand(2, 3, 4, 4) * 2 - 1
    vae = SimpleNamespace(decode=lambda z: SimpleNamespace(sample=rgb))
    out = sample.to_uint8(torch.zeros(2, 4, 1, 1), vae, 0.18215, gray=True)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]            # ITU-R 601, PIL's "L"
    assert out.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(out[..., 0], np.floor(255 * (luma.numpy() + 1) / 2).clip(0, 255))
    assert sample.to_uint8(torch.zeros(2, 4, 1, 1), vae, 0.18215).shape == (2, 4, 4, 3)


def test_a_checkpoint_trained_with_alignment_samples_without_computing_its_projectors(tmp_path):
    # train.py with vis.npy saves REPA projectors; they serve the loss alone
    from torch.utils.flop_counter import FlopCounterMode
    from common import load_model
    kw = dict(input_size=8, in_channels=3, num_classes=4, learn_sigma=False)
    aligned = dict(z_dims=[16], projector_dim=64, encoder_depth=2)
    path = tiny_checkpoint(tmp_path / "aligned.pt", "SiT-T/4", **aligned)
    full = models.DiT_models["SiT-T/4"](**kw, **aligned).eval()
    full.load_state_dict(torch.load(path)["ema"])
    net, _ = load_model(path)
    x, t, y = torch.randn(5, 3, 8, 8), torch.rand(5), torch.arange(5) % 4
    f, g = D.guided_model(net, y, cfg_scale=2.0), D.guided_model(full, y, cfg_scale=2.0)
    torch.testing.assert_close(f(x, t, 0.5), g(x, t, 0.5), rtol=0, atol=0)
    bare = models.DiT_models["SiT-T/4"](**kw).eval()  # the same network without projectors
    counts = []
    for m in (net, full, bare):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x, t, y)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[2] < counts[1]


def test_class_balanced_labels_give_each_class_exactly_its_share():
    sys.path.insert(0, ROOT)
    import sample
    labels = sample.class_balanced_labels(40, 4, global_seed=3)
    assert np.bincount(labels.numpy(), minlength=4).tolist() == [10] * 4
    assert torch.equal(labels, sample.class_balanced_labels(40, 4, global_seed=3))
    assert not torch.equal(labels, torch.arange(40) % 4)                # shuffled


def test_bad_input_stops_with_one_clear_line(ckpt, tmp_path):
    def fails(*args):
        p = cli(*args, "--sample-dir", tmp_path / "x", check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        return p.stderr.strip().splitlines()[-1]
    assert "does not exist" in fails("--ckpt", tmp_path / "missing.pt")
    bad = tiny_checkpoint(tmp_path / "bad.pt", input_size=16, saved_input_size=8)
    assert "does not fit SiT-S/8" in fails("--ckpt", bad)
    assert "divisible by the 4 classes" in fails("--ckpt", ckpt, "--class-balanced", "--num-fid-samples", 10)
    assert "--sampler ddpm does not fit" in fails("--ckpt", ckpt, "--sampler", "ddpm")
    os.makedirs(tmp_path / "x")
    json.dump({"request": {"sampler": "euler"}}, open(tmp_path / "x" / "request.json", "w"))
    assert "other settings" in fails("--ckpt", ckpt, "--num-fid-samples", 2)
