"""train.py: the objectives' math, exact resumption, DDP equivalence, bad inputs."""
import json
import math
import os
import signal
import subprocess

import numpy as np
import pytest
import torch

from diffusion import (DDPMSchedule, ddpm_loss, linear_betas, normal_kl, projection_loss, q_posterior, q_sample,
                       sit_loss)
import launch
from launch import script_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- objectives

def test_linear_betas_and_q_sample_match_closed_form():
    s = DDPMSchedule(linear_betas(1000))
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    abar = np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:501])
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([500, 500])
    torch.testing.assert_close(q_sample(s, x0, t, eps), math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps)


def test_posterior_mean_and_variance_match_bayes_rule():
    """q(x_{t-1} | x_t, x0) is the product of N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1}) and
    N(x_t; sqrt(alpha_t) x_{t-1}, beta_t): precision-weighted mean, summed precisions."""
    s = DDPMSchedule(linear_betas(1000))
    t = 300
    b, a = s.betas[t], 1 - s.betas[t]
    abar_prev = np.prod(1 - s.betas[:t])
    x0, xt = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    prec = 1 / (1 - abar_prev) + a / b
    mean = (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(a) * xt / b) / prec
    m, logvar = q_posterior(s, x0, xt, torch.tensor([t]))
    torch.testing.assert_close(m, mean.float(), atol=1e-5, rtol=1e-5)
    assert float(logvar.flatten()[0]) == pytest.approx(math.log(1 / prec), rel=1e-6)


def test_vb_term_is_gaussian_kl_in_bits_and_trains_only_the_variance():
    s = DDPMSchedule(linear_betas(1000))
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    t = torch.tensor([100, 700])
    v = torch.tensor([-0.3, 0.6])
    out_eps = torch.randn(2, 2, 4, 4, requires_grad=True)
    out_v = (v[:, None, None, None] * torch.ones(2, 2, 4, 4)).requires_grad_(True)
    model = lambda xt, tt, y: torch.cat([out_eps, out_v], 1)  # noqa: E731
    loss, _ = ddpm_loss(model, x0, None, t, eps, s)
    xt = q_sample(s, x0, t, eps)
    expected = []
    for i, ti in enumerate(t.tolist()):
        abar, abar_prev, beta = s.alphas_cumprod[ti], s.alphas_cumprod_prev[ti], s.betas[ti]
        post_var = beta * (1 - abar_prev) / (1 - abar)
        true_mean = (math.sqrt(abar_prev) * beta * x0[i] + math.sqrt(1 - beta) * (1 - abar_prev) * xt[i]) / (1 - abar)
        x0_hat = (xt[i] - math.sqrt(1 - abar) * out_eps[i].detach()) / math.sqrt(abar)
        mean = (math.sqrt(abar_prev) * beta * x0_hat + math.sqrt(1 - beta) * (1 - abar_prev) * xt[i]) / (1 - abar)
        frac = (v[i] + 1) / 2
        logvar = frac * math.log(beta) + (1 - frac) * math.log(post_var)
        kl = 0.5 * (logvar - math.log(post_var) + (post_var + (true_mean - mean) ** 2) / torch.exp(logvar) - 1)
        mse = ((eps[i] - out_eps[i].detach()) ** 2).mean()
        expected.append(mse + kl.mean() / math.log(2))
    torch.testing.assert_close(loss.detach(), torch.stack(expected).float(), atol=1e-4, rtol=1e-4)
    # the mean of the VB term is detached: its gradient w.r.t. eps is that of the MSE alone
    loss.sum().backward()
    torch.testing.assert_close(out_eps.grad, 2 * (out_eps.detach() - eps) / eps[0].numel())


def test_normal_kl_of_identical_gaussians_is_zero():
    m, lv = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(5))


def test_sit_target_is_time_derivative_of_interpolant():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    xt = lambda tt: (1 - tt[:, None, None, None]) * x + tt[:, None, None, None] * eps  # noqa: E731
    deriv = torch.autograd.functional.jvp(xt, (t.detach(),), (torch.ones(3),))[1]
    seen = {}
    def model(z, tt, y):
        seen["xt"] = z
        return deriv                                  # the exact velocity
    loss, _ = sit_loss(model, x, None, t.detach(), eps)
    torch.testing.assert_close(seen["xt"], xt(t.detach()))
    assert torch.all(loss < 1e-10)


def test_projection_loss_is_negative_mean_cosine_over_first_h_tokens():
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])   # 3 tokens
    v = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])               # h = 2 targets
    expected = -(1.0 + 1 / math.sqrt(2)) / 2
    torch.testing.assert_close(projection_loss([z], [v]), torch.tensor([expected]))


@pytest.mark.parametrize("name", ["DiT-T/4", "SiT-T/4"])
def test_bf16_autocast_step_keeps_fp32_weights_and_ema_and_matches_the_fp32_losses(name):
    # train.py's CUDA precision through CPU autocast (same dtype rules), with every optional part
    # on: qk-norm, DC-Embedding text, the REPA projector, fused AdamW, clipping, EMA
    from copy import deepcopy
    from models import DiT_models
    from train import make_step, step_noise
    objective = "ddpm" if name.startswith("DiT") else "sit"
    g = torch.Generator().manual_seed(0)
    x, vis = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 16, 32, generator=g)
    y, text = torch.randint(0, 10, (4,), generator=g), torch.randn(10, 5, 12, generator=g)
    noise, t, drop = step_noise(objective, 0, x.shape, "cpu")
    losses = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = DiT_models[name](input_size=16, num_classes=10, learn_sigma=objective == "ddpm", qk_norm=True,
                                 z_dims=[32], encoder_depth=2, text_len=5, text_dim=12)
        for p in model.parameters():  # the zero-initialised layers would hide the precision
            p.data.normal_(0, 0.05)
        model.y_embedder.text_emb.copy_(text)
        model.y_embedder.text_mask.fill_(True)
        ema = deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        out = make_step(model, ema, opt, objective, bf16=bf16, ema_decay=0.9)(x, y, vis, noise, t, drop)
        losses.append(torch.stack(out))
        assert all(p.dtype == torch.float32 for p in [*model.parameters(), *ema.parameters()])
        assert all(s.dtype == torch.float32 for st in opt.state.values() for k, s in st.items() if k != "step")
    fp32, bf16 = losses
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)  # the step really ran in bf16
    torch.testing.assert_close(bf16, fp32, rtol=0.03, atol=1e-3)


def test_precision_auto_is_bf16_on_cuda_only_and_bf16_on_a_cpu_without_native_bf16_stays_fp32_saying_so(monkeypatch):
    import common
    said = []
    for native in (True, False):
        monkeypatch.setattr(common, "cpu_has_bf16", lambda: native)
        assert common.use_bf16("auto", "cpu", said.append) is False
        assert common.use_bf16("fp32", "cuda", said.append) is False
        assert common.use_bf16("auto", "cuda", said.append) is True
        assert common.use_bf16("bf16", "cuda", said.append) is True
        assert common.use_bf16("bf16", "cpu", said.append) is native
    assert len(said) == 1 and "stays fp32" not in said[0] and "running in fp32" in said[0]


# ----------------------------------------------------------------------------- EMA

def scalar_ema(steps, decay_of_step):
    """An EMA of a scalar run by hand: starts at the initial value 1, then follows weights that are 0,
    so what is left after `steps` steps is the weight it still gives the initialisation."""
    ema = 1.0
    for s in range(steps):
        d = decay_of_step(s)
        ema = d * ema + (1 - d) * 0.0
    return ema


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 0.9999])
@pytest.mark.parametrize("steps", [0, 1, 7, 20, 400, 30_000])
def test_ema_weight_on_the_initialisation_in_closed_form_equals_a_scalar_ema_run_by_hand(decay, steps):
    from common import ema_decay_at, ema_init_weight
    assert ema_init_weight(steps, decay) == pytest.approx(scalar_ema(steps, lambda s: decay), rel=1e-9, abs=1e-300)
    warm = lambda s: min(decay, (1 + s) / (10 + s))  # noqa: E731 (the warm-up as --ema-warmup's help states it)
    assert [ema_decay_at(s, decay, True) for s in range(50)] == [warm(s) for s in range(50)]
    assert ema_init_weight(steps, decay, True) == pytest.approx(scalar_ema(steps, warm), rel=1e-9, abs=1e-300)


def test_a_run_shorter_than_five_ema_horizons_warns_once_and_its_checkpoints_carry_the_ema_weight(tmp_path):
    data = make_dataset(tmp_path / "data", vis_tokens=0, text=False)
    args = ("--model", "SiT-T/4", "--max-steps", 4, "--ckpt-every", 2, "--ema-decay", 0.999)
    r = train(data, tmp_path / "fixed", *args)
    warnings = [line for line in r.stdout.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "--max-steps 4 is shorter than 5 horizons of --ema-decay 0.999" in warnings[0]
    assert "--ema-warmup" in warnings[0] and "proj" not in r.stdout  # no alignment: no proj field
    assert load(tmp_path / "fixed", 4)["ema_init_weight"] == pytest.approx(0.999 ** 4)
    r = train(data, tmp_path / "warm", *args, "--ema-warmup", "--max-steps", 2)
    assert "warning:" not in r.stdout
    train(data, tmp_path / "warm", *args, "--ema-warmup")  # resumed at step 2: the product goes on
    assert load(tmp_path / "warm", 4)["ema_init_weight"] == pytest.approx(1 / 10 * 2 / 11 * 3 / 12 * 4 / 13)
    # 5 horizons of decay 0.1 are 5.6 steps
    assert "warning:" not in train(data, tmp_path / "long", *args, "--ema-decay", 0.1, "--max-steps", 6).stdout


# ----------------------------------------------------------------------------- the script

def logged_losses(stdout):
    return [float(line.split(" loss ")[1].split()[0]) for line in stdout.splitlines() if " loss " in line]


@pytest.mark.skipif(not __import__("common").cpu_has_bf16(),
                    reason="this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag): --precision bf16 stays fp32")
def test_precision_bf16_on_a_cpu_with_native_bf16_trains_in_autocast_with_fp32_weights_ema_and_moments(tmp_path):
    data = make_dataset(tmp_path / "data", vis_tokens=0, text=False)
    args = ("--model", "SiT-T/4", "--max-steps", 4, "--ckpt-every", 4, "--log-every", 1, "--lr", 1e-2)
    runs = {p: train(data, tmp_path / p, *args, "--precision", p) for p in ("fp32", "bf16", "auto")}
    assert "bf16 autocast" in runs["bf16"].stdout and "bf16 autocast" not in runs["fp32"].stdout + runs["auto"].stdout
    ck = {p: load(tmp_path / p, 4) for p in runs}
    states = [*ck["bf16"]["model"].values(), *ck["bf16"]["ema"].values(),
              *(s for st in ck["bf16"]["opt"]["state"].values() for k, s in st.items() if k != "step")]
    assert all(s.dtype == torch.float32 for s in states if s.is_floating_point())
    w = "blocks.0.attn.qkv.weight"
    assert torch.equal(ck["auto"]["model"][w], ck["fp32"]["model"][w])     # auto is fp32 on CPU
    assert not torch.equal(ck["bf16"]["model"][w], ck["fp32"]["model"][w])  # bf16 really ran
    fp32, bf16 = logged_losses(runs["fp32"].stdout), logged_losses(runs["bf16"].stdout)
    assert len(fp32) == len(bf16) == 4 and fp32 != bf16
    np.testing.assert_allclose(bf16, fp32, rtol=0.03)


def make_dataset(path, n=24, classes=3, flips=True, vis_tokens=4, text=True, size=8):
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (n, 2, 4, size, size) if flips else (n, 4, size, size)
    np.save(os.path.join(path, "latents.npy"), rng.standard_normal(shape).astype(np.float16))
    np.save(os.path.join(path, "labels.npy"), (np.arange(n) % classes).astype(np.int64))
    if vis_tokens:
        vshape = (n, 2, vis_tokens, 12) if flips else (n, vis_tokens, 12)
        np.save(os.path.join(path, "vis.npy"), rng.standard_normal(vshape).astype(np.float16))
    if text:
        torch.save({"emb": torch.randn(classes, 5, 7), "mask": torch.ones(classes, 5, dtype=torch.bool),
                    "prompts": ["x"] * classes, "encoder": "test"}, os.path.join(path, "text.pt"))
    json.dump({"num_classes": classes, "class_names": [str(i) for i in range(classes)], "image_size": size * 8,
               "vae": "ema", "latent_scale": 0.18215}, open(os.path.join(path, "meta.json"), "w"))
    return path


def train(data, results, *extra, nproc=1, check=True):
    base = ["train.py", "--data-path", str(data), "--results-dir", str(results), "--global-batch-size", "8",
            "--log-every", "2", "--num-workers", "0", "--ema-decay", "0.9", *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:   # forked from the tests' preloaded server
        r = launch.run(base[0], base[1:], ROOT, env, timeout=300)
    else:
        r = subprocess.run(script_cmd(base[0], nproc) + base[1:], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def load(results, step):
    return torch.load(os.path.join(results, "checkpoints", f"{step:07d}.pt"), weights_only=False)


@pytest.mark.parametrize("model,extra", [("DiT-T/4", []), ("SiT-T/4", ["--text-cond"])])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, model, extra):
    data = make_dataset(tmp_path / "data")
    train(data, tmp_path / "straight", "--model", model, "--max-steps", 6, "--ckpt-every", 3, *extra)
    train(data, tmp_path / "resumed", "--model", model, "--max-steps", 3, "--ckpt-every", 3, *extra)
    train(data, tmp_path / "resumed", "--model", model, "--max-steps", 6, "--ckpt-every", 3, *extra)
    a, b = load(tmp_path / "straight", 6), load(tmp_path / "resumed", 6)
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert not torch.equal(a["model"]["blocks.0.attn.qkv.weight"], load(tmp_path / "straight", 3)["model"]["blocks.0.attn.qkv.weight"])


def test_two_gloo_processes_give_the_same_update_as_one(tmp_path):
    data = make_dataset(tmp_path / "data")
    args = ("--model", "SiT-T/4", "--text-cond", "--max-steps", 2, "--ckpt-every", 2)
    train(data, tmp_path / "one", *args)
    train(data, tmp_path / "two", *args, nproc=2)
    a, b = load(tmp_path / "one", 2), load(tmp_path / "two", 2)
    assert a["config"]["kwargs"]["z_dims"] == [12] and a["config"]["kwargs"]["text_len"] == 5
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5, msg=k)


def test_checkpoint_carries_class_text_and_dataset_meta(tmp_path):
    data = make_dataset(tmp_path / "data")
    train(data, tmp_path / "r", "--model", "SiT-T/4", "--text-cond", "--max-steps", 1, "--ckpt-every", 1)
    ck = load(tmp_path / "r", 1)
    text = torch.load(os.path.join(data, "text.pt"))
    assert torch.equal(ck["ema"]["y_embedder.text_emb"], text["emb"])
    assert ck["meta"]["num_classes"] == 3 and ck["config"]["model"] == "SiT-T/4"
    assert set(ck) == {"model", "ema", "opt", "args", "step", "config", "meta", "ema_init_weight"}


def test_nan_loss_stops_with_a_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    data = make_dataset(tmp_path / "data", vis_tokens=0, text=False)
    train(data, tmp_path / "r", "--model", "DiT-T/4", "--max-steps", 2, "--ckpt-every", 2)
    lat = np.load(os.path.join(data, "latents.npy"))
    np.save(os.path.join(data, "latents.npy"), np.full_like(lat, np.nan))
    r = train(data, tmp_path / "r", "--model", "DiT-T/4", "--max-steps", 4, "--ckpt-every", 2, check=False)
    assert r.returncode != 0 and "non-finite" in r.stderr and "0000002.pt" in r.stderr
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["0000002.pt"]


@pytest.mark.parametrize("setup,flags,message,nproc", [
    ("nolatents", [], "run encode.py", 1),
    ("ok", ["--model", "DiT-Q/2"], "--model DiT-Q/2 is unknown", 1),
    ("visrows", [], "re-run attach.py", 1),
    ("vistokens", [], "smaller --vis-tokens", 1),
    ("ok", ["--global-batch-size", "7"], "not divisible by the 2 ranks", 2),
    ("ok", ["--text-cond"], "run attach.py", 1),
    ("ok", ["--activation-memory-budget", "0"], "use a fraction in (0, 1]", 1),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, setup, flags, message, nproc):
    data = tmp_path / "data"
    if setup == "nolatents":
        os.makedirs(data)
    else:
        make_dataset(data, text=False, vis_tokens=4 if setup != "vistokens" else 5)
        if setup == "visrows":
            np.save(data / "vis.npy", np.zeros((5, 2, 4, 12), np.float16))
    argv = ["--data-path", str(data), "--results-dir", str(tmp_path / "r"), "--model", "DiT-T/4", "--max-steps", "1",
            "--global-batch-size", "8", *flags]
    if nproc == 1:   # forked from the tests' preloaded server
        r = launch.run("train.py", argv, ROOT, timeout=120)
    else:
        r = subprocess.run(script_cmd("train.py", nproc) + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert message in r.stderr
    if nproc == 1:
        assert r.stderr.strip().splitlines()[-1].startswith("error:")
    assert not os.path.exists(tmp_path / "r")


SIGNAL_RUN = ("--model", "SiT-T/4", "--max-steps", 60, "--ckpt-every", 1000, "--log-every", 1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal")
    data = make_dataset(root / "data")
    train(data, root / "straight", *SIGNAL_RUN)
    return data, load(root / "straight", 60)


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_signal_saves_the_current_step_and_the_rerun_equals_an_uninterrupted_run(tmp_path, uninterrupted, sig, group):
    # SIGTERM to the trainer (a cluster's preemption notice), or Ctrl-C to the whole process group
    # (loader workers included): the step in flight finishes, is saved, and the run resumes from it.
    (data, a), args = uninterrupted, SIGNAL_RUN
    cmd = script_cmd("train.py") + ["--data-path", str(data), "--results-dir", str(tmp_path / "r"), "--global-batch-size",
                                    "8", "--num-workers", "2", "--ema-decay", "0.9", *map(str, args)]
    # one thread, as train() runs the other two: another thread count sums in another order
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in p.stdout:
        if "step 0000005" in line:
            break
    os.killpg(p.pid, sig) if group else p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert p.returncode == 128 + sig and "Traceback" not in err, err
    saved = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    assert len(saved) == 1 and last == (f"error: interrupted at step {int(saved[0][:7])}: saved "
                                        f"{tmp_path / 'r' / 'checkpoints' / saved[0]}; rerun the same command to resume")
    assert 5 <= int(saved[0][:7]) < 60
    train(data, tmp_path / "r", *args)
    b = load(tmp_path / "r", 60)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_a_damaged_newest_checkpoint_is_named_kept_and_the_run_resumes_from_the_one_before(tmp_path):
    data = make_dataset(tmp_path / "data")
    args = ("--model", "DiT-T/4", "--ckpt-every", 2)
    train(data, tmp_path / "straight", *args, "--max-steps", 3)
    train(data, tmp_path / "r", *args, "--max-steps", 4)
    bad = tmp_path / "r" / "checkpoints" / "0000004.pt"
    damaged = bad.read_bytes()[:1000]  # a disk that filled up while copying
    bad.write_bytes(damaged)
    r = train(data, tmp_path / "r", *args, "--max-steps", 3)
    assert f"warning: {bad} is damaged" in r.stdout and "resumed from" in r.stdout and "0000002.pt" in r.stdout
    assert bad.read_bytes() == damaged
    a, b = load(tmp_path / "straight", 3), load(tmp_path / "r", 3)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
