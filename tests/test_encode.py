"""encode.py: image folder -> dataset directory (latents.npy, labels.npy, files.txt, meta.json)."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
import launch
from launch import script_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Expected ImageFolder order: classes sorted (upper case before lower case), files sorted within a
# class, files of a nested folder after the class folder's own files, other extensions ignored.
CLASSES = ["Bee", "ant", "zebra"]
FILES = [("Bee/b1.JPG", 0), ("Bee/b2.png", 0), ("ant/a1.png", 1), ("ant/a2.png", 1), ("ant/sub/a3.bmp", 1),
         ("zebra/z1.png", 2), ("zebra/z2.png", 2)]


def write_images(root):
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    for c in ["zebra", "ant/sub", "Bee"]:  # created out of order on purpose
        os.makedirs(os.path.join(root, c))
    rgb(19, 23).save(os.path.join(root, "Bee/b1.JPG"), format="JPEG")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(os.path.join(root, "Bee/b2.png"))
    rgb(37, 100).save(os.path.join(root, "ant/a1.png"))  # wide, min side >= 2 x 16: the box-halving path
    Image.fromarray(rng.integers(0, 256, (25, 17, 4), dtype=np.uint8), "RGBA").save(os.path.join(root, "ant/a2.png"))
    rgb(30, 24).convert("P", palette=Image.Palette.ADAPTIVE).save(os.path.join(root, "ant/sub/a3.bmp"))
    rgb(16, 16).save(os.path.join(root, "zebra/z1.png"))
    rgb(64, 50).save(os.path.join(root, "zebra/z2.png"))  # tall, also halved
    for junk in ["Bee/notes.txt", "zebra/readme.md"]:
        open(os.path.join(root, junk), "w").write("not an image")


def adm_crop(img, size):
    """The ADM center crop from its definition."""
    while min(img.width, img.height) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.width, img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


def pixels(root, files, size):
    """(N, 3, size, size) float32 in [-1, 1]: the crop of each RGB-converted image."""
    crops = [adm_crop(Image.open(os.path.join(root, f)).convert("RGB"), size) for f in files]
    return np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1


def encode(*args, ranks=1):
    if ranks == 1:   # forked from the tests' preloaded server
        return launch.run("encode.py", args, ROOT, timeout=300)
    return subprocess.run(script_cmd("encode.py", ranks) + [*map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def encode_ok(*args, ranks=1):
    r = encode(*args, ranks=ranks)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def load(out):
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(out, "files.txt")) as f:
        files = f.read().splitlines()
    return np.load(os.path.join(out, "latents.npy")), np.load(os.path.join(out, "labels.npy")), files, meta


PIXEL_ARGS = ["--vae", "none", "--image-size", 16, "--flip", "--num-workers", 0, "--batch-size", 3, "--chunk-size", 2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("encode") / "images")
    write_images(root)
    return root


@pytest.fixture(scope="module")
def pixel_out(folder):
    out = os.path.join(os.path.dirname(folder), "pixels")
    encode_ok("--data-path", folder, "--out", out, *PIXEL_ARGS)
    return out


def test_pixel_dataset_holds_the_adm_crops_and_their_flips_in_imagefolder_order(folder, pixel_out):
    latents, labels, files, meta = load(pixel_out)
    ref = pixels(folder, [f for f, _ in FILES], 16)
    assert latents.shape == (7, 2, 3, 16, 16) and latents.dtype == np.float16
    np.testing.assert_array_equal(latents[:, 0], ref.astype(np.float16))
    np.testing.assert_array_equal(latents[:, 1], ref[..., ::-1].astype(np.float16))
    assert labels.dtype == np.int64 and labels.tolist() == [c for _, c in FILES]
    assert files == [f for f, _ in FILES]
    assert meta == {"image_size": 16, "channels": 3, "vae": "none", "vae_id": None, "latent_scale": 1.0, "latent_shape": [3, 16, 16],
                    "flip": True, "count": 7, "num_classes": 3, "class_names": CLASSES, "source": folder,
                    "files_relative_to": "source", "skipped": []}
    assert sorted(os.listdir(pixel_out)) == ["files.txt", "labels.npy", "latents.npy", "log.txt", "meta.json", "request.json"]
    assert "images/s" in open(os.path.join(pixel_out, "log.txt")).read()
    assert not os.path.exists(pixel_out + ".partial")


def test_existing_output_is_kept_when_complete_and_replaced_only_with_overwrite(folder, pixel_out):
    out = pixel_out + "_copy"
    shutil.copytree(pixel_out, out)
    stamp = os.stat(os.path.join(out, "latents.npy")).st_mtime_ns
    r = encode_ok("--data-path", folder, "--out", out, *PIXEL_ARGS)
    assert "already complete" in r.stdout
    assert os.stat(os.path.join(out, "latents.npy")).st_mtime_ns == stamp

    other = [a if a != 16 else 8 for a in PIXEL_ARGS]
    r = encode("--data-path", folder, "--out", out, *other)
    assert r.returncode == 1 and "--overwrite" in r.stderr and "image_size" in r.stderr
    assert os.stat(os.path.join(out, "latents.npy")).st_mtime_ns == stamp

    encode_ok("--data-path", folder, "--out", out, *other, "--overwrite")
    latents, _, _, meta = load(out)
    assert latents.shape == (7, 2, 3, 8, 8) and meta["image_size"] == 8
    np.testing.assert_array_equal(latents[:, 0], pixels(folder, [f for f, _ in FILES], 8).astype(np.float16))
    assert not os.path.exists(out + ".partial") and not os.path.exists(out + ".old")


def test_two_ranks_write_the_same_dataset_as_one(folder, pixel_out):
    out = os.path.join(os.path.dirname(folder), "two_ranks")
    encode_ok("--data-path", folder, "--out", out, *PIXEL_ARGS, ranks=2)
    for name in ["latents.npy", "labels.npy", "files.txt", "meta.json"]:
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(pixel_out, name), "rb").read(), name


def test_killed_run_resumes_and_keeps_the_finished_chunks(folder, pixel_out):
    out = os.path.join(os.path.dirname(folder), "resumed")
    r = encode("--data-path", folder, "--out", out, *PIXEL_ARGS, "--stop-after-chunks", 1)
    assert r.returncode == 1 and not os.path.exists(out)
    partial = np.load(os.path.join(out + ".partial", "latents.npy"), mmap_mode="r+")
    full = np.load(os.path.join(pixel_out, "latents.npy"))
    np.testing.assert_array_equal(partial[:2], full[:2])  # chunk 0 (rows 0, 1) was finished
    partial[:2] = 7.0  # a finished chunk that is encoded again would lose this mark
    partial.flush()
    del partial

    encode_ok("--data-path", folder, "--out", out, *PIXEL_ARGS)
    latents, labels, files, _ = load(out)
    assert (latents[:2] == 7.0).all()
    np.testing.assert_array_equal(latents[2:], full[2:])
    assert labels.tolist() == [c for _, c in FILES] and files == [f for f, _ in FILES]
    log = open(os.path.join(out, "log.txt")).read()
    assert "0 of 4 chunks already done; 7 images to do" in log
    assert "1 of 4 chunks already done; 5 images to do" in log
    assert not os.path.exists(out + ".partial")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """(network, directory) of a VAE of random weights."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    # The SD-VAE architecture (4 DownEncoderBlock2D, 2 layers each, 4 latent channels), narrower.
    net = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                        layers_per_block=2, latent_channels=4, sample_size=256).eval()
    path = tmp_path_factory.mktemp("vae") / "vae"
    net.save_pretrained(path)
    return net, path


def test_vae_latents_are_the_scaled_posterior_mean_of_the_crop(folder, vae, tmp_path):
    vae, vae_dir = vae
    out = str(tmp_path / "latents")
    encode_ok("--data-path", folder, "--out", out, "--vae", vae_dir, "--image-size", 32, "--flip",
              "--batch-size", 4, "--num-workers", 1)
    latents, labels, files, meta = load(out)

    x = torch.from_numpy(pixels(folder, [f for f, _ in FILES], 32))
    with torch.no_grad():
        ref = [0.18215 * vae.encode(v).latent_dist.mean for v in (x, x.flip(-1))]
    ref = torch.stack(ref, dim=1).numpy()
    assert latents.shape == (7, 2, 4, 4, 4) and latents.dtype == np.float16
    assert np.abs(ref).max() > 0.05  # a meaningful comparison
    np.testing.assert_allclose(latents.astype(np.float32), ref, rtol=2e-3, atol=2e-4)
    assert meta["vae"] == str(vae_dir) and meta["latent_scale"] == 0.18215
    assert meta["latent_shape"] == [4, 4, 4] and labels.tolist() == [c for _, c in FILES]


# ----------------------------------------------------------------------------- grayscale

GRAY = [("Ankle boot/0.png", "L", (28, 28)), ("Ankle boot/1.png", "LA", (30, 41)), ("Bag/0.png", "L", (28, 28)),
        ("Bag/1.png", "1", (20, 24)), ("Bag/2.png", "I;16", (28, 33))]


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gray") / "images"
    rng = np.random.default_rng(1)
    for name, mode, (h, w) in GRAY:
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        img = {"L": lambda: Image.fromarray(a, "L"), "1": lambda: Image.fromarray(a > 127),
               "LA": lambda: Image.fromarray(np.stack([a, 255 - a], -1), "LA"),
               "I;16": lambda: Image.fromarray(a.astype(np.uint16))}[mode]()
        img.save(root / name)
        assert Image.open(root / name).mode == mode
    return root


def gray_pixels(root, files, size):
    """(N, 1, size, size) float32 in [-1, 1]: the crop of each image converted to PIL's "L"."""
    crops = [adm_crop(Image.open(os.path.join(root, f)).convert("L"), size) for f in files]
    return np.stack(crops)[:, None].astype(np.float32) / 127.5 - 1


def test_grayscale_folder_is_stored_as_one_channel_the_crop_of_the_luma(gray_folder, tmp_path):
    out = tmp_path / "gray"
    r = encode_ok("--data-path", gray_folder, "--out", out, "--vae", "none", "--image-size", 16, "--flip",
                  "--num-workers", 0)
    latents, labels, files, meta = load(out)
    assert files == [f for f, _, _ in GRAY] and labels.tolist() == [0, 0, 1, 1, 1]
    assert latents.shape == (5, 2, 1, 16, 16) and meta["channels"] == 1 and meta["latent_shape"] == [1, 16, 16]
    ref = gray_pixels(gray_folder, files, 16)
    np.testing.assert_array_equal(latents[:, 0], ref.astype(np.float16))
    np.testing.assert_array_equal(latents[:, 1], ref[..., ::-1].astype(np.float16))
    assert "grayscale (--channels auto)" in r.stdout

    # --channels 3 keeps the RGB layout (three equal channels of a gray image); --channels 1 turns an
    # RGB folder into its luma
    encode_ok("--data-path", gray_folder, "--out", tmp_path / "rgb", "--vae", "none", "--image-size", 16,
              "--channels", 3, "--num-workers", 0)
    rgb, *_, meta3 = load(tmp_path / "rgb")
    assert rgb.shape == (5, 3, 16, 16) and meta3["channels"] == 3
    np.testing.assert_array_equal(rgb[:, 0], rgb[:, 2])


def test_one_colour_image_makes_the_folder_rgb_and_channels_1_stores_the_luma(folder, tmp_path):
    encode_ok("--data-path", folder, "--out", tmp_path / "auto", "--vae", "none", "--image-size", 16, "--num-workers", 0)
    assert load(tmp_path / "auto")[0].shape == (7, 3, 16, 16)   # b2.png alone is grayscale
    encode_ok("--data-path", folder, "--out", tmp_path / "luma", "--vae", "none", "--image-size", 16, "--channels", 1,
              "--num-workers", 0)
    latents, _, files, meta = load(tmp_path / "luma")
    assert meta["channels"] == 1
    np.testing.assert_array_equal(latents, gray_pixels(folder, files, 16).astype(np.float16))


def test_grayscale_goes_through_the_vae_as_three_equal_channels(gray_folder, vae, tmp_path):
    vae, vae_dir = vae
    out = tmp_path / "latents"
    encode_ok("--data-path", gray_folder, "--out", out, "--vae", vae_dir, "--image-size", 32, "--num-workers", 0)
    latents, _, files, meta = load(out)
    x = torch.from_numpy(gray_pixels(gray_folder, files, 32)).repeat(1, 3, 1, 1)
    with torch.no_grad():
        ref = (0.18215 * vae.encode(x).latent_dist.mean).numpy()
    assert latents.shape == (5, 4, 4, 4) and meta["channels"] == 1 and meta["latent_shape"] == [4, 4, 4]
    np.testing.assert_allclose(latents.astype(np.float32), ref, rtol=2e-3, atol=2e-4)


def test_unusable_image_folder_is_a_clear_error_and_writes_nothing(tmp_path):
    expected = {"missing": "is not a directory", "empty": "is empty", "loose": "has no class subfolders",
                "hollow": "has class folders without images (dog)"}
    for case in ["empty", "loose", "hollow"]:
        (tmp_path / case).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "loose" / "x.png")  # images but no class folder
    for c in ["cat", "dog"]:
        (tmp_path / "hollow" / c).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "hollow" / "cat" / "x.png")
    before = sorted(os.listdir(tmp_path))
    runs = {case: launch.start("encode.py", ["--data-path", tmp_path / case, "--out", tmp_path / f"out_{case}",
                                             "--vae", "none", "--image-size", 8], ROOT)
            for case in expected}  # at once: each run is mostly its imports
    for case, finish in runs.items():
        r = finish(300)
        assert r.returncode == 1, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: --data-path {tmp_path / case} {expected[case]}"), r.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_corrupt_image_stops_naming_it_unless_skip_bad_leaves_it_out(folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "ant" / "a0_broken.png").write_bytes(b"not a png at all")
    good = (src / "zebra" / "z1.png").read_bytes()
    (src / "zebra" / "z0_truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    args = ["--data-path", src, "--out", out, "--vae", "none", "--image-size", 16, "--num-workers", 0,
            "--batch-size", 1, "--chunk-size", 1]

    r = encode(*args)
    assert r.returncode == 1 and not out.exists()
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot read image {src / 'ant' / 'a0_broken.png'}")
    assert "--skip-bad" in r.stderr

    encode_ok(*args, "--skip-bad")
    latents, labels, files, meta = load(out)
    assert meta["skipped"] == ["ant/a0_broken.png", "zebra/z0_truncated.png"] and meta["count"] == 7
    assert files == [f for f, _ in FILES] and labels.tolist() == [c for _, c in FILES]
    np.testing.assert_array_equal(latents, pixels(folder, files, 16).astype(np.float16))
    assert not (tmp_path / "out.partial").exists()
