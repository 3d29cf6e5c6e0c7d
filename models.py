"""
DiT / SiT: a diffusion transformer over latent patches, written by hand.

One network serves both families: DiT (DDPM, epsilon prediction, learned variance) and SiT
(interpolant, velocity prediction) differ only in the objective (diffusion.py). Parameter
names follow facebookresearch/DiT, willisma/SiT and sihyun-yu/REPA, so their public
checkpoints load with strict=True and ours load in their scripts.

Drop-in: this file can replace DiT's models.py, SiT's models.py or REPA's models/sit.py, and
their scripts run unchanged. The registry and the keywords pick what forward returns:
  - DiT_models (facebookresearch/DiT, and all of our stages, DiT-* and SiT-* names): the full
    output, 2C channels with learn_sigma; (output, zs) when z_dims is given.
  - SiT_models without REPA's keywords (willisma/SiT): the velocity only, the first C channels.
  - SiT_models with any of z_dims, encoder_depth, projector_dim, use_cfg, fused_attn, qk_norm
    (REPA's scripts always pass them): REPA's SiT, no learned sigma, z_dims=[768] by default,
    forward returns (output, zs) and accepts return_logvar (ignored, as in REPA).
forward_with_cfg is DiT/SiT's: guidance on the first 3 channels of forward's output.

Optional parts:
  - projectors (REPA): MLPs on the hidden tokens after block `encoder_depth`, aligned to
    pretrained visual features; forward then returns (prediction, [features per projector]).
  - DC-Embedding (D2C): class text embeddings (stored in the model as buffers) turned into
    the class conditioning, y = MLP(t~) + t~ + e_c.
  - qk_norm: LayerNorm on queries and keys per head (as timm's Attention).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for timesteps, class labels and class text     #
#################################################################################

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (N,) -> (N, dim), cos half first (as DiT/SiT/REPA)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> (N, hidden). DiT feeds integer steps 0..999, SiT t in [0, 1]."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


def drop_labels(labels, num_classes, dropout_prob, train, force_drop_ids=None):
    """Classifier-free guidance: replace labels by the null class num_classes with prob dropout_prob."""
    if force_drop_ids is not None:
        drop = force_drop_ids == 1
    elif train and dropout_prob > 0:
        drop = torch.rand(labels.shape[0], device=labels.device) < dropout_prob
    else:
        return labels
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


class LabelEmbedder(nn.Module):
    """Class labels (N,) -> (N, hidden); row num_classes is the null class."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        return self.embedding_table(drop_labels(labels, self.num_classes, self.dropout_prob, train, force_drop_ids))


class DCEmbedder(nn.Module):
    """
    DC-Embedding: y = MLP(t~) + t~ + e_c, with t~ = Conv1d(masked class text tokens) and e_c a
    learnable class embedding with a null row. The class texts (num_classes, L, D_text) and
    masks (num_classes, L) are buffers, so a checkpoint carries them. For the null class the
    text path is skipped and y = e_null exactly.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob, text_len, text_dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.register_buffer("text_emb", torch.zeros(num_classes, text_len, text_dim))
        self.register_buffer("text_mask", torch.zeros(num_classes, text_len, dtype=torch.bool))
        # kernel = stride = text length: the L tokens collapse into one vector
        self.proj = nn.Conv1d(text_dim, hidden_size, kernel_size=text_len, stride=text_len)
        self.mlp = nn.Sequential(
            nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6),
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        labels = drop_labels(labels, self.num_classes, self.dropout_prob, train, force_drop_ids)
        keep = labels < self.num_classes
        c = labels.clamp(max=self.num_classes - 1)
        text = self.text_emb[c] * self.text_mask[c, :, None]               # (N, L, D_text)
        # Conv1d with kernel = stride = L is one linear map of the flattened (D_text, L) tokens;
        # written as F.linear it is ~30x faster than the convolution kernel on CPU.
        w = self.proj.weight
        t = F.linear(text.transpose(1, 2).flatten(1).to(w.dtype), w.flatten(1), self.proj.bias)  # (N, hidden)
        return self.embedding_table(labels) + keep[:, None] * (self.mlp(t) + t)


#################################################################################
#                                 Core blocks                                   #
#################################################################################

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, hidden) with T = (H/p)(W/p), a strided convolution."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash kernels on GPU)."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # scale 1/sqrt(head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: (N, T, D), (N, D) -> (N, T, D)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """(N, T, D) -> (N, T, p*p*out_channels)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size, projector_dim, z_dim):
    """REPA projector: hidden -> projector_dim -> projector_dim -> z_dim with SiLU."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim))


class DiT(nn.Module):
    """
    Diffusion transformer. forward(x (N, C, H, W), t (N,), y (N,) int) -> (N, C_out, H, W), or
    (prediction, [(N, T, z_dim) per projector]) when z_dims is given.
    C_out = 2C with learn_sigma (mean half, variance-interpolation half), else C.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True, qk_norm=False, z_dims=(), projector_dim=2048, encoder_depth=8,
                 text_len=0, text_dim=0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.in_channels, self.learn_sigma = in_channels, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.num_heads, self.num_classes = patch_size, num_heads, num_classes
        self.encoder_depth, self.z_dims = encoder_depth, list(z_dims)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if text_len:
            self.y_embedder = DCEmbedder(num_classes, hidden_size, class_dropout_prob, text_len, text_dim)
        else:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos embedding, kept as a frozen parameter so the state dict matches DiT's.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear layer
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, force_drop_ids=None):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == self.encoder_depth and self.projectors:
                zs = [proj(x) for proj in self.projectors]
        x = self.unpatchify(self.final_layer(x, c))
        return (x, zs) if self.projectors else x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """
        DiT/SiT's guided forward: x (2N, C, H, W) whose second half is ignored, y (2N,) with the
        null class in the second half -> (2N, C_out, H, W), both halves the guided output.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        # Guidance on 3 channels only, the rest passed through: what DiT/SiT do, for exact
        # reproducibility of their published samples.
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class SiT(DiT):
    """willisma/SiT: forward returns the velocity alone, (N, C, H, W), also when learn_sigma."""

    def forward(self, x, t, y, force_drop_ids=None):
        return super().forward(x, t, y, force_drop_ids)[:, :self.in_channels]


class REPASiT(DiT):
    """
    REPA's SiT: forward(x, t, y) -> ((N, C, H, W), [(N, T, z_dim) per projector]), always a pair.
    use_cfg and fused_attn are accepted for REPA's scripts: the null-class row follows
    class_dropout_prob (as in REPA) and attention is always SDPA.
    """

    def __init__(self, learn_sigma=False, z_dims=(768,), use_cfg=False, fused_attn=True, **kwargs):
        super().__init__(learn_sigma=learn_sigma, z_dims=z_dims, **kwargs)

    def forward(self, x, t, y, return_logvar=False, force_drop_ids=None):
        out = super().forward(x, t, y, force_drop_ids)
        return out if self.projectors else (out, [])


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim): first half encodes the column index, second half the row."""
    gw, gh = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, gw.reshape(-1)),
                           get_1d_sincos_pos_embed(embed_dim // 2, gh.reshape(-1))], axis=1)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """(M,) positions -> (M, embed_dim), sin half first."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   Configs                                      #
#################################################################################

def _sizes(depth, hidden_size, num_heads):
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads)


# "T" (tiny) is not in the DiT paper: it makes CPU tests and the offline demo quick.
SIZES = {"T": _sizes(6, 192, 3), "S": _sizes(12, 384, 6), "B": _sizes(12, 768, 12),
         "L": _sizes(24, 1024, 16), "XL": _sizes(28, 1152, 16)}


def _make(cls, size, patch):
    def build(**kwargs):
        return cls(patch_size=patch, **SIZES[size], **kwargs)
    build.__name__ = f"{cls.__name__}_{size}_{patch}"
    return build


# REPA's scripts always pass some of these, willisma/SiT's none.
REPA_KWARGS = {"z_dims", "encoder_depth", "projector_dim", "use_cfg", "fused_attn", "qk_norm"}


def _make_sit(size, patch):
    def build(**kwargs):
        return _make(REPASiT if REPA_KWARGS & kwargs.keys() else SiT, size, patch)(**kwargs)
    build.__name__ = f"SiT_{size}_{patch}"
    return build


# DiT-* and SiT-* are the same networks; the name picks the objective (diffusion.py).
DiT_models = {f"{fam}-{size}/{p}": _make(DiT, size, p) for fam in ("DiT", "SiT") for size in SIZES for p in (2, 4, 8)}
# For willisma/SiT's and REPA's scripts only (see the module docstring).
SiT_models = {f"SiT-{size}/{p}": _make_sit(size, p) for size in SIZES for p in (2, 4, 8)}
