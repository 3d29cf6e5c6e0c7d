"""
Encode an image folder (one subfolder per class, the ImageNet train layout) into a dataset
directory: the SD-VAE posterior mean x 0.18215 of the ADM center crop of every image.

Reads:  --data-path, an image folder. Classes are its subfolders in sorted order and images are
        found as torchvision's ImageFolder finds them (recursively, sorted, by extension).
Writes: --out, a directory holding
          latents.npy  float16 (N, C, H, W), or (N, 2, C, H, W) with --flip (index 1: the
                       horizontally flipped crop); with --vae none the pixels in [-1, 1], C = 3
          labels.npy   int64 (N,), the class index
          files.txt    the source image of each row, relative to meta.json's "source"
          meta.json    image_size, vae, vae_id, latent_scale, latent_shape, flip, count,
                       num_classes, class_names, source, skipped
          log.txt      the log of every attempt that built it
        OUT is built in OUT.partial and renamed when complete, so OUT is never half-written.
        A killed run keeps its finished chunks in OUT.partial: run the same command again.
        If OUT already exists and was made from the same --data-path, --image-size, --vae and
        --flip, there is nothing to do (exit 0); other settings are refused unless --overwrite.

    torchrun --nproc_per_node=8 encode.py --data-path imagenet/train --out data/in256 \\
        --image-size 256 --vae ema --flip
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common import (VAE_IDS, ChunkedWork, atomic_save, barrier, center_crop_arr, cleanup_distributed,
                    create_logger, die, fast_cuda_defaults, load_vae, replace_dir, setup_distributed)

# The extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LATENT_SCALE = 0.18215


def find_images(root):
    """(class_names, relative file paths, labels) in ImageFolder's order, or a clear error."""
    if not os.path.isdir(root):
        die(f"--data-path {root} is not a directory: give an image folder with one subfolder per class")
    if not os.listdir(root):
        die(f"--data-path {root} is empty: it should hold one subfolder of images per class")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        die(f"--data-path {root} has no class subfolders: put the images in one subfolder per class "
            "(the ImageNet train layout)")
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = [os.path.relpath(os.path.join(d, f), root)
                 for d, _, fs in sorted(os.walk(os.path.join(root, name), followlinks=True))
                 for f in sorted(fs) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if not files:
        die(f"--data-path {root} has no images ({' '.join(IMG_EXTENSIONS)}) in its {len(classes)} class subfolders")
    if empty:
        die(f"--data-path {root} has class folders without images ({', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}): remove them or add images")
    return classes, files, labels


class ImageRows(Dataset):
    """Row i -> (i, uint8 (3, S, S) ADM crop, error message or ''); unreadable images give zeros."""

    def __init__(self, root, files, size):
        self.root, self.files, self.size = root, files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(os.path.join(self.root, self.files[i])) as img:
                arr = center_crop_arr(img.convert("RGB"), self.size)
            return i, torch.from_numpy(arr).permute(2, 0, 1), ""
        except Exception as e:  # noqa: BLE001 (PIL raises many types for a broken file)
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


@torch.inference_mode()
def encode(vae, img, flip):
    """uint8 (B, 3, S, S) -> float16 (B, C, h, w), or (B, 2, C, h, w) with flip."""
    x = img.float() / 127.5 - 1
    if flip:  # both views in one batch: one encoder pass
        x = torch.cat([x, x.flip(-1)])
    # The posterior mean, not a sample: the dataset stays deterministic. The encoder runs in fp32
    # (TF32 on CUDA): bf16 autocast moves SD-VAE latents several times more than the float16
    # rounding of the stored result, TF32 about as much as that rounding.
    z = x if vae is None else vae.encode(x).latent_dist.mean * LATENT_SCALE
    if flip:
        z = torch.stack(z.chunk(2), dim=1)
    return z.half().cpu().numpy()


def bad_image(path, error, skip, partial):
    if not skip:
        die(f"cannot read image {path} ({error}): fix or delete it, or pass --skip-bad to leave it out, "
            f"then run the same command again ({partial} keeps the finished chunks)")
    tqdm.write(f"skipping unreadable image {path} ({error})", file=sys.stderr)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_settings(meta, request):
    return all(meta.get(k) == v for k, v in request.items())


def finalize(partial, out, meta, logger):
    """Rank 0: drop the bookkeeping files, then put the finished directory in place atomically."""
    logger.info(f"wrote {out}: {meta['count']} images, latents {meta['latent_shape']}"
                f"{' x 2 flips' if meta['flip'] else ''}, {len(meta['skipped'])} skipped")
    replace_dir(partial, out, logger, drop=("done", "valid.npy", "request.json", "latents.compact.npy"))


def main(args):
    rank, world, device = setup_distributed()
    source = os.path.abspath(args.data_path)
    out = os.path.normpath(args.out)
    partial = out + ".partial"
    if args.vae != "none" and args.image_size % 8:
        die(f"--image-size {args.image_size} is not a multiple of 8, which the SD-VAE needs")
    if min(args.image_size, args.batch_size, args.chunk_size) < 1 or args.num_workers < 0:
        die("--image-size, --batch-size and --chunk-size must be positive, --num-workers >= 0")
    vae_id = None if args.vae == "none" else (
        os.path.abspath(args.vae) if os.path.isdir(args.vae) else VAE_IDS.get(args.vae, args.vae))
    request = {"source": source, "image_size": args.image_size, "vae_id": vae_id, "flip": args.flip}

    # An existing OUT: the same request is already done; anything else needs --overwrite.
    if os.path.exists(out):
        old = read_json(os.path.join(out, "meta.json"))
        if old is None:
            die(f"--out {out} exists and is not a dataset directory made by encode.py; "
                "choose another --out (encode.py will not delete it)")
        if not args.overwrite:
            if same_settings(old, request):
                if rank == 0:
                    print(f"{out} is already complete ({old['count']} images); nothing to do "
                          "(--overwrite rebuilds it)")
                cleanup_distributed()
                return
            differ = ", ".join(f"{k}: {old.get(k)} != {v}" for k, v in request.items() if old.get(k) != v)
            die(f"--out {out} already holds a dataset made with other settings ({differ}); "
                "pass --overwrite to replace it or choose another --out")

    classes, files, labels = find_images(source)
    n = len(files)
    vae = load_vae(args.vae, device)
    if vae is None:
        latent_shape = (3, args.image_size, args.image_size)
    else:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        if args.image_size % f:
            die(f"--image-size {args.image_size} is not a multiple of {f}, the downsampling of --vae {args.vae}")
        latent_shape = (vae.config.latent_channels, args.image_size // f, args.image_size // f)
    shape = (n, 2, *latent_shape) if args.flip else (n, *latent_shape)
    meta = {"image_size": args.image_size, "vae": args.vae, "vae_id": vae_id,
            "latent_scale": 1.0 if vae is None else LATENT_SCALE, "latent_shape": list(latent_shape),
            "flip": args.flip, "count": n, "num_classes": len(classes), "class_names": classes,
            "source": source, "files_relative_to": "source", "skipped": []}
    # Rows are only valid for the same settings and the same file list.
    digest = hashlib.sha1("\n".join(f"{l} {p}" for l, p in zip(labels, files)).encode()).hexdigest()
    work_request = {**request, "latent_shape": list(latent_shape), "files_sha1": digest, "count": n}

    if rank == 0:
        if os.path.isdir(partial):
            finished = read_json(os.path.join(partial, "meta.json"))
            if (read_json(os.path.join(partial, "request.json")) != work_request
                    and not (finished and same_settings(finished, request))):
                print(f"{partial} was made with other settings or another file list: starting over")
                shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=True)
        if not os.path.exists(os.path.join(partial, "request.json")):
            atomic_save(work_request, os.path.join(partial, "request.json"))
    barrier()
    finished = read_json(os.path.join(partial, "meta.json"))
    logger = create_logger(partial, rank, name="encode")
    barrier()
    if finished:  # a run was killed between writing the last file and the rename
        if rank == 0:
            finalize(partial, out, finished, logger)
        cleanup_distributed()
        return

    if device.type == "cuda":
        fast_cuda_defaults()
    work = ChunkedWork(partial, n, args.chunk_size, rank, world)
    latents = work.array("latents.npy", shape, np.float16)
    valid = work.array("valid.npy", (n,), np.uint8)
    chunks = work.chunks()
    done_before = work.num_done()
    remaining = sum(hi - lo for lo, hi in chunks if not os.path.exists(os.path.join(work.marks, str(lo))))
    logger.info(f"{source}: {n} images in {len(classes)} classes -> {out} latents {shape} float16, "
                f"vae {args.vae}, {world} rank(s)")
    logger.info(f"{done_before} of {len(chunks)} chunks already done; encoding {remaining} images")

    batches = work.batches(args.batch_size, args.stop_after_chunks)
    loader = DataLoader(ImageRows(source, files, args.image_size), batch_sampler=batches,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    start = time.time()
    chunk_start, chunk_images = start, 0
    with tqdm(total=sum(len(b) for b in batches), unit="img", disable=rank != 0, desc="encode") as bar:
        for idx, img, errors in loader:
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            ok = np.array([not e for e in errors], dtype=np.uint8)
            for i, e in zip(range(lo, hi), errors):
                if e:
                    bad_image(os.path.join(source, files[i]), e, args.skip_bad, partial)
            latents[lo:hi] = encode(vae, img.to(device, non_blocking=True), args.flip)
            valid[lo:hi] = ok
            bar.update(hi - lo)
            chunk_images += hi - lo
            if work.written(lo, hi):
                now = time.time()
                logger.info(f"chunk {lo // args.chunk_size + 1}/{len(chunks)} done: "
                            f"{chunk_images / max(now - chunk_start, 1e-9):.1f} images/s on rank 0")
                chunk_start, chunk_images = now, 0
    if args.stop_after_chunks is not None:
        barrier()
        die(f"stopped after {args.stop_after_chunks} chunk(s) per rank as --stop-after-chunks asked; "
            "run again without it to resume")
    work.finish({})  # waits for every rank; fails if a chunk is missing
    elapsed = time.time() - start
    logger.info(f"encoded {remaining} images in {elapsed:.1f} s: {remaining / max(elapsed, 1e-9):.1f} images/s "
                f"on {world} rank(s)")

    if rank == 0:
        # Bad rows were encoded as black images and flagged invalid; drop them all at the end.
        bad = np.flatnonzero(valid == 0)
        if len(bad) and not args.skip_bad:
            die(f"{len(bad)} images could not be read in an earlier --skip-bad run (first: "
                f"{os.path.join(source, files[bad[0]])}); pass --skip-bad again to leave them out")
        keep = np.flatnonzero(valid)
        atomic_save(np.asarray(labels, dtype=np.int64)[keep], os.path.join(partial, "labels.npy"))
        atomic_save("".join(files[i] + "\n" for i in keep), os.path.join(partial, "files.txt"))
        if len(bad):
            compact = os.path.join(partial, "latents.compact.npy")
            dst = np.lib.format.open_memmap(compact, mode="w+", dtype=np.float16, shape=(len(keep), *shape[1:]))
            for s in range(0, len(keep), 4096):
                dst[s:s + 4096] = latents[keep[s:s + 4096]]
            dst.flush()
            del dst
            os.replace(compact, os.path.join(partial, "latents.npy"))
            logger.info(f"left out {len(bad)} unreadable images (listed in meta.json 'skipped')")
        meta.update(count=len(keep), skipped=[files[i] for i in bad])
        atomic_save(meta, os.path.join(partial, "meta.json"))  # written last: the directory is complete
        del latents, valid, work
        finalize(partial, out, meta, logger)
    cleanup_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=str, required=True, help="image folder, one subfolder per class")
    parser.add_argument("--out", type=str, required=True, help="dataset directory to create")
    parser.add_argument("--image-size", type=int, default=256, help="ADM center crop size (a multiple of 8 with a VAE)")
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema | mse (stabilityai/sd-vae-ft-ema / -mse), a diffusers AutoencoderKL hub id or "
                             "local directory, or none (store the pixels in [-1, 1])")
    parser.add_argument("--flip", action="store_true", help="also store the latents of the horizontally flipped crop")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch on each rank")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per rank")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="rows per resumable unit of work (a killed run loses at most one chunk per rank)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out unreadable images (listed in meta.json 'skipped') instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out made with other settings")
    parser.add_argument("--stop-after-chunks", type=int, default=None,
                        help="for testing resumption only: stop (exit status 1) after each rank finished this "
                             "many chunks, as if the job had been killed")
    main(parser.parse_args())
