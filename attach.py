"""
Attach: build a subset dataset directory from a parent one and enrich it with pretrained
representations, the class texts for DC-Embedding and the visual tokens for the projection loss.

Reads:  --data-path PARENT (latents.npy, labels.npy, files.txt, meta.json, scores.npy if present)
        and, for the visual tokens, the source images (meta "source" / each row of files.txt).
        --indices FILE.npy: the parent rows to keep (select_subset.py); without it, all rows.
Writes: --out SUBSET, a dataset directory: latents.npy, labels.npy, files.txt (and scores.npy),
        the parent's rows at the indices in their order (flips stay flips); indices.npy; meta.json
        (the parent's, plus "parent", "indices", vis_resolution, vis_dim); request.json; log.txt;
          text.pt  {"emb": float32 (num_classes, L, D) zero past the mask, "mask": bool (num_classes,
                   L), "prompts", "encoder"}: one prompt per class
          vis.npy  float16 (N, h, D), or (N, 2, h, D) with flips (index 1: the flipped crop): the first
                   h normalised patch tokens (no class or register tokens) of the latents' ADM crop
        SUBSET is built in SUBSET.partial and renamed when complete; a killed run keeps its finished
        chunks there: run the same command again.
The visual tokens are computed as REPA does: /255, ImageNet mean/std, bicubic resize to
--vis-resolution, the position embedding resampled to that grid.

    torchrun --nproc_per_node=8 attach.py --data-path data/in256 --indices data/in256_10k.npy \\
        --out data/in256_10k
"""
import hashlib
import os
import pkgutil
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import (IMAGENET_MEAN, IMAGENET_STD, Output, add_output_flags, atomic_save, atomic_write, check_output,
                    cleanup_distributed, create_logger, crop_loader, default_workers, die, from_hub, load_array,
                    load_dataset, load_vis_encoder, parser, progress, run, setup_distributed)

TEXT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VIS_ALTERNATIVES = ("download it where there is one and pass the local path (a DINOv2 .pth, official or timm layout), "
                    "or pass --vis-encoder none (no visual tokens) or --vis-features FILE.npy (tokens of every parent "
                    "row computed elsewhere)")


def load_indices(path, n):
    """The parent rows to keep, int64, or a clear error (not integers, repeated, out of range)."""
    if path is None:
        return np.arange(n, dtype=np.int64)
    idx = load_array(path, "write it with select_subset.py, or omit --indices to take all rows", mmap=False)
    if idx.ndim != 1 or idx.dtype.kind not in "iu" or len(idx) == 0:
        die(f"--indices {path} holds {idx.dtype} of shape {idx.shape}; expected a non-empty 1-D array of integer row "
            "indices, as select_subset.py writes")
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        die(f"--indices {path}: {len(bad)} indices are out of range for the {n} rows of the parent (first: "
            f"{int(bad[0])}); they were made for another --data-path: select again on this one")
    values, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        die(f"--indices {path}: row {int(values[counts > 1][0])} is listed {int(counts.max())} times; indices must "
            "be unique")
    return idx.astype(np.int64)


def gather(src, idx, dst_path, step=4096):
    """dst_path (.npy) = src[idx], written in chunks through a memmap, atomically."""
    def write(tmp):
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(len(idx), *src.shape[1:]))
        for s in range(0, len(idx), step):
            dst[s:s + step] = src[idx[s:s + step]]
    atomic_write(dst_path, write)


# ----------------------------------------------------------------------------- class texts

def class_prompts(args, meta):
    if args.class_names:
        if not os.path.isfile(args.class_names):
            die(f"--class-names {args.class_names} does not exist: give a text file with one class name per line")
        names = [line.strip() for line in open(args.class_names).read().splitlines() if line.strip()]
    else:
        table = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt").decode()
        lemma = dict(line.split("\t", 1) for line in table.splitlines() if "\t" in line)
        names = [lemma[n].split(",")[0].strip() if n in lemma else n for n in meta.get("class_names", [])]
    if len(names) != meta["num_classes"]:
        die(f"{len(names)} class names for {meta['num_classes']} classes (meta.json num_classes): "
            f"{'fix --class-names' if args.class_names else 'pass --class-names FILE, one name per line'}")
    if "{}" not in args.prompt:
        die(f"--prompt {args.prompt!r} has no {{}} where the class name goes, e.g. 'a photo of a {{}}'")
    return [prompt_for(args.prompt, n) for n in names]


def prompt_for(template, name):
    """template.format(name), with "a {}" as "an {}" before a name starting with a vowel (a, e, i, o, u;
    any case): "a photo of an Ankle boot"."""
    if name[:1].lower() in ("a", "e", "i", "o", "u"):
        template = re.sub(r"\b([Aa]) \{\}", r"\1n {}", template)
    return template.format(name)


@torch.inference_mode()
def encode_text(prompts, name, text_len, dtype, device):
    """(emb float32 (K, L, D) zero past the mask, mask bool (K, L)) of the prompts."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

    def load():
        config = AutoConfig.from_pretrained(name)
        cls = T5EncoderModel if config.model_type == "t5" else AutoModel
        model = cls.from_pretrained(name, dtype=TEXT_DTYPES[dtype])
        return AutoTokenizer.from_pretrained(name), \
            model.get_encoder() if config.is_encoder_decoder and config.model_type != "t5" else model
    try:
        tokenizer, model = from_hub(load, name, "--text-encoder")
    except Exception as e:  # noqa: BLE001 (hub, path and format errors all mean the same to a user)
        die(f"--text-encoder {name}: cannot load a transformers tokenizer and model ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); give a hub id, a local directory, or none")
    if tokenizer.pad_token is None:
        die(f"--text-encoder {name}: its tokenizer has no padding token, which --text-len padding needs")
    model = model.to(device).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=text_len, truncation=True, return_tensors="pt")
    mask = tokens["attention_mask"].bool()
    emb = model(**{k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")})
    emb = emb.last_hidden_state.float().cpu() * mask[..., None]
    if not torch.isfinite(emb).all():
        die(f"--text-encoder {name} gave non-finite embeddings; use --text-dtype fp32")
    return emb, mask


# ----------------------------------------------------------------------------- visual tokens

def vis_encoder(name, image_size, resolution, tokens, device):
    """(fn, res, T, D): fn maps normalised images (B, 3, res, res) to their T normalised patch tokens
    (B, T, D) without the class and register tokens; too few patch tokens for `tokens` is an error."""
    model, fn, res = load_vis_encoder(name, image_size, resolution, fix=VIS_ALTERNATIVES)
    model.to(device).eval().requires_grad_(False)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        T, D = fn(torch.zeros(1, 3, res, res, device=device)).shape[1:]
    if tokens > T:
        die(f"--vis-tokens {tokens} is more than the {T} patch tokens --vis-encoder {name} gives at {res} px; use "
            f"--vis-tokens <= {T} or a larger --vis-resolution")
    return fn, res, T, int(D)


@torch.inference_mode()
def vis_tokens(fn, img, res, h, flip, device):
    """uint8 crops (B, 3, S, S) -> float16 (B, h, D), or (B, 2, h, D) with the flipped crop at index 1."""
    x = img.to(device, non_blocking=True).float() / 255
    if flip:  # both views in one batch: one encoder pass
        x = torch.cat([x, x.flip(-1)])
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    # REPA's order (normalise, then resize); bicubic weights sum to one, so the order does not matter
    x = F.interpolate((x - mean) / std, size=(res, res), mode="bicubic")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        z = fn(x)[:, :h]
    if flip:
        z = torch.stack(z.chunk(2), dim=1)
    return z.half().cpu().numpy()


def vis_chunks(out, fn, res, D, paths, flip, args, device):
    """The tokens of this rank's unfinished chunks, into OUT.partial/vis.npy."""
    n, h = len(paths), args.vis_tokens
    vis = out.array("vis.npy", (n, 2, h, D) if flip else (n, h, D), np.float16)
    batches = out.batches(args.batch_size)
    loader = crop_loader(paths, args.image_size, batches, args.num_workers, device)
    with progress(total=sum(map(len, batches)), rank=out.rank, unit="img", desc="vis") as bar:
        for rows, img, errors in loader:
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            bad = [f"{paths[i]} ({e})" for i, e in zip(range(lo, hi), errors) if e]
            if bad:
                die(f"cannot read image {bad[0]}: fix or replace it, or select rows without it; run the same command "
                    f"again to resume ({out.partial} keeps the finished chunks)")
            z = vis_tokens(fn, img, res, h, flip, device)
            if not np.isfinite(z).all():
                die(f"--vis-encoder {args.vis_encoder} gave non-finite tokens for rows {lo}..{hi - 1}")
            vis[lo:hi] = z
            bar.update(hi - lo)
            out.written(rows.tolist())


def vis_features(path, idx, n_parent, flip, h):
    """Rows idx of a precomputed (N, T, D) or (N, 2, T, D) token array, first h tokens, float16."""
    feats = load_array(path, "give an .npy array with one row of tokens per parent row")
    if len(feats) != n_parent or feats.ndim != 3 + flip or feats.dtype.kind != "f" or (flip and feats.shape[1] != 2):
        die(f"--vis-features {path} is {feats.dtype} {feats.shape}; expected float ({n_parent}, {'2, ' if flip else ''}T, D): "
            "one row per parent row, with the flipped view at index 1 when the latents store flips")
    if h > feats.shape[-2]:
        die(f"--vis-tokens {h} is more than the {feats.shape[-2]} tokens of --vis-features {path}: lower --vis-tokens")
    return np.asarray(feats[idx][..., :h, :], dtype=np.float16)


# ----------------------------------------------------------------------------- main

def parent_rows(args, parent, need_images):
    """(latents, labels, meta, indices, files, source paths of the indices, scores or None) of the parent."""
    latents, labels, meta = load_dataset(parent)
    idx, n = load_indices(args.indices, len(latents)), len(latents)
    files = open(f"{parent}/files.txt").read().splitlines() if os.path.isfile(f"{parent}/files.txt") else []
    if len(files) != n:
        die(f"{parent}/files.txt is missing or has {len(files)} rows for {n} latents: rebuild the parent with encode.py")
    paths = [os.path.join(meta.get("source", ""), files[i]) for i in idx]
    missing = [p for p in paths if not os.path.isfile(p)] if need_images else []
    if missing:
        die(f"{len(missing)} source images are missing (first: {missing[0]}); restore them, select rows without them, "
            "or pass --vis-encoder none")
    scores = load_array(f"{parent}/scores.npy", "run score.py again", mmap=False) if os.path.exists(f"{parent}/scores.npy") else None
    if scores is not None and scores.shape != labels.shape:
        die(f"{parent}/scores.npy has shape {scores.shape} for {n} rows: run score.py again")
    return latents, labels, meta, idx, files, paths, scores


def main(args):
    if min(args.text_len, args.vis_tokens, args.batch_size, args.chunk_size, args.vis_resolution or 1) < 1:
        die("--text-len, --vis-tokens, --vis-resolution, --batch-size and --chunk-size must be positive")
    rank, world, device = setup_distributed()
    parent = os.path.abspath(args.data_path)
    inputs = [parent, args.indices, args.class_names, args.vis_features, args.text_encoder, args.vis_encoder]
    check_output(args.out, [p for p in inputs if p and os.path.exists(p)])
    text, encoded = args.text_encoder != "none", args.vis_encoder != "none" and not args.vis_features
    vis = encoded or args.vis_features is not None
    latents, labels, meta, idx, files, paths, scores = parent_rows(args, parent, encoded)
    prompts = class_prompts(args, meta) if text else None
    local = lambda p: os.path.abspath(p) if os.path.exists(p) else p  # noqa: E731
    request = {"parent": parent, "parent_rows": len(latents), "indices_sha1": hashlib.sha1(idx.tobytes()).hexdigest(),
               "text_encoder": text and local(args.text_encoder), "text_len": text and args.text_len,
               "text_dtype": text and args.text_dtype, "prompts": prompts,
               "vis_encoder": vis and local(args.vis_features or args.vis_encoder), "vis_tokens": vis and args.vis_tokens,
               "vis_resolution": vis and args.vis_resolution}
    out = Output(args.out, request, rank, world, args.overwrite, args.stop_after_chunks)
    if out.complete:
        return cleanup_distributed()

    # the encoders load before anything is written, so bad settings leave nothing behind
    if encoded:
        fn, res, T, D = vis_encoder(args.vis_encoder, meta["image_size"], args.vis_resolution, args.vis_tokens, device)
    emb = None
    if rank == 0 and text and not os.path.exists(out.path("text.pt")):
        emb, mask = encode_text(prompts, args.text_encoder, args.text_len, args.text_dtype, device)
    out.start(len(idx) if encoded else 0, args.chunk_size)
    logger = create_logger(out.partial, rank, name="attach")
    logger.info(f"{parent}: {len(idx)} of {len(latents)} rows -> {out.out}; text {args.text_encoder}, vis "
                f"{args.vis_features or args.vis_encoder}, {world} rank(s)")
    if rank == 0:
        if not os.path.exists(out.path("latents.npy")):
            gather(latents, idx, out.path("latents.npy"))
        for name, value in (("indices.npy", idx), ("labels.npy", labels[idx]), ("files.txt", "".join(files[i] + "\n" for i in idx)),
                            ("scores.npy", None if scores is None else scores[idx].astype(np.float32))):
            if value is not None:
                atomic_save(value, out.path(name))
        if emb is not None:
            atomic_save({"emb": emb, "mask": mask, "prompts": prompts, "encoder": request["text_encoder"]}, out.path("text.pt"))
            logger.info(f"text.pt: {len(prompts)} prompts, emb {tuple(emb.shape)}, e.g. {prompts[0]!r}")
        if args.vis_features:
            atomic_save(vis_features(args.vis_features, idx, len(latents), latents.ndim == 5, args.vis_tokens),
                        out.path("vis.npy"))
    if encoded:
        args.image_size, args.num_workers = meta["image_size"], default_workers() if args.num_workers is None else args.num_workers
        start = time.time()
        vis_chunks(out, fn, res, D, paths, latents.ndim == 5, args, device)
        logger.info(f"vis.npy: {args.vis_encoder} at {res} px ({T} patch tokens of width {D}), {time.time() - start:.1f} s")
    out.end_chunks()
    if rank == 0:
        sub = {k: v for k, v in meta.items() if k not in ("vis_resolution", "vis_dim")}  # a subset of a subset
        sub.update(count=len(idx), parent=parent,
                   indices={"file": os.path.abspath(args.indices) if args.indices else None, "count": len(idx)})
        if vis:
            sub.update(vis_resolution=res if encoded else None, vis_dim=int(np.load(out.path("vis.npy"), mmap_mode="r").shape[-1]))
        atomic_save(sub, out.path("meta.json"))
        logger.info(f"wrote {out.out}: {len(idx)} rows of {parent}")
        out.commit(logger)
    cleanup_distributed()


def get_parser():
    p = parser(__doc__)
    p.add_argument("--data-path", type=str, required=True, help="parent dataset directory (encode.py)")
    p.add_argument("--indices", type=str, default=None, help="int .npy of parent rows (select_subset.py); default: all rows")
    p.add_argument("--out", type=str, required=True, help="subset dataset directory to create")
    p.add_argument("--text-encoder", type=str, default="google/flan-t5-xl",
                   help="transformers hub id or local directory (T5 models run their encoder), or none (no text.pt)")
    p.add_argument("--prompt", type=str, default="a photo of a {}",
                   help="one prompt per class; {} is the name, and \"a {}\" reads \"an {}\" before a name that starts "
                        "with a vowel (a, e, i, o, u)")
    p.add_argument("--class-names", type=str, default=None,
                   help="text file with one class name per line (default: meta.json class_names, WordNet synsets "
                        "such as n01440764 mapped to their first ImageNet lemma, tench, from timm's table)")
    p.add_argument("--text-len", type=int, default=16, help="text tokens per class (padded / truncated)")
    # Never fp16: T5 (flan-t5 was trained in bf16) has feed-forward activations beyond fp16's
    # 65504 maximum, which overflow to inf/NaN; bf16 has fp32's exponent range.
    p.add_argument("--text-dtype", type=str, default="fp32", choices=list(TEXT_DTYPES),
                   help="weights and compute dtype of the text encoder")
    p.add_argument("--vis-encoder", type=str, default="dinov2_vitb14",
                   help="a local DINOv2 .pth (official or timm layout, its size read off the shapes), a DINOv2 name "
                        "(dinov2_vitb14, REPA's dinov2-vit-b: timm's copy of the official weights), a timm ViT "
                        "name with pretrained weights (e.g. vit_large_patch14_clip_224.openai), or none")
    p.add_argument("--vis-features", type=str, default=None,
                   help="precomputed tokens of every parent row, (N, T, D) or (N, 2, T, D) .npy, instead of --vis-encoder")
    p.add_argument("--vis-tokens", type=int, default=256, help="keep the first h patch tokens")
    p.add_argument("--vis-resolution", type=int, default=None,
                   help="encoder input size (default 224 * image_size / 256, rounded to a multiple of the patch size)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each rank")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per rank (default: 4, or fewer on a machine with fewer cores)")
    add_output_flags(p, 1024, "rows")
    return p


if __name__ == "__main__":
    run(main, get_parser().parse_args())
