"""
The whole pipeline, end to end, on CPU at reduced size: `D2C_DEMO_SMALL=1 bash demo.sh` runs every
stage script as a user runs it (export the digits, encode, train the scorer, score, select by
interval and at random, attach with the MiniLM text encoder and a DINOv2 ViT of random weights,
train with --text-cond and alignment, sample, evaluate with fid.py's metric functions). Each test
then checks one stage's outputs against what that stage promises, with references computed here
from scikit-learn's digits and numpy.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.abspath(__file__))
# demo.sh's D2C_DEMO_SMALL sizes
PER_CLASS, STEPS, IPC, K, NUM_SAMPLES = 24, 6, 4, 3, 40
N = 10 * PER_CLASS
RUNS = {"full": N, "random": 10 * IPC, "interval": 10 * IPC, "d2c": 10 * IPC}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    import timm
    torch.manual_seed(0)  # a DINOv2 ViT-S/14 of one block and random weights, in timm's layout
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=1, img_size=28)
    torch.save(vit.state_dict(), root / "dinov2_vits14_random.pth")
    out = root / "demo"
    env = {**os.environ, "D2C_DEMO_SMALL": "1", "D2C_DEMO_OUT": str(out), "PYTHON": sys.executable,
           "DINOV2_CKPT": str(root / "dinov2_vits14_random.pth")}
    r = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"demo.sh failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return str(out)


def load(path):
    return np.load(path, allow_pickle=False)


def logged_losses(log):
    """(step, diffusion loss, alignment loss or None) of every 'step N loss L [proj P]' line of a train.py log
    (the proj field only where the run aligns to visual tokens)."""
    with open(log) as f:
        return [(int(s), float(a), float(b) if b else None)
                for s, a, b in re.findall(r"step (\d+) loss (\S+)(?: proj (\S+))?", f.read())]


def test_export_writes_the_sklearn_digits_as_class_folders(demo):
    from sklearn.datasets import load_digits
    d = load_digits()
    folder = os.path.join(demo, "digits")
    assert sorted(os.listdir(folder)) == [str(c) for c in range(10)]
    for c in range(10):
        files = sorted(os.listdir(os.path.join(folder, str(c))))
        assert len(files) == PER_CLASS
        rows = [int(f[:-4]) for f in files]
        assert rows == list(np.flatnonzero(d.target == c)[:PER_CLASS])   # the first of each class
        for f, i in zip(files[:3], rows):
            img = Image.open(os.path.join(folder, str(c), f))
            assert img.mode == "L" and img.size == (8, 8)
            np.testing.assert_array_equal(np.asarray(img), np.round(d.images[i] * 255 / 16))


def test_encode_stores_every_digit_as_one_gray_channel_in_minus_one_one(demo):
    data = os.path.join(demo, "data", "digits")
    latents, labels = load(os.path.join(data, "latents.npy")), load(os.path.join(data, "labels.npy"))
    assert latents.dtype == np.float16 and latents.shape == (N, 1, 8, 8)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [PER_CLASS] * 10
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    assert meta["vae"] == "none" and meta["num_classes"] == 10 and meta["count"] == N
    with open(os.path.join(data, "files.txt")) as f:
        files = f.read().splitlines()
    for i in (0, N // 2, N - 1):
        gray = np.asarray(Image.open(os.path.join(demo, "digits", files[i])), dtype=np.float32)
        np.testing.assert_allclose(latents[i], (gray / 127.5 - 1)[None], atol=1e-3)
        assert labels[i] == int(files[i].split(os.sep)[0])


def test_scores_are_one_finite_float32_per_image(demo):
    scores = load(os.path.join(demo, "data", "digits", "scores.npy"))
    assert scores.dtype == np.float32 and scores.shape == (N,)
    assert np.isfinite(scores).all() and (scores > 0).all()


def test_interval_selection_takes_every_kth_image_of_each_class_sorted_easiest_first(demo):
    data = os.path.join(demo, "data")
    scores, labels = load(os.path.join(data, "digits", "scores.npy")), load(os.path.join(data, "digits", "labels.npy"))
    expected = []
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        expected += [rows[j] for j in np.argsort(scores[rows], kind="stable")[0:IPC * K:K]]
    chosen = load(os.path.join(data, "d2c_indices.npy"))
    assert chosen.dtype == np.int64
    np.testing.assert_array_equal(chosen, np.sort(expected))


def test_random_selection_has_the_same_size_and_images_per_class(demo):
    data = os.path.join(demo, "data")
    chosen, labels = load(os.path.join(data, "random_indices.npy")), load(os.path.join(data, "digits", "labels.npy"))
    assert chosen.dtype == np.int64 and len(np.unique(chosen)) == len(chosen) == 10 * IPC
    assert np.bincount(labels[chosen], minlength=10).tolist() == [IPC] * 10


def test_attach_builds_the_d2c_subset_with_class_texts_and_visual_tokens(demo):
    data = os.path.join(demo, "data")
    idx = load(os.path.join(data, "d2c_indices.npy"))
    sub = os.path.join(data, "d2c")
    np.testing.assert_array_equal(load(os.path.join(sub, "latents.npy")), load(os.path.join(data, "digits", "latents.npy"))[idx])
    np.testing.assert_array_equal(load(os.path.join(sub, "labels.npy")), load(os.path.join(data, "digits", "labels.npy"))[idx])
    text = torch.load(os.path.join(sub, "text.pt"), map_location="cpu")
    assert text["prompts"] == [f"a handwritten digit {n}" for n in NAMES]
    assert text["emb"].dtype == torch.float32 and text["emb"].shape == (10, 16, 384)   # MiniLM-L6: width 384
    assert text["mask"].dtype == torch.bool and text["mask"].shape == (10, 16)
    assert text["mask"][:, :4].all() and torch.isfinite(text["emb"]).all()
    assert (text["emb"][~text["mask"]] == 0).all() and (text["emb"][text["mask"]].abs().sum(-1) > 0).all()
    assert not torch.allclose(text["emb"][0], text["emb"][1])
    vis = load(os.path.join(sub, "vis.npy"))
    assert vis.dtype == np.float16 and vis.shape == (10 * IPC, 4, 384) and np.isfinite(vis).all()


def test_attach_builds_the_random_subset_without_texts_or_tokens(demo):
    data = os.path.join(demo, "data")
    idx = load(os.path.join(data, "random_indices.npy"))
    sub = os.path.join(data, "random")
    np.testing.assert_array_equal(load(os.path.join(sub, "latents.npy")), load(os.path.join(data, "digits", "latents.npy"))[idx])
    assert not os.path.exists(os.path.join(sub, "text.pt")) and not os.path.exists(os.path.join(sub, "vis.npy"))


@pytest.mark.parametrize("run", list(RUNS))
def test_training_runs_the_same_steps_with_finite_losses(demo, run):
    ckpt = torch.load(os.path.join(demo, "runs", run, "checkpoints", f"{STEPS:07d}.pt"), map_location="cpu",
                      weights_only=False)
    assert ckpt["step"] == STEPS and ckpt["config"]["model"] == "SiT-T/4" and ckpt["meta"]["count"] == RUNS[run]
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values() if v.is_floating_point())
    losses = logged_losses(os.path.join(demo, "runs", run, "log.txt"))
    assert losses and losses[-1][0] == STEPS
    assert all(math.isfinite(a) and a > 0 for _, a, _ in losses)
    kwargs = ckpt["config"]["kwargs"]
    if run == "d2c":   # DC-Embedding from text.pt and alignment to vis.npy
        assert ckpt["args"]["text_cond"] and (kwargs["text_len"], kwargs["text_dim"], kwargs["z_dims"]) == (16, 384, [384])
        text = torch.load(os.path.join(demo, "data", "d2c", "text.pt"), map_location="cpu")
        torch.testing.assert_close(ckpt["ema"]["y_embedder.text_emb"], text["emb"])
        assert all(-1 <= p <= 1 and p != 0 for _, _, p in losses)      # negative cosine similarity
    else:
        assert not ckpt["args"]["text_cond"] and "text_len" not in kwargs and not kwargs.get("z_dims")
        assert all(p is None for _, _, p in losses)                     # no alignment term, no proj field


def test_the_interval_row_trains_on_the_d2c_images_with_the_class_label_only(demo):
    """Selection alone: the same images and seed as the D2C row, the text and visual tokens unused."""
    interval, d2c = (torch.load(os.path.join(demo, "runs", r, "checkpoints", f"{STEPS:07d}.pt"), map_location="cpu",
                                weights_only=False) for r in ("interval", "d2c"))
    assert interval["args"]["data_path"] == d2c["args"]["data_path"]
    assert interval["args"]["global_seed"] == d2c["args"]["global_seed"]
    assert not interval["args"]["text_cond"] and not interval["args"]["use_vis"]
    assert d2c["args"]["text_cond"] and d2c["args"]["use_vis"]


@pytest.mark.parametrize("run", list(RUNS))
def test_sampling_writes_class_balanced_uint8_images(demo, run):
    path = os.path.join(demo, "samples", run)
    npz = np.load(path + ".npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (NUM_SAMPLES, 8, 8, 3)
    assert npz["labels"].dtype == np.int64 and npz["labels"].shape == (NUM_SAMPLES,)
    assert np.bincount(npz["labels"], minlength=10).tolist() == [NUM_SAMPLES // 10] * 10
    pngs = [f for f in os.listdir(path) if f.endswith(".png")]
    assert len(pngs) == NUM_SAMPLES
    png = Image.open(os.path.join(path, "000007.png"))
    assert png.mode == "L"  # the digits are gray: one channel, arr_0 holds it three times (ADM's format)
    np.testing.assert_array_equal(np.asarray(png)[..., None].repeat(3, -1), npz["arr_0"][7])


def test_evaluation_reports_every_run_with_metrics_in_range(demo):
    with open(os.path.join(demo, "results.json")) as f:
        res = json.load(f)
    assert 0.5 < res["classifier"]["test_accuracy"] <= 1        # one epoch already separates digits
    for run, images in RUNS.items():
        r = res["rows"][run]
        assert (r["images"], r["steps"], r["num_samples"]) == (images, STEPS, NUM_SAMPLES)
        assert math.isfinite(r["fd"]) and r["fd"] >= 0
        assert all(0 <= r[k] <= 1 for k in ("precision", "recall", "accuracy"))
        assert r["train_seconds"] > 0
    assert res["rows"]["d2c"]["text_cond"] and res["rows"]["d2c"]["vis_align"]
    assert "DINOv2" in res["replaced"]["visual encoder (DINOv2)"] and res["replaced"]["VAE (SD-VAE)"].startswith("none")
    assert not res["rows"]["interval"]["text_cond"] and not res["rows"]["interval"]["vis_align"]
    stages = {"export", "encode", "train_full", "score", "select", "select_random", "attach", "attach_random",
              "train_random", "train_interval", "train_d2c", "sample_full", "sample_random", "sample_interval",
              "sample_d2c", "evaluate"}
    assert set(res["stages"]) == stages
    with open(os.path.join(demo, "results.md")) as f:
        md = f.read()
    for row in (f"| full data | {N} | class label |", f"| random subset | {10 * IPC} | class label |",
                f"| interval subset (D2C Select only) | {10 * IPC} | class label |",
                f"| D2C subset | {10 * IPC} | class label + text (DC-Embedding) + visual alignment |"):
        assert row in md
    for name in ("real", *RUNS):   # 10 rows of 10 digits of 8x8 px, a 1 px gap, upscaled 4x
        assert Image.open(os.path.join(demo, "grids", f"{name}.png")).size == (360, 360)


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    keep = tmp_path / "mine" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("not the demo's")
    env = {**os.environ, "D2C_DEMO_OUT": str(keep.parent), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "D2C_DEMO_OUT" in r.stderr
    assert keep.read_text() == "not the demo's"
