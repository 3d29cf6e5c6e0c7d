"""The network: attention, state-dict layouts of the public checkpoints, the forward pass
against a naive re-derivation from the DiT definition, DC-Embedding, FLOP counts, and the
drop-in use by facebookresearch/DiT's, willisma/SiT's and REPA's scripts (each call they make
on the model, named by file:line of those repositories)."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models import DiT, DiT_models, SiT_models

KEYS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "checkpoint_keys.json")))


def randomize(model, seed=0):
    """Random values everywhere (adaLN-Zero init would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_attention_equals_naive_softmax_qkt_over_sqrt_d_times_v():
    torch.manual_seed(0)
    attn = models.Attention(64, num_heads=4)
    x = torch.randn(3, 10, 64)
    q, k, v = attn.qkv(x).reshape(3, 10, 3, 4, 16).unbind(2)        # (B, T, heads, d)
    w = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(16)
    naive = torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v).reshape(3, 10, 64)
    torch.testing.assert_close(attn(x), attn.proj(naive), atol=1e-5, rtol=1e-5)


def layout(entry, depth):
    """Expected {key: shape} of a reference entry with its blocks repeated `depth` times."""
    out = {}
    for k, shape in entry["keys"].items():
        if k.startswith("blocks.0."):
            for i in range(depth):
                out[k.replace("blocks.0.", f"blocks.{i}.", 1)] = tuple(shape)
        else:
            out[k] = tuple(shape)
    return out


DIT_REF, REPA_REF = "DiT-XL/2 (facebookresearch/DiT, DiT-XL-2-256x256.pt)", "SiT-XL/2 (sihyun-yu/REPA, last.pt ema)"


@pytest.mark.parametrize("ref,registry,name,kwargs", [
    (DIT_REF, DiT_models, "DiT-XL/2", dict(input_size=32)),
    (DIT_REF, DiT_models, "SiT-XL/2", dict(input_size=32)),  # official SiT: same layout
    (REPA_REF, DiT_models, "SiT-XL/2", dict(input_size=32, learn_sigma=False, z_dims=[768], encoder_depth=8)),
    (DIT_REF, SiT_models, "SiT-XL/2", dict(input_size=32, learn_sigma=True)),          # SiT sample.py:L38
    (REPA_REF, SiT_models, "SiT-XL/2", dict(input_size=32, use_cfg=True, z_dims=[768], encoder_depth=8,
                                            fused_attn=False, qk_norm=False)),     # REPA generate.py:L64, L86
], ids=["DiT", "SiT", "REPA", "SiT_models-willisma", "SiT_models-REPA"])
def test_registry_model_has_exactly_the_public_checkpoint_layout(ref, registry, name, kwargs):
    entry = KEYS[ref]
    with torch.device("meta"):
        model = registry[name](num_classes=1000, **kwargs)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == entry["num_keys"]
    assert got == layout(entry, entry["depth"])


@pytest.mark.parametrize("ref,input_size,kwargs", [
    ("DiT-XL/2 (facebookresearch/DiT, DiT-XL-2-256x256.pt)", 32, {}),
    ("DiT-XL/2 (facebookresearch/DiT, DiT-XL-2-256x256.pt)", 64, {}),          # the 512 px checkpoint
    ("SiT-XL/2 (sihyun-yu/REPA, last.pt ema)", 32, dict(learn_sigma=False, z_dims=[768], encoder_depth=2)),
])
def test_reference_layout_state_dict_loads_strictly_at_reduced_depth(ref, input_size, kwargs):
    entry = KEYS[ref]
    expected = layout(entry, depth=2)
    expected["pos_embed"] = (1, (input_size // 2) ** 2, 1152)
    sd = {k: torch.randn(s) * 0.02 for k, s in expected.items()}
    model = DiT(input_size=input_size, patch_size=2, hidden_size=1152, depth=2, num_heads=16, num_classes=1000, **kwargs)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


def sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    return np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1)


def naive_forward(sd, x, t, y, p, heads):
    """DiT forward from its definition, straight from a state dict, one image at a time."""
    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(h):
        return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)

    N, C, H, W = x.shape
    D = sd["pos_embed"].shape[-1]
    g = H // p
    outs = []
    for n in range(N):
        patches = x[n].reshape(C, g, p, g, p).permute(1, 3, 0, 2, 4).reshape(g * g, C * p * p)  # row-major grid
        tok = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"]
        # position: first half the column index, second half the row index (sin then cos)
        rows, cols = np.divmod(np.arange(g * g), g)
        pos = np.concatenate([sincos_1d(D // 2, cols), sincos_1d(D // 2, rows)], 1)
        h = tok + torch.tensor(pos, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
        temb = torch.cat([torch.cos(t[n] * freqs), torch.sin(t[n] * freqs)])
        temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
        c = temb + sd["y_embedder.embedding_table.weight"][y[n]]
        i = 0
        while f"blocks.{i}.attn.qkv.weight" in sd:
            b = f"blocks.{i}"
            sm, cm, gm, sf, cf, gf = lin(F.silu(c), b + ".adaLN_modulation.1").chunk(6)
            a = ln(h) * (1 + cm) + sm
            q, k, v = lin(a, b + ".attn.qkv").reshape(-1, 3, heads, D // heads).permute(1, 2, 0, 3)
            att = ((q @ k.transpose(-1, -2)) / math.sqrt(D // heads)).softmax(-1) @ v
            h = h + gm * lin(att.permute(1, 0, 2).reshape(-1, D), b + ".attn.proj")
            m = ln(h) * (1 + cf) + sf
            h = h + gf * lin(F.gelu(lin(m, b + ".mlp.fc1"), approximate="tanh"), b + ".mlp.fc2")
            i += 1
        sh, sc = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2)
        o = lin(ln(h) * (1 + sc) + sh, "final_layer.linear")              # (T, p*p*Cout)
        cout = o.shape[-1] // (p * p)
        outs.append(o.reshape(g, g, p, p, cout).permute(4, 0, 2, 1, 3).reshape(cout, H, W))
    return torch.stack(outs)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_equals_naive_dit_definition(learn_sigma):
    model = randomize(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                          num_classes=5, learn_sigma=learn_sigma)).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 17.0, 999.0]), torch.tensor([0, 4, 5])  # 5 = null class
    with torch.no_grad():
        ref = naive_forward(model.state_dict(), x, t, y, p=2, heads=4)
        out = model(x, t, y)
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_projector_reads_tokens_after_encoder_depth_blocks():
    model = randomize(DiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=5,
                          learn_sigma=False, z_dims=[32, 16], projector_dim=48, encoder_depth=2)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    captured = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    out, zs = model(x, t, y)
    assert out.shape == (2, 4, 8, 8) and [z.shape for z in zs] == [(2, 16, 32), (2, 16, 16)]
    torch.testing.assert_close(zs[1], model.projectors[1](captured["h"]))


def test_adaln_zero_initialisation_predicts_zero():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    assert torch.count_nonzero(model(torch.randn(2, 4, 8, 8), torch.tensor([3.0, 5.0]), torch.tensor([0, 1]))) == 0


def dc_model():
    torch.manual_seed(0)
    m = randomize(DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=4, num_classes=3,
                      learn_sigma=False, text_len=6, text_dim=10)).eval()
    m.y_embedder.text_emb.copy_(torch.randn(3, 6, 10))
    m.y_embedder.text_mask.copy_(torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], dtype=torch.bool))
    return m


def test_dc_embedding_is_mlp_of_conv_text_plus_text_plus_class_embedding():
    m = dc_model()
    e = m.y_embedder
    y = torch.tensor([0, 1, 2])
    text = e.text_emb[y] * e.text_mask[y][..., None]
    # Conv1d with kernel = stride = L is one linear map of the flattened (D_text, L) tokens
    tt = torch.einsum("nld,hdl->nh", text, e.proj.weight) + e.proj.bias
    ln = (tt - tt.mean(-1, keepdim=True)) / torch.sqrt(tt.var(-1, unbiased=False, keepdim=True) + 1e-6)
    mlp = e.mlp[3](F.silu(e.mlp[1](ln)))
    torch.testing.assert_close(e(y, train=False), mlp + tt + e.embedding_table.weight[y], atol=1e-5, rtol=1e-5)


def test_dc_embedding_null_path_equals_null_row_exactly():
    e = dc_model().y_embedder
    out = e(torch.tensor([0, 1, 2]), train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(out[0], e.embedding_table.weight[3]) and torch.equal(out[2], e.embedding_table.weight[3])
    assert not torch.equal(out[1], e.embedding_table.weight[3])


def test_dc_embedding_depends_on_text_but_not_on_tokens_past_the_mask():
    m = dc_model()
    e = m.y_embedder
    y = torch.tensor([1])
    before = e(y, train=False).clone()
    e.text_emb[1, 5] += 100.0                      # masked out for class 1
    torch.testing.assert_close(e(y, train=False), before)
    e.text_emb[1, 0] += 1.0                        # inside the mask
    assert not torch.allclose(e(y, train=False), before)


@pytest.mark.parametrize("name,size,gmacs", [("DiT-XL/2", 32, 118.6), ("DiT-XL/2", 64, 524.6),
                                             ("DiT-L/2", 32, 80.7), ("DiT-B/2", 32, 23.01), ("DiT-S/2", 32, 6.06)])
def test_flop_count_matches_published_dit_gflops(name, size, gmacs):
    from bench import forward_macs  # its one user; imported here so the model tests do not need bench's imports
    with torch.device("meta"):
        model = DiT_models[name](input_size=size)
    assert abs(forward_macs(model, size) / 1e9 - gmacs) / gmacs < 0.01


# ----------------------------------------------------------------------------- drop-in
# Each test makes the calls that a public script makes on the model, with its keywords and
# shapes, and unpacks the result as that script does. The bodies are shrunk (TINY): the
# registry name, the keywords and the conventions are under test, not the width.

TINY = dict(depth=2, hidden_size=64, num_heads=4)
PUBLIC_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # DiT paper, Table 1


@pytest.fixture
def tiny(monkeypatch):
    for size in PUBLIC_SIZES:
        monkeypatch.setitem(models.SIZES, size, TINY)


def naive(model, x, t, y):
    return naive_forward(model.state_dict(), x, t, y, p=model.patch_size, heads=model.num_heads)


def cfg_by_hand(cond, uncond, scale):
    """What DiT/SiT's forward_with_cfg define: guided first 3 channels, the rest of each half as is."""
    g = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    return torch.cat([torch.cat([g, cond[:, 3:]], 1), torch.cat([g, uncond[:, 3:]], 1)])


def guided_inputs(n=2, size=8, t=None):
    """x = [z, z'] (forward_with_cfg must read z only), y = [labels, null 1000 x n]."""
    g = torch.Generator().manual_seed(1)
    z, other = torch.randn(n, 4, size, size, generator=g), torch.randn(n, 4, size, size, generator=g)
    t = torch.full((2 * n,), 0.7) if t is None else t
    return z, torch.cat([z, other]), t, torch.cat([torch.tensor([207, 360][:n]), torch.full((n,), 1000)])


@pytest.mark.parametrize("size", PUBLIC_SIZES)
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_both_registries_hold_every_public_name_with_its_public_size(size, patch):
    depth, hidden, heads = PUBLIC_SIZES[size]
    with torch.device("meta"):
        nets = [DiT_models[f"DiT-{size}/{patch}"](), DiT_models[f"SiT-{size}/{patch}"](), SiT_models[f"SiT-{size}/{patch}"]()]
    for net in nets:
        assert (len(net.blocks), net.pos_embed.shape[-1], net.num_heads, net.patch_size) == (depth, hidden, heads, patch)


@pytest.mark.parametrize("name", ["DiT-S/2", "SiT-S/2"])
def test_dit_models_keep_our_convention_full_output_and_features_with_projectors(tiny, name):
    # our stages (train.py, sample.py, score.py) build both families through DiT_models
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 7])
    model = randomize(DiT_models[name](input_size=8, num_classes=10)).eval()
    torch.testing.assert_close(model(x, t, y), naive(model, x, t, y), atol=2e-5, rtol=1e-4)  # 2C channels
    out, zs = randomize(DiT_models[name](input_size=8, num_classes=10, z_dims=[32], encoder_depth=1)).eval()(x, t, y)
    assert out.shape == (2, 8, 8, 8) and [z.shape for z in zs] == [(2, 16, 32)]


def test_dit_train_and_sampling_forward_return_mean_and_variance_channels(tiny):
    # DiT train.py:L142 builds; gaussian_diffusion.py:L747 calls model(x_t, t, y=y) and L755
    # splits the output into C mean and C variance channels (sample_ddp.py:L121-122 at scale 1, L279/L287)
    model = randomize(DiT_models["DiT-S/2"](input_size=8, num_classes=1000)).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 499, 999]), torch.tensor([0, 207, 1000])
    out = model(x, t, **dict(y=y))
    mean, var = torch.split(out, 4, dim=1)
    assert mean.shape == var.shape == x.shape
    torch.testing.assert_close(out, naive(model, x, t.float(), y), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [1.5, 4.0])
def test_dit_forward_with_cfg_guides_3_channels_of_the_full_output_from_the_first_half_of_x(tiny, scale):
    # DiT sample.py:L34 builds, L55-58 doubles z and appends null labels 1000, L62 passes
    # forward_with_cfg to p_sample_loop, which calls it as model(x, t, y=y, cfg_scale=s)
    # (gaussian_diffusion.py:L279); also sample_ddp.py:L69, L115-119
    model = randomize(DiT_models["DiT-S/2"](input_size=8, num_classes=1000)).eval()
    z, x, t, y = guided_inputs(t=torch.tensor([999, 999, 999, 999]))
    out = model.forward_with_cfg(x, t, **dict(y=y, cfg_scale=scale))
    ref = cfg_by_hand(naive(model, z, t[:2].float(), y[:2]), naive(model, z, t[2:].float(), y[2:]), scale)
    assert out.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    samples, _ = out.chunk(2, dim=0)  # sample.py:L64 keeps the first half: the same guided channels
    assert torch.equal(samples[:, :3], out[2:, :3])


@pytest.mark.parametrize("call,kwargs", [
    ("SiT train.py:L150 (learned sigma, the default)", dict(num_classes=1000)),
    ("SiT sample.py:L38, sample_ddp.py:L72 (auto-download: learn_sigma True)", dict(num_classes=1000, learn_sigma=True)),
    ("SiT sample.py:L38, sample_ddp.py:L72 (--ckpt: learn_sigma False)", dict(num_classes=1000, learn_sigma=False)),
])
def test_sit_forward_returns_the_velocity_alone_the_first_half_of_the_full_output(tiny, call, kwargs):
    # transport.py:L133 calls model(xt, t, y=y) and L135 asserts the output has xt's shape;
    # sample_ddp.py:L170-171 and train.py:L235-236 sample with model.forward at scale 1
    model = randomize(SiT_models["SiT-S/2"](input_size=8, **kwargs)).eval()
    assert type(model).__name__ == "SiT"
    xt, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.3, 1.0]), torch.tensor([0, 207, 1000])
    out = model(xt, t, **dict(y=y))
    assert out.shape == xt.shape
    torch.testing.assert_close(out, naive(model, xt, t, y)[:, :4], atol=2e-5, rtol=1e-4)
    model.train()  # train.py trains in train mode (label dropout): the shape holds there too
    assert model(xt, t, y=y).shape == xt.shape


@pytest.mark.parametrize("learn_sigma", [True, False], ids=["train.py:L233", "sample.py:L103"])
def test_sit_forward_with_cfg_guides_3_of_the_4_velocity_channels(tiny, learn_sigma):
    # SiT train.py:L229-233 (EMA, learned sigma) and sample.py:L96-103 / sample_ddp.py:L164-168
    # pass forward_with_cfg to the ODE/SDE sampler, which calls model(x, t, y=y, cfg_scale=s)
    # (transport.py:L178) and needs x's shape back (L190)
    model = randomize(SiT_models["SiT-S/2"](input_size=8, num_classes=1000, learn_sigma=learn_sigma)).eval()
    z, x, t, y = guided_inputs()
    out = model.forward_with_cfg(x, t, **dict(y=y, cfg_scale=4.0))
    velocity = lambda x_, t_, y_: naive(model, x_, t_, y_)[:, :4]
    assert out.shape == x.shape
    torch.testing.assert_close(out, cfg_by_hand(velocity(z, t[:2], y[:2]), velocity(z, t[2:], y[2:]), 4.0),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_repa_train_builds_repa_sit_and_its_loss_unpacks_prediction_and_projector_features(tiny, qk_norm):
    # REPA train.py:L164-172: SiT_models[name](input_size, num_classes, use_cfg, z_dims,
    # encoder_depth, **{"fused_attn", "qk_norm"}); loss.py:L77: model_output, zs_tilde =
    # model(model_input, time_input.flatten(), y=labels), then L83-87 zip zs with zs_tilde per image
    model = SiT_models["SiT-S/2"](input_size=8, num_classes=1000, use_cfg=True, z_dims=[768, 32],
                                  encoder_depth=1, fused_attn=True, qk_norm=qk_norm)
    assert type(model).__name__ == "REPASiT" and model.out_channels == 4
    assert isinstance(model.blocks[0].attn.q_norm, torch.nn.LayerNorm) == qk_norm
    model = randomize(model).eval()
    captured = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    x, t, labels = torch.randn(2, 4, 8, 8), torch.rand(2, 1, 1, 1), torch.tensor([5, 1000])
    model_output, zs_tilde = model(x, t.flatten(), **dict(y=labels))
    assert model_output.shape == x.shape
    if not qk_norm:  # naive_forward has no q/k norm
        torch.testing.assert_close(model_output, naive(model, x, t.flatten(), labels), atol=2e-5, rtol=1e-4)
    # REPA's projector: token-wise MLP on the hidden tokens after encoder_depth blocks
    h = captured["h"]
    for z, proj, dim in zip(zs_tilde, model.projectors, [768, 32]):
        assert z.shape == (2, 16, dim)
        torch.testing.assert_close(z, proj(h.reshape(-1, 64)).reshape(2, 16, -1))


def test_repa_samplers_index_the_prediction_and_guide_with_the_null_class(tiny):
    # REPA generate.py:L64-70 builds (use_cfg=True), L86 loads, L111 counts projectors, L121 reads
    # in_channels; samplers.py:L59, L70 append y_null = 1000 and L76 take model(x, t, y=y)[0]
    model = SiT_models["SiT-S/2"](input_size=8, num_classes=1000, use_cfg=True, z_dims=[768], encoder_depth=2,
                                  fused_attn=False, qk_norm=False)
    model.load_state_dict(randomize(model).state_dict())
    model.eval()
    assert model.in_channels == 4 and sum(p.numel() for p in model.projectors.parameters()) > 0
    z, _, t, y = guided_inputs()
    d = model(torch.cat([z] * 2), t, **dict(y=y))[0]
    assert d.shape == (4, 4, 8, 8)
    d_cond, d_uncond = d.chunk(2)
    torch.testing.assert_close(d_cond, naive(model, z, t[:2], y[:2]), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d_uncond, naive(model, z, t[2:], y[2:]), atol=2e-5, rtol=1e-4)
    # REPA's forward has return_logvar (no script sets it; it changes nothing there either)
    torch.testing.assert_close(model(z, t[:2], y[:2], return_logvar=True)[0], d_cond)


def test_sit_models_picks_repa_by_any_repa_keyword_and_willisma_sit_otherwise(tiny):
    for kw in sorted(models.REPA_KWARGS):
        value = {"z_dims": [8], "encoder_depth": 1, "projector_dim": 16, "use_cfg": True, "fused_attn": True,
                 "qk_norm": False}[kw]
        model = SiT_models["SiT-S/2"](input_size=8, **{kw: value})
        out = model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
        assert isinstance(out, tuple) and out[0].shape == (1, 4, 8, 8), kw
    assert SiT_models["SiT-S/2"](input_size=8, z_dims=[]).forward(torch.randn(1, 4, 8, 8), torch.rand(1),
                                                                  torch.tensor([0]))[1] == []
    out = SiT_models["SiT-S/2"](input_size=8)(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    assert torch.is_tensor(out) and out.shape == (1, 4, 8, 8)
