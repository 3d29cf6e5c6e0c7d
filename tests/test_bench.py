"""bench.py: FLOP and MFU bookkeeping, compiled = eager, the flash check and the attention kernels, the
sampler's evaluation count, the CLI end to end on CPU; tools/gpu_check.sh's dry run on CPU."""
import ast
import json
import os
import subprocess
import sys
from copy import deepcopy

import numpy as np
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


def test_the_training_step_calls_a_compiled_network_and_gives_the_eager_step():
    # bench's compile mode, and train.py on a GPU, hand make_step a compiled module (which has no
    # truth value). Dynamo's eager backend traces without inductor: the same ops, so the same numbers.
    from train import make_step, step_noise
    x, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = DiT_models["SiT-T/4"](input_size=8, num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        net = torch.compile(model, backend="eager") if compiled else None
        step = make_step(model, deepcopy(model), opt, "sit", net=net)
        out.append([torch.stack(step(x, y, None, *step_noise("sit", s, x.shape, "cpu"))) for s in range(2)])
    torch._dynamo.reset()
    for eager, compiled in zip(*out):
        torch.testing.assert_close(compiled, eager)


def test_sdpa_ops_names_the_kernel_that_served_each_attention_call():
    # two blocks: two attention calls forward and two backward, by the flash kernel for CPU, or by the
    # math fallback when only that one is allowed
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from models import DiT
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    run = lambda: net(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).sum().backward()  # noqa: E731
    ops = bench.sdpa_ops(run)
    assert ops["aten::_scaled_dot_product_flash_attention_for_cpu"] == 2
    assert ops["aten::_scaled_dot_product_flash_attention_for_cpu_backward"] == 2
    with sdpa_kernel(SDPBackend.MATH):
        ops = bench.sdpa_ops(run)
    assert ops["aten::_scaled_dot_product_attention_math"] == 2
    assert not any("flash" in name for name in ops)


def test_sampler_evaluations_count_the_guided_steps_inside_the_interval():
    # REPA's SDE grid, t = linspace(1, 0.04, 250), guided where t <= 0.7: 422 rows per image
    inside = int((np.linspace(1, 0.04, 250) <= 0.7).sum())
    assert bench.sampler_evaluations("sit", 250, 1.8, 0.0, 0.7) == (250 - inside, inside) == (78, 172)
    # DDPM respaced to 250 of 1000 steps, guided where 0.2 <= step / 1000 <= 0.6
    inside = sum(0.2 <= round(i * 999 / 249) / 1000 <= 0.6 for i in range(250))
    assert bench.sampler_evaluations("ddpm", 250, 1.5, 0.2, 0.6) == (250 - inside, inside)
    assert bench.sampler_evaluations("sit", 10, 1.0, 0.0, 1.0) == (10, 0)  # scale 1: never guided


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


def test_interleaved_timing_calls_each_function_in_turn_and_keeps_each_ones_times():
    from types import SimpleNamespace
    b = bench.Bench(SimpleNamespace(precision="fp32", compare_precision=False, peak_tflops=None, model="SiT-T/4",
                                    vae="none", channels=1, image_size=8, warmup=1, iters=3), torch.device("cpu"))
    calls = []
    medians = b.time_each([lambda: calls.append("fp32"), lambda: calls.append("bf16")])
    assert calls == ["fp32", "bf16"] * 4 and len(medians) == 2
    assert [len(t) for t in b.all_times] == [3, 3] and b.shape == (1, 8, 8)


def test_cli_compares_fp32_and_bf16_in_pixel_space_and_reports_their_ratios(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--model", "SiT-T/4", "--vae", "none", "--channels", "1", "--image-size", "8",
           "--batch-size", "2", "--warmup", "1", "--iters", "2", "--modes", "eager", "--only", "train,sample",
           "--compare-precision", "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(x["part"], x["precision"]) for x in rows] == [("train", "fp32"), ("train", "bf16")] + \
        [("sample", "fp32"), ("sample", "bf16")] * 2
    macs = forward_macs(DiT_models["SiT-T/4"](input_size=8, in_channels=1, learn_sigma=False), 8)  # 1 x 8 x 8 pixels
    assert [x["flops_per_image"] for x in rows] == [6 * macs] * 2 + [2 * macs] * 2 + [4 * macs] * 2
    assert report["in_shape"] == [1, 8, 8] and "pixels 1x8x8" in r.stdout and "| train | eager | bf16 |" in r.stdout
    ratios = report["precision_ratios"]
    paired = sorted(a / b for a, b in zip(rows[0]["ms_each"], rows[1]["ms_each"]))  # the two rounds, in turn
    assert ratios["train eager step"] == pytest.approx((paired[0] + paired[1]) / 2)
    assert len(ratios) == 3 and "fp32 time / bf16 time" in r.stdout


def test_cli_rejects_an_unknown_model_with_one_line():
    r = subprocess.run([sys.executable, "bench.py", "--model", "DiT-Q/2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: --model DiT-Q/2") and len(r.stderr.strip().splitlines()) == 1


def test_help_explains_every_flag_and_shows_its_default():
    flags = [a for a in bench.get_parser()._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in flags), [a.option_strings for a in flags if not a.help]
    r = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    for a in flags:
        assert a.option_strings[0] in r.stdout
    assert r.stdout.count("(default:") == len(flags)
    assert "(default: train,sample,score,loader,memory)" in r.stdout and "(default: SiT-XL/2)" in r.stdout


# ----------------------------------------------------------------------------- tools/gpu_check.sh

def test_gpu_check_dry_run_on_cpu_prints_one_table_and_leaves_nothing_behind(tmp_path):
    # --device cpu hides CUDA from every step: the tier's tests all skip, saying why, and the three
    # benchmarks run on the smallest model at tiny sizes. Every file goes to a temporary directory
    # under TMPDIR, removed at the end; the table is all that is left, on stdout.
    listing = lambda: {d: sorted(os.listdir(os.path.join(ROOT, d))) for d in ("", "tools")}  # noqa: E731
    before = listing()
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "tools/gpu_check.sh", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    title, blank, header, rule, *rows = r.stdout.strip().splitlines()
    assert title.startswith("GPU check dry run on CPU") and "no GPU figure" in title and blank == ""
    assert header == "| check | result | value | details |" and rule == "|---|---|---:|---|"
    cells = [row.split(" | ") for row in rows]
    assert all(row.startswith("| ") and row.endswith(" |") and len(c) == 4 for row, c in zip(rows, cells))

    # one row per test function of tests/test_cuda.py (two for the parametrized one), all skipped
    tree = ast.parse(open(os.path.join(ROOT, "tests", "test_cuda.py")).read())
    tests = [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]
    tested = [c for c in cells if c[0].startswith("| test: ")]
    assert len(tested) == len(tests) + 1
    for name in tests:
        assert any(c[0].startswith("| test: " + name[5:].replace("_", " ")) for c in tested), name
    assert all(c[1] == "skipped" and ("CUDA" in c[3] or "two GPUs" in c[3]) for c in tested)

    benches = [c for c in cells if c[0].startswith("| bench: ")]
    assert [c[0].split()[2] for c in benches] == ["training", "sampling", "scoring"]
    for c in benches:
        assert c[1] == "ok" and c[2].endswith(" images/s") and float(c[2].split()[0]) > 0, c
    assert "422 rows per image" in benches[1][3]
    assert os.listdir(tmp_path) == [] and listing() == before
