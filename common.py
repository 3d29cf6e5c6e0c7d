"""
Helpers that more than one stage script needs: clear errors, torchrun setup, atomic files,
resumable sharded outputs, the dataset directory, the ADM center crop and checkpoint loading.
Stage scripts import from here; they never import each other.
"""
import json
import logging
import os
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- errors

def die(msg):
    """Stop with one clear line on stderr and exit status 1 (every rank says the same)."""
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------- distributed

def setup_distributed():
    """
    Initialise torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU).
    Returns (rank, world_size, device). Plain `python` gives (0, 1, cuda:0 or cpu).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        return rank, world, device
    return 0, 1, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fast_cuda_defaults():
    """TF32 matmuls and convolutions: free speed on Ampere and newer, no effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def create_logger(log_dir, rank, name="d2c"):
    """Logger that writes to stdout and log_dir/log.txt on rank 0 and is silent elsewhere."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            handlers.append(logging.FileHandler(os.path.join(log_dir, "log.txt")))
        for h in handlers:
            h.setFormatter(fmt)
            logger.addHandler(h)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.ERROR)
    return logger


# ----------------------------------------------------------------------------- atomic files

def atomic_save(obj, path, fmt=None):
    """
    Write obj to path so that readers only ever see a complete file: write to path.tmp, then
    rename. fmt is 'npy', 'json', 'torch' or 'text' (default: from the extension).
    """
    fmt = fmt or {".npy": "npy", ".json": "json", ".txt": "text"}.get(os.path.splitext(path)[1], "torch")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        if fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, obj)
        elif fmt == "json":
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2)
        elif fmt == "text":
            with open(tmp, "w") as f:
                f.write(obj)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def replace_dir(partial, out, logger=None, drop=()):
    """Put the finished directory `partial` at `out`, without its bookkeeping entries `drop`
    (files or directories); an existing `out` (--overwrite) stays until then. The logger's files
    (which may live in `partial`) are closed first."""
    for name in drop:
        path = os.path.join(partial, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    for h in list(logger.handlers if logger else []):
        h.close()
        logger.removeHandler(h)
    if os.path.exists(out):
        old = out + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old)
    else:
        os.rename(partial, out)


# ----------------------------------------------------------------------------- resumable sharded work

class ChunkedWork:
    """
    Rows 0..n-1 of one or more preallocated .npy memmaps are filled in chunks of `chunk` rows.
    Chunk i belongs to rank i % world_size; a finished chunk leaves a marker file, so a killed
    job restarted with any number of ranks only does what is missing. Everything lives in
    `work_dir` until `finish()` moves the arrays to their final names.

        work = ChunkedWork(out + ".partial", n, chunk, rank, world)
        feats = work.array("feats.npy", (n, 768), np.float16)
        for lo, hi in work.todo():
            feats[lo:hi] = compute(lo, hi)
            work.done(lo)
        work.finish({"feats.npy": out_path})
    """

    def __init__(self, work_dir, n, chunk, rank, world_size):
        self.dir, self.n, self.chunk, self.rank, self.world = work_dir, n, chunk, rank, world_size
        self.marks = os.path.join(work_dir, "done")
        self.arrays = {}
        if rank == 0:
            os.makedirs(self.marks, exist_ok=True)
        barrier()

    def array(self, name, shape, dtype):
        path = os.path.join(self.dir, name)
        if self.rank == 0:
            ok = False
            if os.path.exists(path):
                try:
                    a = np.load(path, mmap_mode="r")
                    ok = a.shape == tuple(shape) and a.dtype == np.dtype(dtype)
                except ValueError:
                    ok = False
            if not ok:  # a different job left this directory: start over
                shutil.rmtree(self.marks, ignore_errors=True)
                os.makedirs(self.marks, exist_ok=True)
                np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape)).flush()
        barrier()
        self.arrays[name] = np.load(path, mmap_mode="r+")
        return self.arrays[name]

    def chunks(self):
        return [(lo, min(lo + self.chunk, self.n)) for lo in range(0, self.n, self.chunk)]

    def todo(self):
        """This rank's unfinished chunks, as (lo, hi) row ranges."""
        return [(lo, hi) for i, (lo, hi) in enumerate(self.chunks())
                if i % self.world == self.rank and not os.path.exists(os.path.join(self.marks, str(lo)))]

    def batches(self, batch_size, max_chunks=None):
        """Row-index batches of this rank's unfinished chunks (at most max_chunks of them). A batch
        never crosses a chunk boundary, so a chunk is complete when its last batch is written and
        the batches are the same whatever the number of ranks."""
        todo = self.todo()[:max_chunks]
        return [list(range(b, min(b + batch_size, hi))) for lo, hi in todo for b in range(lo, hi, batch_size)]

    def written(self, lo, hi):
        """Call after the batch of rows lo..hi-1 is written: marks its chunk done when the batch
        ends the chunk, and then returns True."""
        c = lo // self.chunk * self.chunk
        if hi == min(c + self.chunk, self.n):
            self.done(c)
            return True
        return False

    def num_done(self):
        return sum(os.path.exists(os.path.join(self.marks, str(lo))) for lo, _ in self.chunks())

    def done(self, lo):
        """Mark the chunk starting at row lo finished (after its rows are written and flushed)."""
        for a in self.arrays.values():
            a.flush()
        open(os.path.join(self.marks, str(lo)), "w").close()

    def finish(self, moves):
        """After every rank is done: rank 0 renames {name in work_dir: final path}."""
        for a in self.arrays.values():
            a.flush()
        barrier()
        if self.rank == 0:
            missing = self.n and len(self.chunks()) - self.num_done()
            if missing:
                die(f"{missing} chunks of {self.dir} are unfinished; run the same command again to complete them")
            for name, dst in moves.items():
                os.replace(os.path.join(self.dir, name), dst)
        barrier()


# ----------------------------------------------------------------------------- dataset directory

def load_meta(data_path):
    path = os.path.join(data_path, "meta.json")
    if not os.path.isdir(data_path):
        die(f"--data-path {data_path} is not a directory: create it with encode.py")
    if not os.path.exists(os.path.join(data_path, "latents.npy")):
        die(f"{data_path} has no latents.npy: run encode.py --data-path IMAGE_FOLDER --out {data_path} first")
    if not os.path.exists(path):
        die(f"{data_path} has no meta.json: run encode.py again to rebuild the dataset directory")
    with open(path) as f:
        return json.load(f)


def load_dataset(data_path):
    """
    Open a dataset directory (see README): returns (latents memmap, labels int64 array, meta).
    latents is (N, C, H, W) or (N, 2, C, H, W) with flips (index 1 = flipped).
    """
    meta = load_meta(data_path)
    latents = np.load(os.path.join(data_path, "latents.npy"), mmap_mode="r")
    lp = os.path.join(data_path, "labels.npy")
    if not os.path.exists(lp):
        die(f"{data_path} has no labels.npy: run encode.py again to rebuild the dataset directory")
    labels = np.load(lp).astype(np.int64)
    if latents.ndim not in (4, 5) or (latents.ndim == 5 and latents.shape[1] != 2):
        die(f"{data_path}/latents.npy has shape {latents.shape}; expected (N, C, H, W) or (N, 2, C, H, W)")
    if len(labels) != len(latents):
        die(f"{data_path}: labels.npy has {len(labels)} rows but latents.npy has {len(latents)}; re-run encode.py")
    return latents, labels, meta


def unflipped(latents):
    """The (N, C, H, W) view of the unflipped latents, whether or not flips are stored."""
    return latents[:, 0] if latents.ndim == 5 else latents


# ----------------------------------------------------------------------------- images

def center_crop_arr(pil_image, image_size):
    """ADM center crop: halve with a box filter while >= 2x the target, bicubic resize, crop."""
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


VAE_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name, device):
    """SD-VAE by short name (ema, mse), hub id or local path; None for --vae none (pixel space)."""
    if name == "none":
        return None
    from diffusers.models import AutoencoderKL
    try:
        return AutoencoderKL.from_pretrained(VAE_IDS.get(name, name)).to(device).eval().requires_grad_(False)
    except Exception as e:  # noqa: BLE001 (hub, path and format errors all mean the same to a user)
        die(f"--vae {name}: cannot load an AutoencoderKL ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "give ema, mse, a diffusers hub id, a local directory, or none")


# ----------------------------------------------------------------------------- checkpoints

def model_config(state_dict, encoder_depth=8):
    """Constructor kwargs of a registry model, read off the shapes of a state dict."""
    sd = state_dict
    w = sd["x_embedder.proj.weight"]                       # (hidden, C, p, p)
    in_ch, p = w.shape[1], w.shape[2]
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    cfg = dict(input_size=int(round(sd["pos_embed"].shape[1] ** 0.5)) * p, in_channels=in_ch,
               learn_sigma=out == 2 * in_ch, qk_norm="blocks.0.attn.q_norm.weight" in sd)
    if "y_embedder.text_emb" in sd:
        nc, L, Dt = sd["y_embedder.text_emb"].shape
        cfg.update(num_classes=nc, text_len=L, text_dim=Dt)
    else:
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        cfg.update(num_classes=rows - 1, class_dropout_prob=0.1)
    z = sorted(k for k in sd if k.startswith("projectors.") and k.endswith(".4.weight"))
    if z:
        cfg.update(z_dims=[sd[k].shape[0] for k in z], projector_dim=sd[z[0]].shape[1], encoder_depth=encoder_depth)
    return cfg


def load_model(ckpt_path, model_name=None, use_ema=True, device="cpu"):
    """
    Load our train.py checkpoints (config stored inside) or the public ones: DiT-XL-2-256/512
    (a bare state dict), SiT-XL-2-256 (bare; reverse time), REPA's last.pt ({"ema", "args"}).
    model_name is needed only for bare public files. Returns (model in eval mode, info) with
    info = {"model": name, "objective": "ddpm"|"sit", "reverse_time": bool, "meta": dict|None,
    "config": kwargs}. The network is not wrapped: diffusion.ReverseTime adapts reverse time.
    """
    import models
    if not os.path.exists(ckpt_path):
        die(f"--ckpt {ckpt_path} does not exist")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        die(f"--ckpt {ckpt_path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})")
    if isinstance(ckpt, dict) and "config" in ckpt:             # ours
        name, cfg, meta, reverse = ckpt["config"]["model"], dict(ckpt["config"]["kwargs"]), ckpt.get("meta"), False
        sd = ckpt["ema" if use_ema else "model"]
    else:                                                       # public
        args = ckpt.get("args") if isinstance(ckpt, dict) else None
        sd = ckpt.get("ema", ckpt) if isinstance(ckpt, dict) else ckpt
        if not isinstance(sd, dict) or "x_embedder.proj.weight" not in sd:
            die(f"--ckpt {ckpt_path} holds no DiT/SiT state dict (no x_embedder.proj.weight)")
        args = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
        name = model_name or args.get("model")
        if name is None:
            die(f"--ckpt {ckpt_path} does not say which network it holds: pass --model (e.g. DiT-XL/2)")
        depth = args.get("encoder_depth", 8)
        cfg, meta = model_config(sd, depth), None
        # official SiT checkpoints (willisma/SiT) keep learned sigma and run time backwards
        reverse = name.startswith("SiT") and cfg["learn_sigma"] and not args
    if name not in models.DiT_models:
        die(f"unknown model {name!r}: choose one of {', '.join(models.DiT_models)}")
    model = models.DiT_models[name](**cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        die(f"--ckpt {ckpt_path} does not fit {name} ({first}); pass the --model it was trained as")
    objective = "ddpm" if name.startswith("DiT") else "sit"
    info = dict(model=name, objective=objective, reverse_time=reverse, meta=meta, config=cfg)
    return model.to(device).eval().requires_grad_(False), info
