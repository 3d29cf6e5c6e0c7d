"""
The two objectives and their samplers, each a short function.

DiT: DDPM with linear betas 1e-4..0.02 over 1000 steps, epsilon prediction, integer timesteps
0..999 fed to the network, and (with learn_sigma) the variance interpolation trained by the
variational-bound term on a detached mean, as in facebookresearch/DiT.

SiT: the linear interpolant in REPA's convention: x_t = (1 - t) x + t eps (t = 1 is noise),
velocity target v = eps - x, t in [0, 1] fed to the network unscaled. Official SiT checkpoints
use the reverse time (t = 1 is data); `ReverseTime` adapts them.

Every loss is returned per sample (N,), so score.py uses the same functions as train.py.
"""
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_TIMESTEPS = 1000  # DiT's DDPM: integer training timesteps 0..999


def objective_of(model_name):
    """'ddpm' for DiT-*, 'sit' for SiT-* registry names."""
    return "ddpm" if model_name.startswith("DiT") else "sit"


def mean_flat(x):
    return x.float().mean(dim=list(range(1, x.ndim)))


_TABLES = {}


def _extract(arr, t, ndim):
    """arr[t] (float64 numpy table) as a float32 tensor broadcastable against ndim-d data. The table
    is copied to t's device once and cached, so a training step makes no host-to-device copy."""
    key = (id(arr), str(t.device))
    if key not in _TABLES or _TABLES[key][0] is not arr:
        if len(_TABLES) > 512:  # schedules made per sampling batch: keep the cache bounded
            _TABLES.clear()
        _TABLES[key] = (arr, torch.from_numpy(arr).float().to(t.device))
    return _TABLES[key][1][t].reshape(-1, *([1] * (ndim - 1)))


#################################################################################
#                                      DDPM                                      #
#################################################################################

class DDPMSchedule:
    """The tables of a discrete Gaussian diffusion, float64, from its betas."""

    def __init__(self, betas):
        self.betas = b = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(b)
        self.alphas_cumprod = ac = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = acp = np.append(1.0, ac[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = pv = b * (1.0 - acp) / (1.0 - ac)
        # the variance at t=0 is 0: clip the log with the value at t=1
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(b) > 1 else np.log(pv)
        self.log_betas = np.log(b)
        # fixed large variance (guided-diffusion's default without learned sigma)
        self.log_variance_large = np.log(np.append(pv[1], b[1:])) if len(b) > 1 else np.log(b)
        self.posterior_mean_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)


def linear_betas(num_timesteps=NUM_TIMESTEPS):
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def q_sample(s, x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    return _extract(s.sqrt_alphas_cumprod, t, x0.ndim) * x0 + _extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise


def q_posterior(s, x0, xt, t):
    """Mean and log variance of q(x_{t-1} | x_t, x0)."""
    mean = _extract(s.posterior_mean_coef1, t, xt.ndim) * x0 + _extract(s.posterior_mean_coef2, t, xt.ndim) * xt
    return mean, _extract(s.posterior_log_variance_clipped, t, xt.ndim)


def p_mean_logvar(s, out, xt, t, clip=False):
    """
    The reverse step p(x_{t-1} | x_t) from a model output (eps, or eps plus the variance
    interpolation v in [-1, 1] as DiT learns it). Returns (mean, log variance, x0 estimate).
    """
    C = xt.shape[1]
    eps = out[:, :C]
    if out.shape[1] == 2 * C:
        frac = (out[:, C:] + 1) / 2
        logvar = frac * _extract(s.log_betas, t, xt.ndim) + (1 - frac) * _extract(s.posterior_log_variance_clipped, t, xt.ndim)
    else:
        logvar = _extract(s.log_variance_large, t, xt.ndim).expand_as(xt)
    x0 = _extract(s.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - _extract(s.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps
    if clip:
        x0 = x0.clamp(-1, 1)
    mean, _ = q_posterior(s, x0, xt, t)
    return mean, logvar, x0


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of x in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2)."""
    def cdf(v):  # the tanh approximation of the standard normal CDF, as guided-diffusion
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255)), cdf(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


def ddpm_loss(model, x, y, t, noise, s, vb=True):
    """
    DiT's per-sample loss: mean-squared epsilon error, plus (learned sigma and vb=True) the
    variational bound in bits per dimension with the mean detached, so that term only trains
    the variance. t: int64 (N,) in [0, T). Returns (loss (N,), projector features or None).
    """
    xt = q_sample(s, x, t, noise)
    out = model(xt, t, y)
    out, zs = out if isinstance(out, tuple) else (out, None)
    C = x.shape[1]
    loss = mean_flat((noise - out[:, :C].float()) ** 2)
    if vb and out.shape[1] == 2 * C:
        frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1).float()
        mean, logvar, _ = p_mean_logvar(s, frozen, xt, t)
        true_mean, true_logvar = q_posterior(s, x, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x, mean, 0.5 * logvar)) / math.log(2.0)
        loss = loss + torch.where(t == 0, nll, kl)
    return loss, zs


#################################################################################
#                           Linear interpolant (SiT)                             #
#################################################################################

def sit_loss(model, x, y, t, noise):
    """
    Velocity loss: x_t = (1 - t) x + t eps, target d x_t / dt = eps - x (REPA's convention).
    t: float (N,) in [0, 1]. Returns (loss (N,), projector features or None).
    """
    tt = t.float().reshape(-1, *([1] * (x.ndim - 1)))
    xt = (1 - tt) * x + tt * noise
    out = model(xt, t, y)
    out, zs = out if isinstance(out, tuple) else (out, None)
    return mean_flat((noise - x - out[:, :x.shape[1]].float()) ** 2), zs


def sample_time(objective, n, device, generator=None, weighting="uniform", num_timesteps=NUM_TIMESTEPS):
    """Training times: integer steps for DDPM; uniform or logit-normal(0, 1) in [0, 1] for SiT."""
    if objective == "ddpm":
        return torch.randint(0, num_timesteps, (n,), device=device, generator=generator)
    if weighting == "lognormal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))
    return torch.rand(n, device=device, generator=generator)


def diffusion_loss(objective, model, x, y, t, noise, schedule=None, vb=True):
    """One entry point for both objectives: (loss (N,), projector features or None)."""
    if objective == "ddpm":
        return ddpm_loss(model, x, y, t, noise, schedule, vb=vb)
    return sit_loss(model, x, y, t, noise)


def projection_loss(zs, targets):
    """
    REPA alignment: negative cosine similarity between each projector's tokens and the target
    features, averaged over tokens (the first h tokens when the target has h < T), per sample.
    zs: list of (N, T, D); targets: list of (N, h, D). Normalised in fp32. Returns (N,).
    """
    loss = 0.0
    for z, v in zip(zs, targets):
        h = v.shape[1]
        z, v = F.normalize(z[:, :h].float(), dim=-1), F.normalize(v.float(), dim=-1)
        loss = loss - (z * v).sum(-1).mean(-1)
    return loss / len(zs)


class ReverseTime(nn.Module):
    """
    Official SiT checkpoints use t = 1 for data and predict d x / dt in that time; this wrapper
    presents them in REPA's convention: v(x, t) = -model(x, 1 - t) on the first C channels.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        out = self.model(x, 1 - t, y)
        return -out[:, :x.shape[1]]


#################################################################################
#                                    Samplers                                    #
#################################################################################
# A sampler takes f(x, t, t_unit) -> model output (made by `guided_model`), the initial noise z
# and, where a step is stochastic, noise() -> a fresh standard normal shaped like z. sample.py
# draws that noise from one generator per sample, so a sample does not depend on its batch.

def guided_model(model, y, cfg_scale=1.0, low=0.0, high=1.0, channels=None, null_class=None):
    """
    f(x, t, t_unit): model(x, t, y) in fp32 with classifier-free guidance u + s (c - u) on the
    first `channels` output channels (default: the C data channels; the rest, e.g. DiT's
    variance, stay conditional; DiT guides 3). The conditional and unconditional (null class)
    rows go through the network as one batch, and only when low <= t_unit <= high (t_unit in
    REPA time, 1 = noise); elsewhere, and for s = 1, only the conditional rows are evaluated.
    """
    null = getattr(model, "num_classes", None) if null_class is None else null_class

    def net(x, t, labels):
        out = model(x, t, labels)
        return (out[0] if isinstance(out, tuple) else out).float()

    def f(x, t, t_unit):
        if cfg_scale == 1 or not low <= t_unit <= high:
            return net(x, t, y)
        cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
        k = channels or x.shape[1]
        return torch.cat([uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)
    return f


def space_timesteps(num_timesteps, spacing):
    """
    The steps a respaced DDPM keeps, as guided-diffusion defines them (sorted list):
    "N1,N2,..." splits the T steps into equal sections (the first T % len ones a step longer)
    and takes N_i steps from section i at a fractional stride (len-1)/(N_i-1), rounded;
    "ddimN" takes range(0, T, k) with the smallest k that gives exactly N steps.
    """
    spacing = str(spacing)
    if spacing.startswith("ddim"):
        n = int(spacing[4:])
        for k in range(1, num_timesteps):
            if len(range(0, num_timesteps, k)) == n:
                return list(range(0, num_timesteps, k))
        raise ValueError(f"cannot take exactly {n} of {num_timesteps} steps with an integer stride")
    counts = [int(c) for c in spacing.split(",")]
    kept, start = set(), 0
    for i, n in enumerate(counts):
        size = num_timesteps // len(counts) + (i < num_timesteps % len(counts))
        if not 0 < n <= size:
            raise ValueError(f"cannot take {n} steps from a section of {size}")
        stride, pos = ((size - 1) / (n - 1) if n > 1 else 1), 0.0
        for _ in range(n):  # accumulated as guided-diffusion does, so rounding ties agree
            kept.add(start + round(pos))
            pos += stride
        start += size
    return sorted(kept)


def respace(schedule, steps):
    """
    The DDPM over the kept steps k_0 < k_1 < ...: betas_i = 1 - abar[k_i] / abar[k_{i-1}]
    (abar before k_0 is 1), so the kept marginals are unchanged. Returns (schedule, k as int64
    array): the network is still fed the original step k_i.
    """
    abar = schedule.alphas_cumprod[np.asarray(steps)]
    return DDPMSchedule(1.0 - abar / np.append(1.0, abar[:-1])), np.asarray(steps, dtype=np.int64)


def _respaced(num_steps, spacing, schedule):
    base = schedule or DDPMSchedule(linear_betas())
    return respace(base, space_timesteps(base.num_timesteps, spacing or num_steps)) + (base.num_timesteps,)


def ddpm_sample(f, z, num_steps=250, noise=None, spacing=None, schedule=None):
    """
    DiT's sampler: ancestral DDPM steps over the schedule respaced to `spacing` (default
    str(num_steps)), learned variance range (or fixed large without it, as DiT's
    create_diffusion(learn_sigma=False)), no clipping, no noise
    at the last step. One model evaluation per step. Returns x_0.
    """
    s, steps, T = _respaced(num_steps, spacing, schedule)
    noise = noise or (lambda: torch.randn_like(z))
    x = z.float()
    for i in reversed(range(len(steps))):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = f(x, torch.full_like(t, int(steps[i])), steps[i] / T)
        mean, logvar, _ = p_mean_logvar(s, out, x, t)
        x = mean + torch.exp(0.5 * logvar) * noise().float() if i > 0 else mean
    return x


def ddim_sample(f, z, num_steps=250, eta=0.0, noise=None, spacing=None, schedule=None):
    """
    DDIM over the same respaced steps: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev -
    sigma^2) eps + sigma noise, sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev);
    eta = 0 is deterministic. Returns x_0.
    """
    s, steps, T = _respaced(num_steps, spacing, schedule)
    noise = noise or (lambda: torch.randn_like(z))
    x = z.float()
    for i in reversed(range(len(steps))):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps = f(x, torch.full_like(t, int(steps[i])), steps[i] / T)[:, :x.shape[1]]
        x0 = _extract(s.sqrt_recip_alphas_cumprod, t, x.ndim) * x - _extract(s.sqrt_recipm1_alphas_cumprod, t, x.ndim) * eps
        ab, ab_prev = _extract(s.alphas_cumprod, t, x.ndim), _extract(s.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = torch.sqrt(ab_prev) * x0 + torch.sqrt(1 - ab_prev - sigma ** 2) * eps
        if i > 0 and eta > 0:
            x = x + sigma * noise().float()
    return x


def _velocity(f, x, t):
    """v(x, t) = E[eps - x0 | x_t] in float64 from the (fp32) network, all rows at time t."""
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    return f(x.float(), tt, float(t))[:, :x.shape[1]].double()


def euler_sample(f, z, num_steps=50):
    """Euler steps of dx/dt = v on t = linspace(1, 0, num_steps + 1). num_steps evaluations."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = z.double()
    for t_cur, t_next in zip(t[:-1], t[1:]):
        x = x + (t_next - t_cur) * _velocity(f, x, t_cur)
    return x.float()


def heun_sample(f, z, num_steps=50, last_correction=True):
    """
    Heun (explicit trapezoid) on t = linspace(1, 0, num_steps + 1). `heun-sit` corrects every step,
    as SiT's fixed-grid ODE solver (torchdiffeq heun2): 2 num_steps evaluations; `heun-repa` skips
    the correction on the last step, as REPA's `--mode ode --heun`: 2 num_steps - 1 evaluations.
    A step is guided when its start time is in the guidance interval (both evaluations), as REPA.
    """
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = z.double()
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        d = _velocity(f, x, t_cur)
        x_pred = x + (t_next - t_cur) * d
        if not last_correction and i == num_steps - 1:
            x = x_pred
            break
        tt = torch.full((x.shape[0],), float(t_next), device=x.device)
        d_next = f(x_pred.float(), tt, float(t_cur))[:, :x.shape[1]].double()
        x = x + (t_next - t_cur) * 0.5 * (d + d_next)
    return x.float()


def sde_sample(f, z, num_steps=250, noise=None, t_last=0.04):
    """
    REPA's (and SiT's default) Euler-Maruyama sampler of the reverse SDE with g(t)^2 = 2t:
    dx = [v - t score] dt + sqrt(2t) dW, score = -(x + (1 - t) v) / t for the linear
    interpolant, on t = linspace(1, t_last, num_steps), then one noise-free step to 0.
    num_steps evaluations.
    """
    t = torch.cat([torch.linspace(1, t_last, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    noise = noise or (lambda: torch.randn_like(z))
    x = z.double()
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        v = _velocity(f, x, t_cur)
        score = -(x + (1 - t_cur) * v) / t_cur
        x = x + (t_next - t_cur) * (v - t_cur * score)
        if i < num_steps - 1:
            x = x + torch.sqrt(2 * t_cur * (t_cur - t_next)) * noise().double()
    return x.float()


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "euler": euler_sample, "sde": sde_sample,
            "heun-sit": heun_sample, "heun-repa": functools.partial(heun_sample, last_correction=False)}
SAMPLER_OBJECTIVE = {"ddpm": "ddpm", "ddim": "ddpm", "euler": "sit", "heun-sit": "sit", "heun-repa": "sit", "sde": "sit"}
