"""
Encode an image folder (one subfolder per class, the ImageNet train layout) into a dataset
directory: the SD-VAE posterior mean x 0.18215 of the ADM center crop of every image.
A grayscale folder (every image of a grayscale PIL mode, --channels auto) is kept grayscale:
one channel of PIL's "L" luma; through a VAE it goes as RGB of three equal channels, and
meta.json "channels": 1 tells sample.py to turn the decoded images back to grayscale.

Reads:  --data-path, an image folder. Classes are its subfolders in sorted order and images are
        found as torchvision's ImageFolder finds them (recursively, sorted, by extension).
Writes: --out, a directory holding
          latents.npy  float16 (N, C, H, W), or (N, 2, C, H, W) with --flip (index 1: the
                       horizontally flipped crop); with --vae none the pixels in [-1, 1],
                       C = --channels (3 RGB, 1 grayscale)
          labels.npy   int64 (N,), the class index
          files.txt    the source image of each row, relative to meta.json's "source"
          meta.json    image_size, channels (of the images: 1 or 3), vae, vae_id, latent_scale,
                       latent_shape, flip, count, num_classes, class_names, source, skipped
          request.json the settings and file list it was made from; log.txt
        OUT is built in OUT.partial and renamed when complete, so OUT is never half-written.
        A killed run keeps its finished chunks in OUT.partial: run the same command again.
        If OUT already exists and was made from the same folder and settings, there is nothing
        to do (exit 0); other settings are refused unless --overwrite.

    torchrun --nproc_per_node=8 encode.py --data-path imagenet/train --out data/in256 \\
        --image-size 256 --vae ema --flip
"""
import hashlib
import os
import sys
import time

import numpy as np
import torch

from common import (GRAY_MODES, VAE_IDS, Output, add_output_flags, atomic_save, atomic_write, check_output,
                    cleanup_distributed, create_logger, crop_loader, default_workers, die, find_images, load_vae,
                    parser, progress, run, setup_distributed)

LATENT_SCALE = 0.18215


def folder_channels(paths):
    """1 when every image is of a grayscale PIL mode, else 3. PIL reads the mode off the header, so no
    pixel is decoded, and the scan stops at the first colour image (the first file of an RGB folder).
    Unreadable files do not count here; encoding names them."""
    from PIL import Image
    for p in paths:
        try:
            with Image.open(p) as img:
                if img.mode not in GRAY_MODES:
                    return 3
        except Exception:  # noqa: BLE001 (PIL raises many types for a broken file)
            continue
    return 1


@torch.inference_mode()
def encode(vae, img, flip):
    """uint8 (B, 3 or 1, S, S) -> float16 (B, C, h, w), or (B, 2, C, h, w) with flip; a grayscale
    image goes through a VAE as RGB of three equal channels."""
    x = img.float() / 127.5 - 1
    if vae is not None and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if flip:  # both views in one batch: one encoder pass
        x = torch.cat([x, x.flip(-1)])
    # The posterior mean, not a sample: the dataset stays deterministic. The encoder runs in fp32
    # (TF32 on CUDA): bf16 autocast moves SD-VAE latents several times more than the float16
    # rounding of the stored result, TF32 about as much as that rounding.
    z = x if vae is None else vae.encode(x).latent_dist.mean * LATENT_SCALE
    if flip:
        z = torch.stack(z.chunk(2), dim=1)
    return z.half().cpu().numpy()


def latent_shape_of(vae, args):
    if vae is None:
        return (args.channels, args.image_size, args.image_size)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.image_size % f:
        die(f"--image-size {args.image_size} is not a multiple of {f}, the downsampling of --vae {args.vae}")
    return (vae.config.latent_channels, args.image_size // f, args.image_size // f)


def encode_chunks(out, vae, paths, args, device, logger):
    """Encode this rank's unfinished chunks into OUT.partial (latents.npy, valid.npy)."""
    n = len(paths)
    latents = out.array("latents.npy", (n, 2, *args.latent_shape) if args.flip else (n, *args.latent_shape), np.float16)
    valid = out.array("valid.npy", (n,), np.uint8)
    batches = out.batches(args.batch_size)
    loader = crop_loader(paths, args.image_size, batches, args.num_workers, device, args.channels)
    start, chunk_start, chunk_images = time.time(), time.time(), 0
    with progress(total=sum(map(len, batches)), rank=out.rank, unit="img", desc="encode") as bar:
        for idx, img, errors in loader:
            for i, e in zip(idx.tolist(), errors):
                if e and not args.skip_bad:
                    die(f"cannot read image {paths[i]} ({e}): fix or delete it, or pass --skip-bad to leave it out, "
                        f"then run the same command again ({out.partial} keeps the finished chunks)")
                if e:
                    bar.write(f"skipping unreadable image {paths[i]} ({e})", file=sys.stderr)
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            latents[lo:hi] = encode(vae, img.to(device, non_blocking=True), args.flip)
            valid[lo:hi] = [not e for e in errors]
            bar.update(hi - lo)
            chunk_images += hi - lo
            if out.written(idx.tolist()):
                logger.info(f"chunk {lo // args.chunk_size + 1}/{len(out.chunks())} done: "
                            f"{chunk_images / max(time.time() - chunk_start, 1e-9):.1f} images/s on rank {out.rank}")
                chunk_start, chunk_images = time.time(), 0
    return time.time() - start


def write_dataset(out, meta, files, labels, skip_bad, logger):
    """Rank 0, every chunk done: labels, files, meta; unreadable rows (encoded as black, flagged in
    valid.npy) are dropped here."""
    valid = np.load(out.path("valid.npy"))
    bad, keep = np.flatnonzero(valid == 0), np.flatnonzero(valid)
    if len(bad) and not skip_bad:
        die(f"{len(bad)} images could not be read in an earlier --skip-bad run (first: {files[bad[0]]}); pass "
            "--skip-bad again to leave them out")
    atomic_save(np.asarray(labels, dtype=np.int64)[keep], out.path("labels.npy"))
    atomic_save("".join(files[i] + "\n" for i in keep), out.path("files.txt"))
    if len(bad):
        src = np.load(out.path("latents.npy"), mmap_mode="r")

        def compact(tmp):
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(keep), *src.shape[1:]))
            for s in range(0, len(keep), 4096):
                dst[s:s + 4096] = src[keep[s:s + 4096]]
            dst.flush()
        atomic_write(out.path("latents.npy"), compact)
        logger.info(f"left out {len(bad)} unreadable images (listed in meta.json 'skipped')")
    os.remove(out.path("valid.npy"))
    meta.update(count=len(keep), skipped=[files[i] for i in bad])
    atomic_save(meta, out.path("meta.json"))
    logger.info(f"wrote {out.out}: {meta['count']} images, latents {meta['latent_shape']}"
                f"{' x 2 flips' if meta['flip'] else ''}, {len(bad)} skipped")


def main(args):
    if args.vae != "none" and args.image_size % 8:
        die(f"--image-size {args.image_size} is not a multiple of 8, which the SD-VAE needs")
    if min(args.image_size, args.batch_size, args.chunk_size) < 1 or (args.num_workers or 0) < 0:
        die("--image-size, --batch-size and --chunk-size must be positive, --num-workers >= 0")
    rank, world, device = setup_distributed()
    source = os.path.abspath(args.data_path)
    check_output(args.out, [source])
    classes, files, labels = find_images(source)
    vae_id = None if args.vae == "none" else os.path.abspath(args.vae) if os.path.isdir(args.vae) else VAE_IDS.get(args.vae, args.vae)
    # rows are only valid for the same settings and the same file list
    digest = hashlib.sha1("\n".join(f"{lab} {p}" for lab, p in zip(labels, files)).encode()).hexdigest()
    found = args.channels
    if args.channels == "auto":
        args.channels = folder_channels([os.path.join(source, f) for f in files])
    args.channels = int(args.channels)
    request = {"source": source, "image_size": args.image_size, "channels": args.channels, "vae_id": vae_id,
               "flip": args.flip, "count": len(files), "files_sha1": digest}
    out = Output(args.out, request, rank, world, args.overwrite, args.stop_after_chunks)
    if out.complete:
        return cleanup_distributed()

    vae = load_vae(args.vae, device)
    args.latent_shape = latent_shape_of(vae, args)
    args.num_workers = default_workers() if args.num_workers is None else args.num_workers
    out.start(len(files), args.chunk_size)
    logger = create_logger(out.partial, rank, name="encode")
    todo = out.remaining()
    logger.info(f"{source}: {len(files)} images in {len(classes)} classes, {'grayscale' if args.channels == 1 else 'RGB'}"
                f"{' (--channels auto)' if found == 'auto' else ''} -> {out.out}, latents "
                f"{args.latent_shape}{' x 2 flips' if args.flip else ''} float16, vae {args.vae}, {world} rank(s); "
                f"{out.summary('images')}")
    seconds = encode_chunks(out, vae, [os.path.join(source, f) for f in files], args, device, logger)
    out.end_chunks()  # waits for every rank; fails if a chunk is missing
    logger.info(f"encoded {todo} images in {seconds:.1f} s on {world} rank(s)")
    if rank == 0:
        meta = {"image_size": args.image_size, "channels": args.channels, "vae": args.vae, "vae_id": vae_id,
                "latent_scale": 1.0 if vae is None else LATENT_SCALE, "latent_shape": list(args.latent_shape),
                "flip": args.flip, "count": len(files), "num_classes": len(classes), "class_names": classes,
                "source": source, "files_relative_to": "source", "skipped": []}
        write_dataset(out, meta, files, labels, args.skip_bad, logger)
        out.commit(logger)
    cleanup_distributed()


def get_parser():
    p = parser(__doc__)
    p.add_argument("--data-path", type=str, required=True, help="image folder, one subfolder per class")
    p.add_argument("--out", type=str, required=True, help="dataset directory to create")
    p.add_argument("--image-size", type=int, default=256, help="ADM center crop size (a multiple of 8 with a VAE)")
    p.add_argument("--vae", type=str, default="ema",
                   help="ema | mse (stabilityai/sd-vae-ft-ema / -mse), a diffusers AutoencoderKL hub id or "
                        "local directory, or none (store the pixels in [-1, 1])")
    p.add_argument("--channels", choices=["auto", "1", "3"], default="auto",
                   help="1: grayscale (PIL's L luma), 3: RGB; auto: 1 when every image of the folder has a grayscale "
                        "PIL mode (L, LA, 1, I, I;16, F; read off the headers), else 3")
    p.add_argument("--flip", action="store_true", help="also store the latents of the horizontally flipped crop")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch on each rank")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per rank (default: 4, or fewer on a machine with fewer cores)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out unreadable images (listed in meta.json 'skipped') instead of stopping")
    add_output_flags(p, 1024, "images")
    return p


if __name__ == "__main__":
    run(main, get_parser().parse_args())
