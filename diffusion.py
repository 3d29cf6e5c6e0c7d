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
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def objective_of(model_name):
    """'ddpm' for DiT-*, 'sit' for SiT-* registry names."""
    return "ddpm" if model_name.startswith("DiT") else "sit"


def mean_flat(x):
    return x.float().mean(dim=list(range(1, x.ndim)))


def _extract(arr, t, ndim):
    """arr[t] (float64 numpy table) as a float32 tensor broadcastable against ndim-d data."""
    out = torch.from_numpy(arr).to(t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


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
        self.posterior_mean_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)


def linear_betas(num_timesteps=1000):
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
        logvar = frac * _extract(np.log(s.betas), t, xt.ndim) + (1 - frac) * _extract(s.posterior_log_variance_clipped, t, xt.ndim)
    else:  # fixed small variance
        logvar = _extract(s.posterior_log_variance_clipped, t, xt.ndim).expand_as(xt)
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


def sample_time(objective, n, device, generator=None, weighting="uniform", num_timesteps=1000):
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
