"""
Bad input, stage by stage, run as a user runs the scripts (each forked from the tests' server that
has imported torch and the other heavy modules, tests/launch.py, then run as __main__ with its own
argv and environment). Every case must end with a non-zero exit status, a last stderr line that
starts with `error:` and names the fix, no traceback, no input file changed and no output left
behind (except a stage's documented resume state, OUT.partial or DIR/scores.partial, where the
error comes after work has started).

Each case gets its own folder: the inputs it damages are copies made there, the healthy shared
inputs live in one folder that is checked unchanged at the end.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import launch  # noqa: E402
import models  # noqa: E402

N, C, S, K = 12, 3, 8, 3     # images, channels (pixel space), size, classes
UNWRITABLE = "/sys/d2c_cannot_write_here"


# ----------------------------------------------------------------------------- healthy inputs

def write_images(folder, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    for c in ("ant", "bee", "cat"):
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).save(os.path.join(folder, c, f"{i}.png"))


def write_dataset(d, images, latents=None, labels=None):
    """A pixel-space dataset directory as encode.py --vae none writes it (plus scores.npy)."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(1)
    latents = rng.uniform(-1, 1, (N, C, S, S)).astype(np.float16) if latents is None else latents
    np.save(os.path.join(d, "latents.npy"), latents)
    np.save(os.path.join(d, "labels.npy"), np.arange(N) % K if labels is None else labels)
    np.save(os.path.join(d, "scores.npy"), rng.uniform(0, 1, N).astype(np.float32))
    files = [f"{c}/{i}.png" for i in range(4) for c in ("ant", "bee", "cat")]  # row r has label r % 3
    open(os.path.join(d, "files.txt"), "w").write("".join(f + "\n" for f in files))
    meta = {"image_size": S, "vae": "none", "vae_id": None, "latent_scale": 1.0, "latent_shape": [C, S, S],
            "flip": False, "count": N, "num_classes": K, "class_names": ["ant", "bee", "cat"], "source": images,
            "files_relative_to": "source", "skipped": []}
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    return d


def write_checkpoint(path, name="SiT-T/4", num_classes=K, input_size=S, **extra):
    kw = dict(input_size=input_size, in_channels=C, num_classes=num_classes, learn_sigma=name.startswith("DiT"))
    torch.manual_seed(0)
    sd = models.DiT_models[name](**kw).state_dict()
    meta = {"vae": "none", "vae_id": None, "latent_scale": 1.0, "image_size": input_size, "num_classes": num_classes}
    torch.save({"config": {"model": name, "kwargs": kw}, "model": sd, "ema": sd, "meta": meta, **extra}, path)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    images = str(root / "images")
    write_images(images)
    data = write_dataset(str(root / "data"), images)
    np.save(root / "indices.npy", np.arange(0, N, 2))
    ckpt = write_checkpoint(str(root / "sit.pt"))
    bare = models.DiT_models["SiT-T/4"](input_size=S, in_channels=C, num_classes=K, learn_sigma=False).state_dict()
    torch.save(bare, root / "bare_sit.pt")                     # says nothing about its time direction
    torch.save({"ema": bare, "args": {"model": "SiT-T/4", "path_type": "GVP", "prediction": "velocity"}},
               root / "sit_gvp.pt")                            # willisma/SiT's train.py, another path
    rng = np.random.default_rng(2)
    np.savez(root / "samples.npz", arr_0=rng.integers(0, 256, (6, S, S, 3), dtype=np.uint8))
    np.savez(root / "no_images.npz", images=np.zeros((6, S, S, 3), np.uint8))
    return {k: str(v) for k, v in dict(root=root, images=images, data=data, idx=root / "indices.npy", ckpt=ckpt,
                                        bare=root / "bare_sit.pt", gvp=root / "sit_gvp.pt",
                                        samples=root / "samples.npz", no_images=root / "no_images.npz").items()}


# ----------------------------------------------------------------------------- ways to break things

def copy_data(shared, case, **arrays):
    """The shared dataset copied into the case folder, with some arrays replaced."""
    d = os.path.join(case, "data")
    shutil.copytree(shared["data"], d)
    for name, value in arrays.items():
        path = os.path.join(d, name)
        if isinstance(value, bytes):
            open(path, "wb").write(value)
        else:
            np.save(path, value, allow_pickle=True)
    return d


def truncated(path_or_bytes, keep=0.5):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    return data[:int(len(data) * keep)]


def labels_with(value):
    lab = np.arange(N) % K
    lab[5] = value
    return lab


# Each case: (script, function(shared, case folder) -> argv, text the last line must contain, env).
# The text is the part that says what to do.
def cases():
    def data_case(script, *argv, **arrays):
        def make(sh, c):
            d = copy_data(sh, c, **arrays)
            os.remove(f"{d}/scores.npy")  # score.py would (rightly) refuse scores of unknown origin first
            return ["--data-path", d, *[str(a).format(ckpt=sh["ckpt"], case=c) for a in argv]]
        return make

    def missing_image(sh, c):
        shutil.copytree(sh["images"], f"{c}/im")
        os.remove(f"{c}/im/cat/3.png")
        d = copy_data(sh, c)
        meta = json.load(open(f"{d}/meta.json"))
        json.dump({**meta, "source": f"{c}/im"}, open(f"{d}/meta.json", "w"))
        return ["--data-path", d, "--out", f"{c}/o", "--text-encoder", "none", "--vis-encoder", write_vit(f"{c}/vit.pth")]

    offline = {"HF_HUB_OFFLINE": "1"}
    nan_latents = np.full((N, C, S, S), np.nan, np.float16)
    return {
        # encode.py
        "encode: folder missing": ("encode.py", lambda sh, c: ["--data-path", f"{c}/nope", "--out", f"{c}/o", "--vae", "none"],
                                   "give an image folder", None),
        "encode: no class folders": ("encode.py", lambda sh, c: (os.makedirs(f"{c}/im"), Image.new("RGB", (8, 8)).save(f"{c}/im/x.png"),
                                                                 ["--data-path", f"{c}/im", "--out", f"{c}/o", "--vae", "none"])[2],
                                     "one subfolder per class", None),
        "encode: empty class": ("encode.py", lambda sh, c: (write_images(f"{c}/im"), os.makedirs(f"{c}/im/dog"),
                                                            ["--data-path", f"{c}/im", "--out", f"{c}/o", "--vae", "none"])[2],
                                "remove them or add images", None),
        "encode: out inside the images": ("encode.py", lambda sh, c: ["--data-path", sh["images"], "--out",
                                                                      f"{sh['images']}/ant/dataset", "--vae", "none"],
                                          "choose an output outside the inputs", None),
        "encode: out unwritable": ("encode.py", lambda sh, c: ["--data-path", sh["images"], "--out", UNWRITABLE, "--vae", "none"],
                                   "choose a writable location", None),
        "encode: out under a file": ("encode.py", lambda sh, c: (open(f"{c}/f", "w").close(),
                                                                 ["--data-path", sh["images"], "--out", f"{c}/f/o", "--vae", "none"])[1],
                                     "is a file, not a directory", None),
        "encode: out not a dataset": ("encode.py", lambda sh, c: (os.makedirs(f"{c}/o"), open(f"{c}/o/mine.txt", "w").close(),
                                                                  ["--data-path", sh["images"], "--out", f"{c}/o", "--vae", "none"])[2],
                                      "choose another --out", None),
        "encode: VAE size": ("encode.py", lambda sh, c: ["--data-path", sh["images"], "--out", f"{c}/o", "--image-size", 12],
                             "multiple of 8", None),
        "encode: VAE offline": ("encode.py", lambda sh, c: ["--data-path", sh["images"], "--out", f"{c}/o", "--vae", "someone/vae"],
                                "download it where there is one and pass the local path", offline),
        # score.py
        "score: no checkpoint": ("score.py", data_case("score.py", "--ckpt", "{case}/none.pt"), "does not exist", None),
        "score: truncated checkpoint": ("score.py", lambda sh, c: (open(f"{c}/t.pt", "wb").write(truncated(sh["ckpt"])),
                                                                   ["--data-path", copy_data(sh, c), "--ckpt", f"{c}/t.pt"])[1],
                                        "copy it again", None),
        "score: not a checkpoint": ("score.py", lambda sh, c: (open(f"{c}/x.pt", "w").write("hello"),
                                                               ["--data-path", copy_data(sh, c), "--ckpt", f"{c}/x.pt"])[1],
                                    "copy it again", None),
        "score: truncated latents": ("score.py", lambda sh, c: ["--data-path", copy_data(
            sh, c, **{"latents.npy": truncated(os.path.join(sh["data"], "latents.npy"))}), "--ckpt", sh["ckpt"]],
            "run encode.py again", None),
        "score: label = num_classes": ("score.py", data_case("score.py", "--ckpt", "{ckpt}", **{"labels.npy": labels_with(K)}),
                                       "fix the labels or num_classes", None),
        "score: negative label": ("score.py", data_case("score.py", "--ckpt", "{ckpt}", **{"labels.npy": labels_with(-1)}),
                                  "fix the labels or num_classes", None),
        "score: pickled labels": ("score.py", data_case("score.py", "--ckpt", "{ckpt}",
                                                        **{"labels.npy": np.array([None] * N, dtype=object)}),
                                  "run encode.py again", None),
        "score: NaN latents": ("score.py", data_case("score.py", "--ckpt", "{ckpt}", **{"latents.npy": nan_latents}),
                               "are broken", None),
        "score: other classes": ("score.py", lambda sh, c: ["--data-path", copy_data(sh, c), "--ckpt",
                                                            write_checkpoint(f"{c}/k5.pt", num_classes=5)],
                                 "trained on this dataset's classes", None),
        "score: other latent shape": ("score.py", lambda sh, c: ["--data-path", copy_data(sh, c), "--ckpt",
                                                                 write_checkpoint(f"{c}/s16.pt", input_size=16)],
                                      "encode the images again", None),
        "score: no meta.json": ("score.py", lambda sh, c: (lambda d: (os.remove(f"{d}/meta.json"), ["--data-path", d, "--ckpt", sh["ckpt"]])[1])(
            copy_data(sh, c)), "run encode.py again", None),
        "score: time direction unknown": ("score.py", lambda sh, c: ["--data-path", copy_data(sh, c), "--ckpt", sh["bare"],
                                                                     "--model", "SiT-T/4"], "pass --time-convention", None),
        "score: zero timesteps": ("score.py", data_case("score.py", "--ckpt", "{ckpt}", "--num-timesteps", 0), "must be positive", None),
        # select_subset.py
        "select: out onto labels": ("select_subset.py", lambda sh, c: (lambda d: ["--data-path", d, "--ipc", 2, "--k", 1, "--out",
                                                                                    f"{d}/labels.npy"])(copy_data(sh, c)),
                                    "choose an output outside the inputs", None),
        "select: out not .npy": ("select_subset.py", lambda sh, c: ["--data-path", sh["data"], "--ipc", 2, "--k", 1, "--out", f"{c}/s.txt"],
                                 "must end in .npy", None),
        "select: truncated scores": ("select_subset.py", lambda sh, c: ["--data-path", copy_data(
            sh, c, **{"scores.npy": truncated(os.path.join(sh["data"], "scores.npy"), 0.3)}), "--ipc", 2, "--k", 1, "--out", f"{c}/s.npy"],
            "run score.py", None),
        "select: NaN scores": ("select_subset.py", lambda sh, c: ["--data-path", copy_data(
            sh, c, **{"scores.npy": np.full(N, np.nan, np.float32)}), "--ipc", 2, "--k", 1, "--out", f"{c}/s.npy"],
            "re-run score.py", None),
        "select: no k": ("select_subset.py", lambda sh, c: ["--data-path", sh["data"], "--ipc", 2, "--out", f"{c}/s.npy"],
                         "--k auto", None),
        "select: bad span": ("select_subset.py", lambda sh, c: ["--data-path", sh["data"], "--ipc", 2, "--k", "auto", "--span", 0,
                                                                "--out", f"{c}/s.npy"], "use a fraction in (0, 1]", None),
        "select: ipc too large": ("select_subset.py", lambda sh, c: ["--data-path", sh["data"], "--method", "min", "--ipc", 5,
                                                                     "--out", f"{c}/s.npy"], "--allow-short", None),
        "select: out unwritable": ("select_subset.py", lambda sh, c: ["--data-path", sh["data"], "--ipc", 2, "--k", 1,
                                                                      "--out", f"{UNWRITABLE}/s.npy"], "choose a writable location", None),
        "select: label out of range": ("select_subset.py", lambda sh, c: ["--data-path", copy_data(sh, c, **{"labels.npy": labels_with(7)}),
                                                                          "--method", "random", "--ipc", 2, "--out", f"{c}/s.npy"],
                                       "fix the labels or num_classes", None),
        # attach.py
        "attach: indices out of range": ("attach.py", lambda sh, c: (np.save(f"{c}/i.npy", np.array([0, N])),
                                                                     ["--data-path", sh["data"], "--indices", f"{c}/i.npy", "--out", f"{c}/o",
                                                                      "--text-encoder", "none", "--vis-encoder", "none"])[1],
                                         "select again on this one", None),
        "attach: float indices": ("attach.py", lambda sh, c: (np.save(f"{c}/i.npy", np.array([0.0, 1.0])),
                                                              ["--data-path", sh["data"], "--indices", f"{c}/i.npy", "--out", f"{c}/o",
                                                               "--text-encoder", "none", "--vis-encoder", "none"])[1],
                                   "as select_subset.py writes", None),
        "attach: truncated indices": ("attach.py", lambda sh, c: (open(f"{c}/i.npy", "wb").write(truncated(sh["idx"], 0.2)),
                                                                  ["--data-path", sh["data"], "--indices", f"{c}/i.npy", "--out", f"{c}/o",
                                                                   "--text-encoder", "none", "--vis-encoder", "none"])[1],
                                      "write it with select_subset.py", None),
        "attach: out is the parent": ("attach.py", lambda sh, c: ["--data-path", sh["data"], "--out", sh["data"],
                                                                  "--text-encoder", "none", "--vis-encoder", "none"],
                                      "choose an output outside the inputs", None),
        "attach: out inside the parent": ("attach.py", lambda sh, c: ["--data-path", sh["data"], "--out", f"{sh['data']}/sub",
                                                                      "--text-encoder", "none", "--vis-encoder", "none"],
                                          "choose an output outside the inputs", None),
        "attach: text encoder offline": ("attach.py", lambda sh, c: ["--data-path", sh["data"], "--out", f"{c}/o", "--vis-encoder", "none",
                                                                     "--text-encoder", "someone/t5"],
                                         "download it where there is one and pass the local path", offline),
        "attach: DINOv2 offline": ("attach.py", lambda sh, c: ["--data-path", sh["data"], "--out", f"{c}/o", "--text-encoder", "none",
                                                               "--vis-encoder", "dinov2_vits14", "--vis-tokens", 4],
                                   "download it where there is one and pass the local path", offline),
        "attach: features of other rows": ("attach.py", lambda sh, c: (np.save(f"{c}/f.npy", np.zeros((N - 1, 4, 6), np.float32)),
                                                                       ["--data-path", sh["data"], "--out", f"{c}/o", "--text-encoder", "none",
                                                                        "--vis-features", f"{c}/f.npy", "--vis-tokens", 4])[1],
                                           "one row per parent row", None),
        "attach: missing image": ("attach.py", missing_image, "restore them", None),
        # train.py
        "train: label = num_classes": ("train.py", lambda sh, c: ["--data-path", copy_data(sh, c, **{"labels.npy": labels_with(K)}),
                                                                  "--results-dir", f"{c}/r", "--model", "SiT-T/4"],
                                       "fix the labels or num_classes", None),
        "train: label above num_classes": ("train.py", lambda sh, c: ["--data-path", copy_data(sh, c, **{"labels.npy": labels_with(9)}),
                                                                      "--results-dir", f"{c}/r", "--model", "SiT-T/4"],
                                           "fix the labels or num_classes", None),
        "train: truncated latents": ("train.py", lambda sh, c: ["--data-path", copy_data(
            sh, c, **{"latents.npy": truncated(os.path.join(sh["data"], "latents.npy"))}), "--results-dir", f"{c}/r", "--model", "SiT-T/4"],
            "run encode.py again", None),
        "train: truncated vis.npy": ("train.py", lambda sh, c: ["--data-path", copy_data(
            sh, c, **{"vis.npy": truncated(np_bytes(np.zeros((N, 4, 6), np.float16)))}), "--results-dir", f"{c}/r", "--model", "SiT-T/4"],
            "re-run attach.py", None),
        "train: patch size": ("train.py", lambda sh, c: ["--data-path", copy_data(sh, c, **{"latents.npy": np.zeros((N, C, 6, 6), np.float16)}),
                                                         "--results-dir", f"{c}/r", "--model", "SiT-T/4"],
                              "pick a patch size that divides", None),
        "train: results inside the data": ("train.py", lambda sh, c: ["--data-path", sh["data"], "--results-dir", f"{sh['data']}/run",
                                                                      "--model", "SiT-T/4"], "choose an output outside the inputs", None),
        "train: results unwritable": ("train.py", lambda sh, c: ["--data-path", sh["data"], "--results-dir", UNWRITABLE,
                                                                 "--model", "SiT-T/4"], "choose a writable location", None),
        "train: damaged text.pt": ("train.py", lambda sh, c: ["--data-path", copy_data(sh, c, **{"text.pt": b"not a pickle"}),
                                                              "--results-dir", f"{c}/r", "--model", "SiT-T/4", "--text-cond"],
                                   "run attach.py", None),
        # sample.py
        "sample: truncated checkpoint": ("sample.py", lambda sh, c: (open(f"{c}/t.pt", "wb").write(truncated(sh["ckpt"])),
                                                                     ["--ckpt", f"{c}/t.pt", "--sample-dir", f"{c}/s"])[1],
                                         "copy it again", None),
        "sample: sample dir is the checkpoint": ("sample.py", lambda sh, c: ["--ckpt", sh["ckpt"], "--sample-dir", sh["ckpt"]],
                                                 "choose an output outside the inputs", None),
        "sample: sample dir unwritable": ("sample.py", lambda sh, c: ["--ckpt", sh["ckpt"], "--sample-dir", UNWRITABLE],
                                          "choose a writable location", None),
        "sample: sampler of the other family": ("sample.py", lambda sh, c: ["--ckpt", sh["ckpt"], "--sample-dir", f"{c}/s",
                                                                             "--sampler", "ddpm"], "use one of", None),
        "sample: balanced indivisible": ("sample.py", lambda sh, c: ["--ckpt", sh["ckpt"], "--sample-dir", f"{c}/s", "--class-balanced",
                                                                     "--num-fid-samples", 10], "use e.g. 9", None),
        "sample: SiT GVP path": ("sample.py", lambda sh, c: ["--ckpt", sh["gvp"], "--sample-dir", f"{c}/s", "--vae", "none"],
                                 "only the Linear path", None),
        # fid.py
        "fid: npz without arr_0": ("fid.py", lambda sh, c: [sh["no_images"], "--ref", sh["samples"], "--out", f"{c}/m.json"],
                                   "np.savez", None),
        "fid: out onto the samples": ("fid.py", lambda sh, c: [sh["samples"], "--ref", sh["samples"], "--out", sh["samples"]],
                                      "choose another --out", None),
        "fid: out unwritable": ("fid.py", lambda sh, c: [sh["samples"], "--ref", sh["samples"], "--out", f"{UNWRITABLE}/m.json"],
                                "choose another --out", None),
    }


def np_bytes(a):
    import io
    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


def write_vit(path):
    import timm
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=1, img_size=28)
    torch.save(vit.state_dict(), path)
    return path


# ----------------------------------------------------------------------------- the sweep

def snapshot(folder):
    """{relative path: sha1} of every file below folder."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


RESUME_STATE = (".partial", "scores.partial", "score_log.txt")


def python(script, argv, env):
    """(exit status, stderr) of `python script argv` run from ROOT, forked from the tests' preloaded
    server (launch.run: a fresh interpreter spends ~3 s importing torch, most of each case here); the
    script then imports the rest itself, as at a real start."""
    try:
        r = launch.run(script, argv, ROOT, env, timeout=120)
    except subprocess.TimeoutExpired:
        return "timed out after 120 s", ""
    return r.returncode, r.stderr


def run_case(name, spec, shared, tmp):
    script, argv_of, fix, env = spec
    case = os.path.join(tmp, name.replace(" ", "_").replace(":", "").replace("=", "eq"))
    os.makedirs(case)
    argv = [str(a) for a in argv_of(shared, case)]
    before = snapshot(case)
    returncode, stderr = python(script, argv, {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    after = snapshot(case)
    changed = [p for p in before if after.get(p) != before[p]]
    added = [p for p in after if p not in before and not any(part.endswith(RESUME_STATE) for part in p.split(os.sep))]
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    problems = []
    if returncode == 0:
        problems.append("exit status 0")
    if not last.startswith("error:") or fix not in last:
        problems.append(f"last line {last!r} does not start with 'error:' or lacks {fix!r}")
    if "Traceback" in stderr:
        problems.append("traceback:\n" + stderr[-2000:])
    if changed or added:
        problems.append(f"inputs changed {changed}, outputs left {added}")
    return name, problems


def test_every_bad_input_ends_in_one_clear_error_and_changes_nothing(shared, tmp_path):
    table = cases()
    assert len(table) >= 40
    before = snapshot(shared["root"])
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda item: run_case(*item, shared, str(tmp_path)), table.items()))
    failed = {name: problems for name, problems in results if problems}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())
    assert snapshot(shared["root"]) == before, "a shared input was changed"
    assert not os.path.exists(UNWRITABLE)
