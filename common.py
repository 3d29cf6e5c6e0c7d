"""
Helpers that more than one stage script needs: clear errors and interruption, torchrun setup,
progress bars, atomic files, the resumable output of a stage, the dataset directory, pretrained
parts from a hub, the ADM center crop and checkpoint loading. Stage scripts import from here;
they never import each other.
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import weakref
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# ----------------------------------------------------------------------------- errors, interruption, CLI

_BARS = weakref.WeakSet()


def die(msg, code=1):
    """Stop with one clear line on stderr (every rank says the same). Open progress bars are closed
    first, so the message is the last line the user sees."""
    for bar in list(_BARS):
        bar.close()
    if code == 1:
        raise SystemExit(f"error: {msg}")  # Python prints it and exits with status 1
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(main, args):
    """Run a stage's main. SIGTERM (a cluster's preemption notice) is treated as Ctrl-C: either ends
    with one line and the stage's partial work kept for the rerun."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(args)
    except KeyboardInterrupt:
        die("interrupted; rerun the same command to continue", code=130)


def quiet_worker(_):
    """DataLoader worker_init_fn: Ctrl-C and SIGTERM are the main process's to handle (a worker
    killed by them would turn a clean stop into a 'worker exited unexpectedly' traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every default."""


def parser(doc):
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_compile_flag(p):
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network (default: on CUDA, off on CPU)")


def add_output_flags(p, chunk_size, unit="rows"):
    """The flags of every stage built on Output."""
    p.add_argument("--chunk-size", type=int, default=chunk_size,
                   help=f"{unit} per resumable unit of work (a killed run loses at most one chunk per rank)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output made with other settings")
    p.add_argument("--stop-after-chunks", type=int, default=None,
                   help="for testing resumption only: stop (exit status 1) after each rank finished this many "
                        "chunks, as if the job had been killed")


def default_workers(cap=4):
    """Loader workers per rank: at most `cap`, and no more than the cores this process may use."""
    return min(cap, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def compile_on(args, device):
    return device.type == "cuda" if args.compile is None else args.compile


def item_seed(global_seed, index):
    """The seed of item `index` (an image, a sample, a training step): every random draw of a stage
    comes from it, so results do not depend on the number of ranks or the batch size."""
    return global_seed * 1_000_003 + index


# ----------------------------------------------------------------------------- distributed

def setup_distributed():
    """
    Initialise torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU), with TF32
    matmuls on CUDA. Returns (rank, world_size, device). Plain `python` gives (0, 1, cuda:0 or cpu).
    """
    fast_cuda_defaults()
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


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively: AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on Arm,
    read off the flags of /proc/cpuinfo (False where there is none). torch's get_cpu_capability() says
    only "AVX512", which CPUs without bf16 report too; there autocast emulates bf16 and is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


PRECISIONS = ("auto", "bf16", "fp32")


def use_bf16(precision, device, log=print):
    """
    Whether the network runs in bf16 autocast (fp32 master weights, optimizer states and losses)
    for --precision auto | bf16 | fp32 on `device`: auto is bf16 on CUDA and fp32 on CPU; an explicit
    bf16 is honoured on a CPU with native bf16 (cpu_has_bf16), and elsewhere on CPU log() says in one
    line that it stays fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is none of {PRECISIONS}")
    cuda = torch.device(device).type == "cuda"
    if precision == "fp32" or (precision == "auto" and not cuda):
        return False
    if cuda or cpu_has_bf16():
        return True
    log("--precision bf16: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag), where bf16 autocast is "
        "slower than fp32; running in fp32")
    return False


def add_precision_flag(p):
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16: bf16 autocast with fp32 master weights, on "
                        "CPU too where it has native bf16 (AVX512-BF16, AMX), else fp32 with a note; fp32: fp32 "
                        "(TF32 matmuls on CUDA)")


def fast_cuda_defaults():
    """TF32 matmuls and convolutions: free speed on Ampere and newer, no effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def create_logger(log_dir, rank, name="d2c", filename="log.txt"):
    """Logger that writes to stdout and log_dir/filename on rank 0 and is silent elsewhere."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            handlers.append(logging.FileHandler(os.path.join(log_dir, filename)))
        for h in handlers:
            h.setFormatter(fmt)
            logger.addHandler(h)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.ERROR)
    return logger


class _Lines:
    """A file for tqdm that turns each carriage-return redraw into one plain line (for logs)."""

    def __init__(self, f):
        self.f = f

    def write(self, s):
        s = s.replace("\r", "").strip()
        if s:
            self.f.write(s + "\n")

    def flush(self):
        self.f.flush()


def progress(iterable=None, rank=0, disable=False, **kw):
    """A tqdm bar on rank 0; into a file or pipe (a job's log) one line every 5 s instead of redraws."""
    tty = sys.stderr.isatty()
    bar = tqdm(iterable, disable=disable or rank != 0, dynamic_ncols=tty, mininterval=0.1 if tty else 5,
               file=sys.stderr if tty else _Lines(sys.stderr), **kw)
    _BARS.add(bar)
    return bar


# ----------------------------------------------------------------------------- atomic files

def atomic_write(path, write):
    """Readers only ever see a complete file: write(tmp) fills a temporary name, which is then renamed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path, fmt=None):
    """atomic_write of obj as 'npy', 'json', 'text' or 'torch' (default: from the extension)."""
    fmt = fmt or {".npy": "npy", ".json": "json", ".txt": "text"}.get(os.path.splitext(path)[1], "torch")

    def write(tmp):
        if fmt == "torch":
            return torch.save(obj, tmp)
        with open(tmp, "wb" if fmt == "npy" else "w") as f:
            np.save(f, obj) if fmt == "npy" else json.dump(obj, f, indent=2) if fmt == "json" else f.write(obj)
    atomic_write(path, write)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_output(path, inputs, flag="--out"):
    """Before any work: refuse an output that is, lies inside or contains one of the inputs, or whose
    location cannot be written (missing directories are created later, as mkdir -p would)."""
    out = os.path.realpath(path)
    for p in inputs:
        p = os.path.realpath(p)
        if out == p or out.startswith(p + os.sep) or p.startswith(out + os.sep):
            die(f"{flag} {path} would {'overwrite' if out == p else 'mix with'} the input {p}: choose an output "
                "outside the inputs")
    d = os.path.dirname(out)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        die(f"{flag} {path}: {d} is a file, not a directory; choose another {flag}")
    try:
        with open(os.path.join(d, f".d2c_write_test.{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(d, f".d2c_write_test.{os.getpid()}"))
    except OSError as e:
        die(f"{flag} {path}: cannot write in {d} ({e.strerror}); choose a writable location")


# ----------------------------------------------------------------------------- resumable stage output

class Output:
    """
    The output of a stage: appears complete or not at all, resumes after a kill, and is never
    silently replaced. Row work is split into chunks; chunk i belongs to rank i % world, and a
    finished chunk leaves a marker, so a rerun with any number of ranks does only what is missing.

        out = Output(args.out, request, rank, world, args.overwrite, args.stop_after_chunks)
        if out.complete:                   # OUT already holds this request: it says so, nothing to do
            return
        out.start(n, chunk)                # OUT.partial/ (another request's is started over)
        feats = out.array("feats.npy", (n, 768), np.float16)
        for rows in out.batches(batch_size):
            feats[rows] = compute(rows)
            out.written(rows)
        out.end_chunks()                   # every rank; stops here under --stop-after-chunks
        ... rank 0 writes the last files into out.partial ...
        out.commit()                       # rank 0: OUT.partial -> OUT, atomically

    A directory output keeps its request in OUT/request.json. A file output (score.py's
    DATA/scores.npy) keeps it in the JSON `record`, and commit moves the file out of the partial
    directory. Rows are only valid for the same request: that is what a partial directory holds.
    """

    def __init__(self, out, request, rank, world, overwrite=False, stop_after=None, record=None, flag="--out"):
        self.out, self.request, self.rank, self.world = os.path.normpath(out), request, rank, world
        self.stop_after, self.flag = stop_after, flag
        self.is_dir = record is None
        self.partial = (self.out if self.is_dir else os.path.splitext(self.out)[0]) + ".partial"
        self.record = os.path.join(self.out, "request.json") if self.is_dir else record
        self.arrays = {}
        self.complete = False
        if stop_after is not None and stop_after < 1:
            die(f"--stop-after-chunks {stop_after} must be at least 1")
        if os.path.exists(self.out):
            old = (read_json(self.record) or {}).get("request")
            elsewhere = f", or choose another {flag}" if flag else ""
            if old == request and not overwrite:
                self.complete = True
                if rank == 0:
                    print(f"{self.out} is already complete with these settings; nothing to do (--overwrite redoes it)")
            elif old is None and self.is_dir:
                die(f"{flag} {self.out} exists but was not made by this stage (no {self.record}): choose another "
                    f"{flag} (it will not be deleted)")
            elif old is None and not overwrite:
                die(f"{self.out} exists but {self.record} does not say how it was made: pass --overwrite to "
                    f"replace it{elsewhere}")
            elif not overwrite:
                differ = ", ".join(f"{k}: {old.get(k)!r} != {v!r}" for k, v in request.items() if old.get(k) != v)
                die(f"{self.out} already holds output made with other settings ({differ[:300]}); pass --overwrite "
                    f"to replace it{elsewhere}")
        if os.path.exists(self.partial) and not os.path.exists(os.path.join(self.partial, "request.json")):
            die(f"{self.partial} exists but was not made by this stage; move it away (it will not be deleted)")
        barrier()  # every rank has looked before rank 0's start() makes OUT.partial (and then its request.json)

    def start(self, n=0, chunk=1):
        """Rank 0 makes OUT.partial for this request (a partial made for another one is started over)."""
        self.n, self.chunk = n, max(1, chunk)
        self.marks = os.path.join(self.partial, "done")
        if self.rank == 0:
            if (read_json(os.path.join(self.partial, "request.json")) or {}).get("request") not in (None, self.request):
                print(f"{self.partial} was made with other settings: starting over", flush=True)
                shutil.rmtree(self.partial)
            os.makedirs(self.marks, exist_ok=True)
            if not os.path.exists(os.path.join(self.partial, "request.json")):
                atomic_save({"request": self.request}, os.path.join(self.partial, "request.json"))
        barrier()
        return self.partial

    def path(self, name):
        return os.path.join(self.partial, name)

    def array(self, name, shape, dtype):
        """An .npy memmap in OUT.partial; one of another shape or dtype restarts the chunk markers."""
        path = self.path(name)
        if self.rank == 0:
            try:
                a = np.load(path, mmap_mode="r")
                ok = a.shape == tuple(shape) and a.dtype == np.dtype(dtype)
            except (OSError, ValueError):
                ok = False
            if not ok:
                shutil.rmtree(self.marks, ignore_errors=True)
                os.makedirs(self.marks, exist_ok=True)
                np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape)).flush()
        barrier()
        self.arrays[name] = np.load(path, mmap_mode="r+")
        return self.arrays[name]

    def chunks(self):
        return [(lo, min(lo + self.chunk, self.n)) for lo in range(0, self.n, self.chunk)]

    def is_done(self, lo):
        return os.path.exists(os.path.join(self.marks, str(lo)))

    def todo(self):
        """This rank's unfinished chunks, as (lo, hi) row ranges (at most --stop-after-chunks of them)."""
        mine = [(lo, hi) for i, (lo, hi) in enumerate(self.chunks()) if i % self.world == self.rank and not self.is_done(lo)]
        return mine[:self.stop_after]

    def remaining(self):
        """Rows of all ranks still to do."""
        return sum(hi - lo for lo, hi in self.chunks() if not self.is_done(lo))

    def summary(self, unit):
        done = sum(self.is_done(lo) for lo, _ in self.chunks())
        return f"{done} of {len(self.chunks())} chunks already done; {self.remaining()} {unit} to do"

    def batches(self, batch_size):
        """Row-index batches of this rank's unfinished chunks. A batch never crosses a chunk boundary,
        so the batches are the same whatever the number of ranks."""
        return [list(range(b, min(b + batch_size, hi))) for lo, hi in self.todo() for b in range(lo, hi, batch_size)]

    def written(self, rows):
        """Call when the rows of a batch are written: marks their chunk done if the batch ends it."""
        lo, hi = rows[0], rows[-1] + 1
        c = lo // self.chunk * self.chunk
        if hi == min(c + self.chunk, self.n):
            for a in self.arrays.values():
                a.flush()
            open(os.path.join(self.marks, str(c)), "w").close()
            return True
        return False

    def end_chunks(self):
        """Every rank: wait for the others; stop here under --stop-after-chunks; check every chunk is done."""
        for a in self.arrays.values():
            a.flush()
        barrier()
        if self.stop_after is not None:
            die(f"stopped after {self.stop_after} chunk(s) per rank as --stop-after-chunks asked; run the same "
                f"command without it to resume ({self.partial} keeps the finished chunks)")
        missing = sum(not self.is_done(lo) for lo, _ in self.chunks())
        barrier()  # every rank has looked before rank 0 commits: commit moves the markers away
        if missing:
            die(f"{missing} chunks of {self.partial} are unfinished; run the same command again to complete them")

    def commit(self, logger=None, record=None):
        """Rank 0: put the finished output in place atomically; an existing OUT (--overwrite) stays until
        then. `record` adds information to the stored request. The logger's files are closed first."""
        if self.rank != 0:
            return
        self.arrays.clear()
        for h in list(logger.handlers if logger else []):
            h.close()
            logger.removeHandler(h)
        entry = {**(record or {}), "request": self.request}
        if not self.is_dir:
            if os.path.exists(self.record):  # never leave old settings beside new rows
                os.remove(self.record)
            os.replace(self.path(os.path.basename(self.out)), self.out)
            atomic_save(entry, self.record)
            shutil.rmtree(self.partial)
            return
        atomic_save(entry, self.path("request.json"))
        if os.path.exists(self.out):
            old = self.out + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.out, old)
            os.rename(self.partial, self.out)
            shutil.rmtree(old)
        else:
            os.rename(self.partial, self.out)
        shutil.rmtree(os.path.join(self.out, "done"), ignore_errors=True)


# ----------------------------------------------------------------------------- dataset directory

def load_array(path, fix, mmap=True):
    """An .npy array (memory-mapped by default), or one clear error naming the file and `fix`."""
    if not os.path.isfile(path):
        die(f"{path} does not exist: {fix}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 (truncated, pickled or not .npy: numpy raises several types)
        die(f"{path} is damaged or not a plain .npy array ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): {fix}")


def load_meta(data_path):
    if not os.path.isdir(data_path):
        die(f"--data-path {data_path} is not a directory: create it with encode.py")
    if not os.path.exists(os.path.join(data_path, "latents.npy")):
        die(f"{data_path} has no latents.npy: run encode.py --data-path IMAGE_FOLDER --out {data_path} first")
    meta = read_json(os.path.join(data_path, "meta.json"))
    if not isinstance(meta, dict) or not isinstance(meta.get("num_classes"), int) or meta["num_classes"] < 1:
        die(f"{data_path}/meta.json is missing, damaged or has no num_classes: run encode.py again to rebuild "
            "the dataset directory")
    return meta


def load_dataset(data_path):
    """
    Open a dataset directory (see README): returns (latents memmap, labels int64 array, meta).
    latents is (N, C, H, W) or (N, 2, C, H, W) with flips (index 1 = flipped). Labels must lie in
    0..num_classes-1 (num_classes itself would be the null class of classifier-free guidance).
    """
    meta = load_meta(data_path)
    rebuild = "run encode.py again to rebuild the dataset directory"
    latents = load_array(os.path.join(data_path, "latents.npy"), rebuild)
    labels = load_array(os.path.join(data_path, "labels.npy"), rebuild, mmap=False)
    if latents.ndim not in (4, 5) or (latents.ndim == 5 and latents.shape[1] != 2) or latents.dtype.kind != "f":
        die(f"{data_path}/latents.npy is {latents.dtype} of shape {latents.shape}; expected float (N, C, H, W) or "
            f"(N, 2, C, H, W): {rebuild}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        die(f"{data_path}/labels.npy is {labels.dtype} of shape {labels.shape}; expected (N,) integers: {rebuild}")
    if len(labels) != len(latents):
        die(f"{data_path}: labels.npy has {len(labels)} rows but latents.npy has {len(latents)}: {rebuild}")
    nc = meta["num_classes"]
    bad = np.flatnonzero((labels < 0) | (labels >= nc))
    if len(bad):
        die(f"{data_path}/labels.npy holds label {labels[bad[0]]} at row {bad[0]} ({len(bad)} rows outside "
            f"0..{nc - 1}, the num_classes of meta.json): fix the labels or num_classes, or {rebuild}")
    return latents, labels.astype(np.int64), meta


def unflipped(latents):
    """The (N, C, H, W) view of the unflipped latents, whether or not flips are stored."""
    return latents[:, 0] if latents.ndim == 5 else latents


# ----------------------------------------------------------------------------- images

# The extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")  # PIL modes of one (gray) channel, alpha aside

def find_images(root, flag="--data-path"):
    """(class_names, relative file paths, labels) in ImageFolder's order, or a clear error."""
    if not os.path.isdir(root):
        die(f"{flag} {root} is not a directory: give an image folder with one subfolder per class")
    if not os.listdir(root):
        die(f"{flag} {root} is empty: it should hold one subfolder of images per class")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        die(f"{flag} {root} has no class subfolders: put the images in one subfolder per class "
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
        die(f"{flag} {root} has no images ({' '.join(IMG_EXTENSIONS)}) in its {len(classes)} class subfolders")
    if empty:
        die(f"{flag} {root} has class folders without images ({', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}): remove them or add images")
    return classes, files, labels


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


class ImageCrops(torch.utils.data.Dataset):
    """Row i -> (i, uint8 (channels, S, S) ADM crop of paths[i], error message or ''); an unreadable
    image gives zeros and its error, for the stage to stop on or skip. channels 3: RGB, 1: grayscale
    (PIL's "L", ITU-R 601 luma)."""

    def __init__(self, paths, size, channels=3):
        self.paths, self.size, self.mode = paths, size, {1: "L", 3: "RGB"}[channels]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as img:
                arr = center_crop_arr(img.convert(self.mode), self.size)
            return i, torch.from_numpy(arr.reshape(self.size, self.size, -1)).permute(2, 0, 1), ""
        except Exception as e:  # noqa: BLE001 (PIL raises many types for a broken file)
            return i, torch.zeros(len(self.mode), self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


def crop_loader(paths, size, batches, num_workers, device, channels=3):
    """A DataLoader of ImageCrops over the given row batches."""
    return torch.utils.data.DataLoader(ImageCrops(paths, size, channels), batch_sampler=batches, num_workers=num_workers,
                                       pin_memory=device.type == "cuda", worker_init_fn=quiet_worker)


# ----------------------------------------------------------------------------- pretrained parts

def reachable(url, timeout=3.0):
    """Whether the host of `url` answers on its port within `timeout` seconds."""
    u = urlparse(url if "://" in url else f"https://{url}")
    try:
        socket.create_connection((u.hostname, u.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def need_download(name, url, flag, offline=False, fix=None):
    """Fail at once, with the fix, when `name` must come from `url` and there is no network (the
    hub clients would otherwise retry for half a minute, then blame the name)."""
    if offline or not reachable(url):
        die(f"{flag} {name}: cannot download it (no network?): "
            f"{fix or 'download it where there is one and pass the local path'}")


def from_hub(load, name, flag, fix=None):
    """load() of a Hugging Face hub id or a local directory. Where huggingface.co does not answer,
    the hub clients are switched to their local cache, so a missing model fails at once."""
    if os.path.exists(name):
        return load()
    import huggingface_hub.constants as hub
    if not hub.HF_HUB_OFFLINE and not reachable("https://huggingface.co"):
        hub.HF_HUB_OFFLINE = True  # read at every request by huggingface_hub, transformers and diffusers
    try:
        return load()
    except Exception:  # noqa: BLE001 (not in the cache, or the network failed)
        need_download(name, "https://huggingface.co", flag, offline=hub.HF_HUB_OFFLINE, fix=fix)
        raise


VAE_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(name, device):
    """SD-VAE by short name (ema, mse), hub id or local path; None for --vae none (pixel space)."""
    if name == "none":
        return None
    from diffusers.models import AutoencoderKL
    repo = VAE_IDS.get(name, name)
    try:
        vae = from_hub(lambda: AutoencoderKL.from_pretrained(repo), repo, "--vae")
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 (hub, path and format errors all mean the same to a user)
        die(f"--vae {name}: cannot load an AutoencoderKL ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "give ema, mse, a diffusers hub id, a local directory, or none")
    return vae.to(device).eval().requires_grad_(False)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# torch.hub's names (dinov2_vitb14, dinov2_vitb14_reg) and REPA's --enc-type (dinov2-vit-b, dinov2reg-vit-b)
DINOV2 = re.compile(r"dinov2_vit([sblg])14(_reg)?$|dinov2(reg)?-vit-([sblg])$")
DINOV2_WIDTHS = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
DINOV2_SIZES = {name[0]: name for name in DINOV2_WIDTHS.values()}                  # s, b, l, g


def vit_from_file(path, pick, flag="--vis-encoder"):
    """A DINOv2 .pth state dict (official or timm layout) in timm's architecture, at pick(patch) px."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    sd = read_checkpoint(path, flag)
    if not isinstance(sd, dict) or "patch_embed.proj.weight" not in sd:
        die(f"{flag} {path} holds no ViT state dict (no patch_embed.proj.weight); give a DINOv2 checkpoint "
            "(the official .pth or a timm vit_*_dinov2 state dict)")
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    if width not in DINOV2_WIDTHS:
        die(f"{flag} {path}: width {width} is none of DINOv2's {sorted(DINOV2_WIDTHS)}")
    reg = "register_tokens" in sd or "reg_token" in sd
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    arch = f"vit_{DINOV2_WIDTHS[width]}_patch14{'_reg4' if reg else ''}_dinov2"
    res = pick(patch)
    model = timm.create_model(arch, pretrained=False, img_size=res, patch_size=patch, depth=depth, num_classes=0)
    try:  # the filter converts the official layout and resamples the position embedding to res
        model.load_state_dict(checkpoint_filter_fn({k: v for k, v in sd.items() if not k.startswith("head.")}, model))
    except RuntimeError as e:
        die(f"{flag} {path} does not fit timm's {arch} of depth {depth} ({str(e).splitlines()[1].strip()})")
    return model, (lambda x: model.forward_features(x)[:, model.num_prefix_tokens:]), res


def load_vis_encoder(name, image_size, resolution, flag="--vis-encoder", fix=None):
    """(model, fn, res) of a DINOv2 or timm ViT (a file or a name; `flag` names it in errors) at its resolution:
    `resolution`, else 224 * image_size / 256 rounded to a multiple of the patch size. fn gives the patch tokens.
    `fix`: what the user can pass instead when a name cannot be downloaded."""
    def pick(patch):
        res = resolution or patch * max(1, round(224 * image_size / 256 / patch))
        if res % patch:
            die(f"--vis-resolution {res} is not a multiple of the encoder's patch size {patch}")
        return res

    given, m = name, DINOV2.match(name)
    if m and not os.path.exists(name):  # the same weights, as timm publishes them on the Hugging Face hub
        name = f"vit_{DINOV2_SIZES[m[1] or m[4]]}_patch14{'_reg4' if m[2] or m[3] else ''}_dinov2.lvd142m"
    shown = given if given == name else f"{given} (timm's {name})"  # errors name what the user passed
    if os.path.isfile(name):
        return vit_from_file(name, pick, flag)
    import timm
    try:  # any input size: the position embedding is resampled (bicubic, antialiased, as REPA) to the grid
        model = from_hub(lambda: timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True),
                         shown, flag, fix)
    except Exception as e:  # noqa: BLE001
        die(f"{flag} {shown}: not a file, a DINOv2 hub name (dinov2_vitb14) or a timm ViT with pretrained "
            f"weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})" + (f"; {fix}" if fix else ""))
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        die(f"{flag} {name} is not a timm ViT with patch tokens")
    res = pick(model.patch_embed.patch_size[0])
    return model, (lambda x: model.forward_features(x)[:, model.num_prefix_tokens:]), res


# ----------------------------------------------------------------------------- checkpoints

def read_checkpoint(path, flag="--ckpt"):
    if not os.path.isfile(path):
        die(f"{flag} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (truncated zip, pickle errors, not a checkpoint at all)
        die(f"{flag} {path} is damaged or not a PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): copy it again, or pass another checkpoint")


def checkpoints(results_dir):
    """The checkpoints of a train.py run, oldest first (names are zero-padded step numbers)."""
    d = os.path.join(results_dir, "checkpoints")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".pt")) if os.path.isdir(d) else []


def newest_checkpoint(results_dir, warn=print):
    """(path, checkpoint) of the newest readable checkpoint of a run, or (None, None). A damaged newer
    file (a disk filled while copying, a partial rsync) is named in a warning and left in place."""
    for path in reversed(checkpoints(results_dir)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            warn(f"warning: {path} is damaged ({type(e).__name__}); using the newest readable checkpoint "
                 "before it (the damaged file is kept)")
    return None, None


def ema_decay_at(step, decay, warmup=False):
    """The EMA decay of training step `step` (0 = the first): `decay`, or with warm-up
    min(decay, (1 + step) / (10 + step)), the usual warm-up (TensorFlow's num_updates, timm's ModelEmaV2)."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def ema_init_weight(steps, decay, warmup=False):
    """
    The weight the EMA still gives the initial weights after `steps` steps, the product of the
    steps' decays (ema = d ema + (1 - d) weights, starting from the initial weights): decay ** steps,
    or with warm-up 1 / C(m + 9, 9) * decay ** (steps - m), m = the steps whose warm-up value
    (1 + s) / (10 + s) is below decay, whose product telescopes to m! 9! / (m + 9)!.
    """
    if not warmup:
        return decay ** steps
    m = steps if decay >= 1 else min(steps, max(0, math.ceil((10 * decay - 1) / (1 - decay))))
    return math.exp(math.lgamma(m + 1) + math.lgamma(10) - math.lgamma(m + 10)) * decay ** (steps - m)


def ema_of_checkpoint(ckpt):
    """The EMA of a train.py checkpoint: {"init_weight", "decay", "warmup", "step"}, init_weight the
    weight it still gives the initial weights, stored by train.py or, for older files, computed from
    the step and --ema-decay (None where the file does not say)."""
    args, step = ckpt.get("args") or {}, ckpt.get("step")
    decay, warmup = args.get("ema_decay"), args.get("ema_warmup", False)
    w = ckpt.get("ema_init_weight")
    if w is None and decay is not None and step is not None:
        w = ema_init_weight(step, decay, warmup)
    return dict(init_weight=w, decay=decay, warmup=warmup, step=step)


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


def time_convention(path, args, cfg, override):
    """
    Where an SiT checkpoint puts the data: 'sit' (willisma/SiT: t = 1 is data) or 'repa' (REPA and
    ours: t = 1 is noise), from what the file says: the training arguments stored with it (SiT's
    train.py stores path_type Linear/GVP/VP, REPA's linear/cosine and its encoder settings), else
    the network (projectors are REPA's; a bare state dict with learned sigma is the public SiT
    release). `override` ('sit' or 'repa') decides where the file says nothing.
    """
    path_type = args.get("path_type")
    if path_type in ("Linear", "GVP", "VP") or (path_type is None and "prediction" in args):
        if path_type not in ("Linear", None) or args.get("prediction", "velocity") != "velocity":
            die(f"--ckpt {path} was trained by SiT with --path-type {path_type} --prediction {args.get('prediction')}; "
                "only the Linear path with velocity prediction is supported")
        found = "sit"
    elif path_type in ("linear", "cosine") or {"enc_type", "proj_coeff", "encoder_depth"} & set(args):
        if path_type == "cosine":
            die(f"--ckpt {path} was trained by REPA with --path-type cosine; only the linear path is supported")
        found = "repa"
    elif not args and cfg.get("z_dims"):
        found = "repa"
    elif not args and cfg["learn_sigma"]:
        found = "sit"
    else:
        found = None
    if override not in (None, "auto"):
        return override
    if found is None:
        die(f"--ckpt {path} does not say in which direction its time runs: pass --time-convention sit (t = 1 is "
            "data, willisma/SiT) or --time-convention repa (t = 1 is noise, REPA)")
    return found


def load_model(ckpt_path, model_name=None, use_ema=True, device="cpu", time_conv="auto"):
    """
    Load our train.py checkpoints (config stored inside) or the public ones: DiT-XL-2-256/512
    (a bare state dict), SiT-XL-2-256 (bare; reverse time), SiT's and REPA's training checkpoints
    ({"model", "ema", "opt", "args", ...}). model_name is needed only for files that do not name
    their network. Returns (model in eval mode, info) with info = {"model": name, "objective":
    "ddpm"|"sit", "reverse_time": bool, "meta": dict|None, "config": kwargs}. The network is not
    wrapped: diffusion.ReverseTime adapts reverse time. info["ema"]: ema_of_checkpoint for our
    checkpoints, else None. REPA projectors are loaded (the file must fit) and then dropped: they
    serve the training loss alone, and sampling or scoring would run them for nothing (with
    alignment they cost about as much as the rest of a tiny network).
    """
    import models
    from diffusion import objective_of
    ckpt = read_checkpoint(ckpt_path)
    if isinstance(ckpt, dict) and "config" in ckpt:             # ours
        name, cfg, meta, reverse = ckpt["config"]["model"], dict(ckpt["config"]["kwargs"]), ckpt.get("meta"), False
        sd = ckpt["ema" if use_ema else "model"]
    else:                                                       # public
        args = ckpt.get("args") if isinstance(ckpt, dict) else None
        sd = ckpt.get("ema", ckpt) if isinstance(ckpt, dict) else ckpt
        if not isinstance(sd, dict) or "x_embedder.proj.weight" not in sd:
            die(f"--ckpt {ckpt_path} holds no DiT/SiT state dict (no x_embedder.proj.weight): pass a DiT, SiT, REPA "
                "or train.py checkpoint")
        args = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
        name = model_name or args.get("model")
        if name is None:
            die(f"--ckpt {ckpt_path} does not say which network it holds: pass --model (e.g. DiT-XL/2)")
        cfg, meta = model_config(sd, args.get("encoder_depth", 8)), None
        reverse = objective_of(name) == "sit" and time_convention(ckpt_path, args, cfg, time_conv) == "sit"
    if name not in models.DiT_models:
        die(f"unknown model {name!r}: choose one of {', '.join(models.DiT_models)}")
    model = models.DiT_models[name](**cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        die(f"--ckpt {ckpt_path} does not fit {name} ({first}); pass the --model it was trained as")
    model.projectors = torch.nn.ModuleList()  # forward then returns the prediction alone
    info = dict(model=name, objective=objective_of(name), reverse_time=reverse, meta=meta, config=cfg,
                ema=ema_of_checkpoint(ckpt) if isinstance(ckpt, dict) and "config" in ckpt else None)
    return model.to(device).eval().requires_grad_(False), info


def add_time_convention_flag(p):
    p.add_argument("--time-convention", choices=["auto", "sit", "repa"], default="auto",
                   help="SiT checkpoints only: auto reads it off the file; sit = t 1 is data (willisma/SiT), "
                        "repa = t 1 is noise (REPA, ours)")
