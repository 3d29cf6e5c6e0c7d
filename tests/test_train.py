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


# ----------------------------------------------------------------------------- the script

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
    cmd = script_cmd(base[0], nproc) + base[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
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
    assert set(ck) == {"model", "ema", "opt", "args", "step", "config", "meta"}


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
    cmd = [*script_cmd("train.py", nproc), "--data-path", str(data), "--results-dir", str(tmp_path / "r"),
           "--model", "DiT-T/4", "--max-steps", "1", "--global-batch-size", "8", *flags]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
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
