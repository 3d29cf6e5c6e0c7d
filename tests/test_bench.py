"""bench.py: FLOP and MFU bookkeeping, compiled = eager, the flash check, the CLI end to end on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
from bench import forward_macs
from models import DiT_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- FLOPs and MFU

def test_training_tflops_are_six_forward_macs_per_image_times_images_per_s():
    # DiT-XL/2 at 256 (118.6 GMACs per forward), 256 images in 0.8 s: 320 images/s,
    # 6 * 118.6e9 * 320 / 1e12 = 227.712 TFLOP/s, 227.712 / 989 of an H100's bf16 peak
    ips, tflops, mfu = bench.rates(256, 0.8, bench.TRAIN_FLOPS_PER_MAC * 118.6e9, peak=989)
    assert ips == pytest.approx(320)
    assert tflops == pytest.approx(227.712)
    assert mfu == pytest.approx(227.712 / 989)


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 80GB HBM3", "fp32", 495),
    ("NVIDIA H200", "bf16", 989), ("NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A100 80GB PCIe", "fp32", 156),
    ("NVIDIA L40S", "bf16", 362), ("NVIDIA L4", "bf16", 121)])
def test_peak_is_the_dense_datasheet_figure_of_the_named_gpu(name, precision, peak):
    assert bench.peak_tflops(name, precision) == peak


def test_unknown_gpu_has_no_peak_and_so_no_mfu():
    assert bench.peak_tflops("NVIDIA GeForce GTX 1080", "bf16") is None
    assert bench.rates(10, 1.0, 1e12, peak=None) == (10, 10, None)


# ----------------------------------------------------------------------------- fast paths

def test_compiled_model_gives_the_eager_outputs_on_cpu():
    torch.manual_seed(0)
    model = DiT_models["SiT-T/4"](input_size=8, num_classes=10).eval()
    with torch.no_grad():  # away from adaLN-Zero's all-zero output
        for p in model.parameters():
            p.normal_(std=0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 10])
    compiled = bench.compile_model(model, "compile", dynamic=False)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    with torch.no_grad():
        eager, out = model(x, t, y), compiled(x, t, y)
    assert eager.abs().mean() > 0.01
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


def test_flash_check_covers_every_registry_head_dim():
    # head dims: S 384/6, B 768/12, L 1024/16, XL 1152/16, T 192/3
    rows = bench.check_flash(torch.device("cpu"))
    assert sorted((size, hd) for size, _, hd, _ in rows) == sorted(
        [("S", 64), ("B", 64), ("L", 64), ("XL", 72), ("T", 64)])
    assert all(status == "ok" for *_, status in rows)


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_saved_activations_are_what_backward_needs_of_two_linears(precision):
    # y = (x W1^T) W2^T with x (B, 16), W1 (8, 16), W2 (3, 8). Backward keeps x for dW1, h = x W1^T
    # for dW2 and W2 for dh (x needs no gradient, so W1 is not kept). fp32: x and h, 16 + 8 floats
    # per image, W2 is the parameter itself (not counted). bf16 autocast: bf16 copies of x, h and W2.
    from types import SimpleNamespace
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(3, 8))
    net = lambda x, t, y: torch.nn.functional.linear(torch.nn.functional.linear(x.flatten(1), w1), w2)  # noqa: E731
    b = SimpleNamespace(device=torch.device("cpu"), args=SimpleNamespace(precision=precision),
                        batch=lambda B: (torch.randn(B, 4, 2, 2), None, None))
    params = {w.untyped_storage().data_ptr() for w in (w1, w2)}
    size = 4 if precision == "fp32" else 2
    for B in (1, 2, 5):
        assert bench.saved_activations(b, net, B, params) == B * (16 + 8) * size + (0 if precision == "fp32" else 3 * 8 * 2)


def test_a_lower_activation_memory_budget_makes_the_compiled_forward_save_less(monkeypatch):
    import torch._functorch.config as aot_config
    from types import SimpleNamespace
    from train import set_activation_memory_budget
    monkeypatch.setattr(aot_config, "activation_memory_budget", 1.0)  # restored after the test
    b = SimpleNamespace(device=torch.device("cpu"), args=SimpleNamespace(precision="fp32"),
                        batch=lambda B: (torch.randn(B, 4, 4, 4), None, None))

    def saved(budget):
        torch._dynamo.reset()
        set_activation_memory_budget(budget)
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 256), torch.nn.GELU(),
                                                        torch.nn.Linear(256, 64)) for _ in range(3)])
        net = torch.compile(mlp, dynamic=False)
        return bench.saved_activations(b, lambda x, t, y: net(x.flatten(1)), 64,
                                       {p.untyped_storage().data_ptr() for p in mlp.parameters()})
    full, half, tenth = saved(1.0), saved(0.5), saved(0.1)
    torch._dynamo.reset()
    # at least the 3 inputs and hidden layers of the 3 blocks, 64 x (3 x 64 + 3 x 256) floats, are kept at budget 1
    assert full >= 64 * (3 * 64 + 3 * 256) * 4
    assert half < 0.6 * full and tenth < half


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("name", ["DiT-T/4", "SiT-T/4"])
def test_cli_runs_every_part_on_cpu_and_writes_consistent_json(tmp_path, name):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--model", name, "--image-size", "64", "--batch-size", "2",
           "--warmup", "1", "--iters", "2", "--modes", "eager", "--proj", "--sample-steps", "3",
           "--score-timesteps", "2", "--loader-images", "16", "--num-workers", "1", "--peak-tflops", "2",
           "--tmp-dir", str(tmp_path), "--json", str(out)]
    # one thread: a tiny model gains nothing from two, and loses much when other jobs share the cores
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| train | eager |" in r.stdout and "6 x MACs" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]  # the loader's dataset is gone
    rows = json.loads(out.read_text())["rows"]
    assert [(x["part"], x["mode"]) for x in rows] == [
        ("train", "eager"), ("sample", "eager"), ("sample", "eager"), ("sample", "eager"),
        ("score", "eager"), ("loader", "1 worker"), ("memory", "eager")]
    rows, memory = rows[:-1], rows[-1]

    ddpm = name.startswith("DiT")
    macs = forward_macs(DiT_models[name](input_size=8, learn_sigma=ddpm), 8)
    macs_proj = forward_macs(DiT_models[name](input_size=8, learn_sigma=ddpm, z_dims=[768], encoder_depth=4), 8)
    # 3 sampler steps with guidance on t <= 0.7: sde t = 1, 0.52, 0.04; ddpm keeps steps 999, 500, 0;
    # either way one unguided and two guided evaluations: 1 + 2 + 2 rows per image
    expected = [6 * macs_proj, 2 * macs, 4 * macs, 10 * macs, 2 * 2 * macs, None]
    for row, flops in zip(rows, expected):
        assert row["images_per_s"] > 0 and row["ms"] > 0
        assert row["images_per_s"] == pytest.approx(row["images"] / (row["ms"] / 1e3))
        assert row["flops_per_image"] == flops
        if flops is None:
            assert row["tflops"] is None and row["mfu"] is None
        else:
            assert row["tflops"] == pytest.approx(flops * row["images_per_s"] / 1e12)
            assert row["mfu"] == pytest.approx(row["tflops"] / 2)

    # weights, gradients, two AdamW moments and the EMA: 5 fp32 numbers per parameter
    params = sum(p.numel() for p in DiT_models[name](input_size=8, learn_sigma=ddpm, z_dims=[768], encoder_depth=4).parameters())
    assert memory["states_gib"] == pytest.approx(20 * params / 2 ** 30)
    assert memory["activations_mib_per_image"] > 0 and memory["images_per_s"] is None
    assert memory["projected_gib"] == pytest.approx(
        memory["states_gib"] + memory["fixed_gib"] + 2 * memory["activations_mib_per_image"] / 2 ** 10)


def test_cli_rejects_an_unknown_model_with_one_line():
    r = subprocess.run([sys.executable, "bench.py", "--model", "DiT-Q/2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: --model DiT-Q/2") and len(r.stderr.strip().splitlines()) == 1
