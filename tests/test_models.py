"""The network: attention, state-dict layouts of the public checkpoints, the forward pass
against a naive re-derivation from the DiT definition, DC-Embedding, FLOP counts."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models import DiT, DiT_models, forward_macs

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


@pytest.mark.parametrize("ref,name,kwargs", [
    ("DiT-XL/2 (facebookresearch/DiT, DiT-XL-2-256x256.pt)", "DiT-XL/2", dict(input_size=32)),
    ("DiT-XL/2 (facebookresearch/DiT, DiT-XL-2-256x256.pt)", "SiT-XL/2", dict(input_size=32)),  # official SiT: same layout
    ("SiT-XL/2 (sihyun-yu/REPA, last.pt ema)", "SiT-XL/2",
     dict(input_size=32, learn_sigma=False, z_dims=[768], encoder_depth=8)),
])
def test_registry_model_has_exactly_the_public_checkpoint_layout(ref, name, kwargs):
    entry = KEYS[ref]
    with torch.device("meta"):
        model = DiT_models[name](num_classes=1000, **kwargs)
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
    with torch.device("meta"):
        model = DiT_models[name](input_size=size)
    assert abs(forward_macs(model, size) / 1e9 - gmacs) / gmacs < 0.01
