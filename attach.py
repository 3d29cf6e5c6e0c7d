"""
Attach: build a subset dataset directory from a parent one and enrich it with pretrained
representations, the class texts for DC-Embedding and the visual tokens for the projection loss.

Reads:  --data-path PARENT, a dataset directory (latents.npy, labels.npy, files.txt, meta.json,
        scores.npy if present) and, for the visual tokens, the source images it was encoded from
        (meta "source" joined with each row of files.txt). --indices FILE.npy: the parent rows to
        keep (integers, unique, in range; select_subset.py writes them); without it, all rows.
Writes: --out SUBSET, a dataset directory holding
          latents.npy, labels.npy, files.txt (and scores.npy): the parent's rows at the indices,
                       in the order of FILE.npy; flipped latents (N, 2, C, H, W) stay flipped
          indices.npy  int64, the parent rows
          meta.json    the parent's meta plus "parent" (absolute path), "indices" ({"file", "count"}),
                       "attach" (the request) and the resolution and width of the visual tokens
          text.pt      {"emb": float32 (num_classes, L, D), "mask": bool (num_classes, L),
                        "prompts": [...], "encoder": id}, one prompt per class; embeddings past the
                       mask are zero. Not written with --text-encoder none.
          vis.npy      float16 (N, h, D), or (N, 2, h, D) with flipped latents (index 1: the
                       flipped crop): the first h normalised patch tokens (no class or register
                       tokens) of the same ADM crop the latents came from. Not written with
                       --vis-encoder none.
          log.txt
        SUBSET is built in SUBSET.partial and renamed when complete. A killed run keeps its
        finished chunks there: run the same command again.

    torchrun --nproc_per_node=8 attach.py --data-path data/in256 --indices data/in256_10k.npy \\
        --out data/in256_10k

Class names: meta class_names (the folder names); WordNet synset folders (n01440764) become the
first ImageNet lemma ("tench") from the table timm ships (no download). ImageNet-1k then has two
"crane" and two "maillot" classes; --class-names FILE gives other names, one per line.

--text-encoder: a transformers hub id or local directory. T5-family models run their encoder
(T5EncoderModel); any other model its AutoModel's last_hidden_state.

--vis-encoder, told apart in this order:
  an existing file   a .pth state dict of a DINOv2 ViT, either the official file
                     (dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth, keys
                     with mask_token) or a timm state dict of vit_*_patch14[_reg4]_dinov2. It runs
                     in timm's DINOv2 architecture; width (384/768/1024/1536 = S/B/L/g), depth,
                     patch size and registers are read off the tensor shapes.
  dinov2_vit{s,b,l,g}14[_reg]   the torch.hub model of facebookresearch/dinov2 (REPA's
                     dinov2-vit-b is dinov2_vitb14, the default); dinov2-vit-b is accepted too.
  anything else      a timm model name with pretrained weights, e.g. vit_base_patch14_dinov2.lvd142m.
The crop is resized to --vis-resolution (default 224 * image_size / 256, rounded to a multiple of
the patch size: 224 for 256 px) as REPA does: /255, ImageNet mean/std, bicubic resize. The
position embedding is resampled once to that grid (bicubic, antialiased, as REPA).
"""
import argparse
import hashlib
import json
import os
import pkgutil
import re
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common import (ChunkedWork, atomic_save, barrier, center_crop_arr, cleanup_distributed, create_logger, die,
                    fast_cuda_defaults, load_dataset, replace_dir, setup_distributed)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_DINOV2 = re.compile(r"dinov2_vit[sblg]14(_reg)?$")
REPA_DINOV2 = re.compile(r"dinov2(reg)?-vit-([sblg])$")  # REPA's --enc-type spelling
SYNSET = re.compile(r"n\d{8}$")
DINOV2_WIDTHS = {384: "small", 768: "base", 1024: "large", 1536: "giant"}


# ----------------------------------------------------------------------------- rows of the subset

def load_indices(path, n):
    """The parent rows to keep, int64, or a clear error (not integers, repeated, out of range)."""
    if path is None:
        return np.arange(n, dtype=np.int64)
    if not os.path.isfile(path):
        die(f"--indices {path} does not exist: write it with select_subset.py or omit --indices to take all rows")
    try:
        idx = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 (numpy raises several types for a bad file)
        die(f"--indices {path} is not a readable .npy file ({type(e).__name__}: {e})")
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        die(f"--indices {path} holds {idx.dtype} of shape {idx.shape}; expected a 1-D array of integer row indices")
    if len(idx) == 0:
        die(f"--indices {path} is empty: select at least one row")
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        die(f"--indices {path}: {len(bad)} indices are out of range for the {n} rows of the parent "
            f"(first: {int(bad[0])}); were they made for another --data-path?")
    values, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        die(f"--indices {path}: row {int(values[counts > 1][0])} is listed {int(counts.max())} times; "
            "indices must be unique")
    return idx.astype(np.int64)


def gather(src, idx, dst_path, step=4096):
    """dst_path (.npy) = src[idx], written in chunks through a memmap and renamed when complete."""
    tmp = dst_path[:-len(".npy")] + ".tmp.npy"
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(len(idx), *src.shape[1:]))
    for s in range(0, len(idx), step):
        dst[s:s + step] = src[idx[s:s + step]]
    dst.flush()
    del dst
    os.replace(tmp, dst_path)


# ----------------------------------------------------------------------------- class texts

def readable_class_names(names):
    """WordNet synset ids (n01440764) -> their first ImageNet lemma ("tench"); other names unchanged."""
    if not any(SYNSET.match(n) for n in names):
        return list(names)
    table = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode()
    lemma = dict(line.split("\t", 1) for line in table.splitlines() if "\t" in line)
    return [lemma[n].split(",")[0].strip() if n in lemma else n for n in names]


def class_prompts(args, meta):
    if args.class_names:
        if not os.path.isfile(args.class_names):
            die(f"--class-names {args.class_names} does not exist: give a text file with one class name per line")
        with open(args.class_names) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        if "class_names" not in meta:
            die(f"{args.data_path}/meta.json has no class_names: pass --class-names FILE (one name per line)")
        names = readable_class_names(meta["class_names"])
    num_classes = meta.get("num_classes", len(names))
    if len(names) != num_classes:
        die(f"{len(names)} class names for {num_classes} classes (meta.json num_classes): "
            f"{'fix --class-names' if args.class_names else 'rebuild the parent with encode.py'}")
    if "{}" not in args.prompt:
        die(f"--prompt {args.prompt!r} has no {{}} where the class name goes, e.g. 'a photo of a {{}}'")
    return [args.prompt.format(n) for n in names]


TEXT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.inference_mode()
def encode_text(prompts, name, text_len, dtype, device, batch_size=64):
    """(emb float32 (K, L, D) zero past the mask, mask bool (K, L)) of the prompts."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    try:
        config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
        if config.model_type == "t5":
            model = transformers.T5EncoderModel.from_pretrained(name, dtype=TEXT_DTYPES[dtype])
        elif config.is_encoder_decoder:
            model = AutoModel.from_pretrained(name, dtype=TEXT_DTYPES[dtype]).get_encoder()
        else:
            model = AutoModel.from_pretrained(name, dtype=TEXT_DTYPES[dtype])
    except Exception as e:  # noqa: BLE001 (hub, path and format errors all mean the same to a user)
        die(f"--text-encoder {name}: cannot load a transformers tokenizer and model ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); give a hub id, a local directory, or none")
    if tokenizer.pad_token is None:
        die(f"--text-encoder {name}: its tokenizer has no padding token, which --text-len padding needs")
    model = model.to(device).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=text_len, truncation=True, return_tensors="pt")
    mask = tokens["attention_mask"].bool()
    out = []
    for s in range(0, len(prompts), batch_size):
        h = model(input_ids=tokens["input_ids"][s:s + batch_size].to(device),
                  attention_mask=tokens["attention_mask"][s:s + batch_size].to(device)).last_hidden_state
        out.append(h.float().cpu())
    emb = torch.cat(out) * mask[..., None]
    if not torch.isfinite(emb).all():
        die(f"--text-encoder {name} gave non-finite embeddings; use --text-dtype fp32")
    return emb, mask


# ----------------------------------------------------------------------------- visual tokens

def read_vit_checkpoint(path):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        die(f"--vis-encoder {path} is not a readable PyTorch state dict ({type(e).__name__}: {e})")
    for key in ("model", "state_dict"):
        sd = sd.get(key, sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or "patch_embed.proj.weight" not in sd:
        die(f"--vis-encoder {path} holds no ViT state dict (no patch_embed.proj.weight); give a DINOv2 "
            "checkpoint (the official .pth or a timm vit_*_dinov2 state dict)")
    return sd


def load_vis_encoder(name, image_size, resolution, tokens):
    """
    (model, fn, resolution): fn maps normalised images (B, 3, res, res) to their normalised patch
    tokens (B, T, D) without the class and register tokens. Too few patch tokens for `tokens`
    is an error found before any network is built.
    """
    def pick(patch):
        res = resolution or patch * max(1, round(224 * image_size / 256 / patch))
        if res % patch:
            die(f"--vis-resolution {res} is not a multiple of the encoder's patch size {patch}")
        if tokens > (res // patch) ** 2:
            die(f"--vis-tokens {tokens} is more than the {(res // patch) ** 2} patch tokens --vis-encoder {name} "
                f"gives at {res} px; use --vis-tokens <= {(res // patch) ** 2} or a larger --vis-resolution")
        return res

    m = REPA_DINOV2.match(name)
    if m and not os.path.exists(name):
        name = f"dinov2_vit{m.group(2)}14{'_reg' if m.group(1) else ''}"
    if os.path.isfile(name):
        sd = read_vit_checkpoint(name)
        width, _, patch, _ = sd["patch_embed.proj.weight"].shape
        if width not in DINOV2_WIDTHS:
            die(f"--vis-encoder {name}: width {width} is none of DINOv2's {sorted(DINOV2_WIDTHS)}")
        reg = "register_tokens" in sd or "reg_token" in sd
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        res = pick(patch)
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
        arch = f"vit_{DINOV2_WIDTHS[width]}_patch14{'_reg4' if reg else ''}_dinov2"
        model = timm.create_model(arch, pretrained=False, img_size=res, patch_size=patch, depth=depth, num_classes=0)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        try:  # the filter converts the official layout and resamples the position embedding to res
            model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
        except RuntimeError as e:
            die(f"--vis-encoder {name} does not fit timm's {arch} of depth {depth} ({str(e).splitlines()[1].strip()})")
        return model, (lambda x: model.forward_features(x)[:, model.num_prefix_tokens:]), res
    if HUB_DINOV2.match(name):
        res = pick(14)
        from timm.layers import resample_abs_pos_embed
        try:
            model = torch.hub.load("facebookresearch/dinov2", name)
        except Exception as e:  # noqa: BLE001
            die(f"--vis-encoder {name}: torch.hub cannot load it ({type(e).__name__}: {e}); offline, download "
                f"https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth and pass its path")
        # as REPA: resample the position embedding once to the working grid (bicubic, antialiased)
        model.pos_embed.data = resample_abs_pos_embed(model.pos_embed.data, [res // 14, res // 14])
        return model, (lambda x: model.forward_features(x)["x_norm_patchtokens"]), res
    import timm
    try:
        with torch.device("meta"):  # free: just to read the patch size before building at res
            probe = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        die(f"--vis-encoder {name}: not a file, a DINOv2 hub name (dinov2_vitb14) or a timm model ({e})")
    if not hasattr(probe, "patch_embed") or not hasattr(probe, "num_prefix_tokens"):
        die(f"--vis-encoder {name} is not a timm ViT with patch tokens")
    res = pick(probe.patch_embed.patch_size[0])
    try:
        model = timm.create_model(name, pretrained=True, img_size=res, num_classes=0)
    except Exception as e:  # noqa: BLE001
        die(f"--vis-encoder {name}: timm cannot load its pretrained weights ({type(e).__name__}: {e}); "
            "offline, pass a local .pth state dict")
    return model, (lambda x: model.forward_features(x)[:, model.num_prefix_tokens:]), res


class Crops(Dataset):
    """Row i -> (i, uint8 (3, S, S) ADM crop, error message or '')."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                arr = center_crop_arr(img.convert("RGB"), self.size)
            return i, torch.from_numpy(arr).permute(2, 0, 1), ""
        except Exception as e:  # noqa: BLE001 (PIL raises many types for a broken file)
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


@torch.inference_mode()
def vis_tokens(fn, img, res, h, flip, device):
    """uint8 crops (B, 3, S, S) -> float16 (B, h, D), or (B, 2, h, D) with the flipped crop at index 1."""
    x = img.to(device, non_blocking=True).float() / 255
    if flip:  # both views in one batch: one encoder pass
        x = torch.cat([x, x.flip(-1)])
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    # REPA's order (normalise, then resize); bicubic weights sum to one, so the order does not matter
    x = F.interpolate((x - mean) / std, size=(res, res), mode="bicubic")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        z = fn(x)[:, :h]
    if flip:
        z = torch.stack(z.chunk(2), dim=1)
    return z.half().cpu().numpy()


# ----------------------------------------------------------------------------- main

def finalize(partial, out, meta, logger):
    """Rank 0: drop the bookkeeping, then put the finished directory in place atomically."""
    logger.info(f"wrote {out}: {meta['count']} rows of {meta['parent']}")
    replace_dir(partial, out, logger, drop=("done", "request.json"))


def main(args):
    rank, world, device = setup_distributed()
    parent = os.path.abspath(args.data_path)
    out = os.path.normpath(args.out)
    partial = out + ".partial"
    if os.path.abspath(out) == parent:
        die("--out must differ from --data-path")
    if min(args.text_len, args.vis_tokens, args.batch_size, args.chunk_size) < 1 or args.num_workers < 0:
        die("--text-len, --vis-tokens, --batch-size and --chunk-size must be positive, --num-workers >= 0")
    if args.vis_resolution is not None and args.vis_resolution < 1:
        die("--vis-resolution must be positive")
    text, vis = args.text_encoder != "none", args.vis_encoder != "none"

    latents, labels, meta = load_dataset(parent)
    n_parent, flip = len(latents), latents.ndim == 5
    idx = load_indices(args.indices, n_parent)
    n = len(idx)
    files_path = os.path.join(parent, "files.txt")
    if not os.path.isfile(files_path):
        die(f"{parent} has no files.txt: rebuild it with encode.py")
    with open(files_path) as f:
        files = f.read().splitlines()
    if len(files) != n_parent:
        die(f"{files_path} has {len(files)} rows but latents.npy has {n_parent}; rebuild the parent with encode.py")
    scores = None
    if os.path.exists(os.path.join(parent, "scores.npy")):
        scores = np.load(os.path.join(parent, "scores.npy"))
        if len(scores) != n_parent:
            die(f"{parent}/scores.npy has {len(scores)} rows but latents.npy has {n_parent}; run score.py again")
    prompts = class_prompts(args, meta) if text else None
    paths = None
    if vis:
        if "source" not in meta or "image_size" not in meta:
            die(f"{parent}/meta.json lacks 'source' or 'image_size', which the visual tokens need; "
                "rebuild it with encode.py or pass --vis-encoder none")
        paths = [os.path.join(meta["source"], files[i]) for i in idx]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            die(f"{len(missing)} source images are missing (first: {missing[0]}); restore them, or select rows "
                "without them, or pass --vis-encoder none")

    local = lambda p: os.path.abspath(p) if os.path.exists(p) else p  # noqa: E731
    request = {"parent": parent, "parent_rows": n_parent,
               "indices_sha1": hashlib.sha1(idx.tobytes()).hexdigest(),
               "text_encoder": local(args.text_encoder) if text else None,
               "text_len": args.text_len if text else None, "text_dtype": args.text_dtype if text else None,
               "prompts": prompts, "vis_encoder": local(args.vis_encoder) if vis else None,
               "vis_tokens": args.vis_tokens if vis else None, "vis_resolution": args.vis_resolution if vis else None}

    # An existing OUT: the same request is already done; anything else needs --overwrite.
    if os.path.exists(out):
        try:
            with open(os.path.join(out, "meta.json")) as f:
                old = json.load(f)
        except (OSError, ValueError):
            die(f"--out {out} exists and is not a dataset directory; choose another --out "
                "(attach.py will not delete it)")
        if not args.overwrite:
            if old.get("attach") == request:
                if rank == 0:
                    print(f"{out} is already complete ({old['count']} rows); nothing to do (--overwrite rebuilds it)")
                cleanup_distributed()
                return
            die(f"--out {out} already holds another dataset or attach request; pass --overwrite to replace it "
                "or choose another --out")

    # Load and check the encoders before anything is written, so bad settings leave nothing behind.
    if device.type == "cuda":
        fast_cuda_defaults()
    if vis:
        model, fn, res = load_vis_encoder(args.vis_encoder, meta["image_size"], args.vis_resolution, args.vis_tokens)
        model = model.to(device).eval().requires_grad_(False)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            T, D = fn(torch.zeros(1, 3, res, res, device=device)).shape[1:]
        if args.vis_tokens > T:  # an encoder with a token count other than its grid
            die(f"--vis-tokens {args.vis_tokens} is more than the {T} patch tokens --vis-encoder {args.vis_encoder} "
                f"gives at {res} px; use --vis-tokens <= {T}")
        if args.vis_dim is not None and D != args.vis_dim:
            die(f"--vis-encoder {args.vis_encoder} gives {D}-dim tokens, not --vis-dim {args.vis_dim}; "
                "pick the encoder the model's projector expects")
    reuse = False
    if rank == 0 and os.path.isdir(partial):
        try:
            with open(os.path.join(partial, "request.json")) as f:
                reuse = json.load(f) == request
        except (OSError, ValueError):
            reuse = False
    emb = None
    if rank == 0 and text and not (reuse and os.path.exists(os.path.join(partial, "text.pt"))):
        emb, mask = encode_text(prompts, args.text_encoder, args.text_len, args.text_dtype, device)

    if rank == 0:
        if os.path.isdir(partial) and not reuse:
            print(f"{partial} was made by another request: starting over")
            shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=True)
        if not reuse:
            atomic_save(request, os.path.join(partial, "request.json"))
    barrier()
    logger = create_logger(partial, rank, name="attach")
    if os.path.exists(os.path.join(partial, "meta.json")):  # killed between the last write and the rename
        if rank == 0:
            with open(os.path.join(partial, "meta.json")) as f:
                finalize(partial, out, json.load(f), logger)
        cleanup_distributed()
        return
    logger.info(f"{parent}: {n} of {n_parent} rows -> {out}; text {args.text_encoder}, vis {args.vis_encoder}, "
                f"{world} rank(s)")

    if rank == 0:
        p = lambda name: os.path.join(partial, name)  # noqa: E731
        if not os.path.exists(p("latents.npy")):
            gather(latents, idx, p("latents.npy"))
        atomic_save(idx, p("indices.npy"))
        atomic_save(labels[idx], p("labels.npy"))
        atomic_save("".join(files[i] + "\n" for i in idx), p("files.txt"))
        if scores is not None:
            atomic_save(scores[idx].astype(np.float32), p("scores.npy"))
        if emb is not None:
            atomic_save({"emb": emb, "mask": mask, "prompts": prompts, "encoder": request["text_encoder"]},
                        p("text.pt"))
            logger.info(f"text.pt: {len(prompts)} prompts, emb {tuple(emb.shape)}, e.g. {prompts[0]!r}")
            del emb

    if vis:
        h, size = args.vis_tokens, meta["image_size"]
        shape = (n, 2, h, D) if flip else (n, h, D)
        work = ChunkedWork(partial, n, args.chunk_size, rank, world)
        out_vis = work.array("vis.npy", shape, np.float16)
        logger.info(f"vis.npy {shape} float16: {args.vis_encoder} at {res} px ({T} patch tokens of width {D}), "
                    f"{work.num_done()} of {len(work.chunks())} chunks already done")
        batches = work.batches(args.batch_size, args.stop_after_chunks)
        loader = DataLoader(Crops(paths, size), batch_sampler=batches, num_workers=args.num_workers,
                            pin_memory=device.type == "cuda")
        start, count = time.time(), 0
        bar = tqdm(total=sum(len(b) for b in batches), unit="img", disable=rank != 0, desc="vis")
        for rows, img, errors in loader:
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            for i, e in zip(range(lo, hi), errors):
                if e:
                    die(f"cannot read image {paths[i]} ({e}): fix or replace it, or select rows without it; run the "
                        f"same command again to resume ({partial} keeps the finished chunks)")
            z = vis_tokens(fn, img, res, h, flip, device)
            if not np.isfinite(z).all():
                die(f"--vis-encoder {args.vis_encoder} gave non-finite tokens for rows {lo}..{hi - 1}")
            out_vis[lo:hi] = z
            bar.update(hi - lo)
            count += hi - lo
            work.written(lo, hi)
        bar.close()
        logger.info(f"vis: {count} images in {time.time() - start:.1f} s on rank 0")
        if args.stop_after_chunks is not None:
            barrier()
            die(f"stopped after {args.stop_after_chunks} chunk(s) per rank as --stop-after-chunks asked; "
                "run again without it to resume")
        del out_vis
        work.finish({})  # waits for every rank; fails if a chunk is missing

    if rank == 0:
        # a parent that is itself a subset: its attach settings do not describe this directory
        sub = {k: v for k, v in meta.items() if k not in ("vis_resolution", "vis_dim")}
        sub.update({"count": n, "parent": parent, "attach": request,
                    "indices": {"file": os.path.abspath(args.indices) if args.indices else None, "count": n}})
        if vis:
            sub.update(vis_resolution=res, vis_dim=int(D))
        atomic_save(sub, os.path.join(partial, "meta.json"))  # written last: the directory is complete
        finalize(partial, out, sub, logger)
    cleanup_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=str, required=True, help="parent dataset directory (encode.py)")
    parser.add_argument("--indices", type=str, default=None,
                        help="int .npy of parent rows (select_subset.py); default: all rows")
    parser.add_argument("--out", type=str, required=True, help="subset dataset directory to create")
    parser.add_argument("--text-encoder", type=str, default="google/flan-t5-xl",
                        help="transformers hub id or local directory, or none (no text.pt)")
    parser.add_argument("--prompt", type=str, default="a photo of a {}", help="one prompt per class; {} is the name")
    parser.add_argument("--class-names", type=str, default=None,
                        help="text file with one class name per line (default: meta.json class_names, "
                             "synsets mapped to ImageNet names)")
    parser.add_argument("--text-len", type=int, default=16, help="text tokens per class (padded / truncated)")
    # Never fp16: T5 (flan-t5 was trained in bf16) has feed-forward activations beyond fp16's
    # 65504 maximum, which overflow to inf/NaN; bf16 has fp32's exponent range.
    parser.add_argument("--text-dtype", type=str, default="fp32", choices=list(TEXT_DTYPES),
                        help="weights and compute dtype of the text encoder")
    parser.add_argument("--vis-encoder", type=str, default="dinov2_vitb14",
                        help="local .pth DINOv2 state dict, torch.hub DINOv2 name, timm model name, or none")
    parser.add_argument("--vis-tokens", type=int, default=256, help="keep the first h patch tokens")
    parser.add_argument("--vis-resolution", type=int, default=None,
                        help="encoder input size (default 224 * image_size / 256, a multiple of the patch size)")
    parser.add_argument("--vis-dim", type=int, default=None, help="expected token width (e.g. 768); checked if given")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch on each rank")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per rank")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="rows per resumable unit of work (a killed run loses at most one chunk per rank)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--stop-after-chunks", type=int, default=None,
                        help="for testing resumption only: stop (exit status 1) after each rank finished this "
                             "many chunks, as if the job had been killed")
    main(parser.parse_args())
