"""
The GPU check of this repository in one command: the CUDA test tier (tests/test_cuda.py, what
`python -m pytest -m cuda` runs), then the README's three headline benchmarks at reduced length,
printed as one Markdown table on stdout. Run it through tools/gpu_check.sh, which keeps every file
made on the way (test data, compiler caches, logs, JSON) in one temporary directory and removes it
at the end.

    bash tools/gpu_check.sh                # one H100/H200: under 9 minutes (--budget)
    bash tools/gpu_check.sh --device cpu   # dry run on CPU, CUDA hidden: smallest model, tiny sizes

Benchmarks (bench.py, one process each, --json into the temporary directory):
  training  SiT-XL/2 at 256 px with the REPA projector, bf16, compiled: images/s, TFLOP/s, MFU and
            peak memory at the largest batch of BATCHES that bench.py's eager memory model fits into
            90% of the GPU (the compiled step saves fewer activations than eager, so it fits too;
            after an out-of-memory the next smaller batch is tried)
  sampling  the 250-step SDE with guidance 1.8 for t <= 0.7 (REPA's setting): images/s from the
            median times of one compiled evaluation of B and of 2B rows, times the evaluations of
            each kind in one run (78 and 172, counted by bench.sampler_evaluations)
  scoring   score.py's forward, 20 forwards per image (10 timesteps, antithetic), compiled
Every step runs under the deadline of --budget seconds; a benchmark the deadline leaves no time
for is listed as not run. Exit status 0 when no test failed and every benchmark ran, else 1.
"""
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# per device: what runs, and how long it may take
SETTINGS = {
    "cuda": dict(precision="bf16", model="SiT-XL/2", image_size=256, batches=(256, 192, 128, 96, 64, 32), sample_batch=256,
                 score_batch=64, modes="compile", warmup=2, iters=5, budget=540, tier_timeout=480, min_bench_s=60),
    "cpu": dict(precision="fp32", model="SiT-T/4", image_size=64, batches=(8, 4, 2), sample_batch=2, score_batch=2,
                modes="eager", warmup=1, iters=2, budget=300, tier_timeout=120, min_bench_s=10),
}
SAMPLING = dict(steps=250, cfg_scale=1.8, low=0.0, high=0.7)  # REPA's SiT-XL/2 setting, 422 rows per image
SCORE_TIMESTEPS = 20  # score.py's default: 10 timesteps x 2 antithetic noises
MEMORY_FRACTION = 0.9  # of the device's memory, for the batch choice: the allocator and CUDA context need the rest
FAILURES = ("FAILED", "ERROR", "NOT RUN", "OUT OF MEMORY")  # results that make the exit status 1


class Check:
    """The run's deadline, where its files go, and the rows of the final table."""

    def __init__(self, args):
        self.args, self.s = args, SETTINGS[args.device]
        self.start = time.time()
        self.deadline = self.start + (args.budget or self.s["budget"])
        self.env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
        self.rows, self.failed, self.device = [], False, None

    def left(self):
        return self.deadline - time.time()

    def run(self, cmd, name, timeout):
        """Run cmd in the repository root (its own process group, output into TMP/name.log) for at
        most `timeout` seconds: (exit status, or None when it ran out of time; seconds; log text)."""
        log, t0 = os.path.join(self.args.tmp, f"{name}.log"), time.time()
        print(f"[gpu_check] {name}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
        with open(log, "w") as f:
            p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                stop(p)
                rc = None
            except KeyboardInterrupt:
                stop(p)
                raise
        text = open(log).read()
        if rc != 0:
            print(f"[gpu_check] {name} {'ran out of time' if rc is None else f'exited with {rc}'}; its log ends:\n"
                  + text[-3000:], file=sys.stderr, flush=True)
        return rc, time.time() - t0, text

    def add(self, check, result, value="", detail=""):
        self.rows.append((check, result, value, detail))
        self.failed |= result in FAILURES


def stop(p):
    """End a child's process group: SIGTERM (torchrun passes it on), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
            p.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


# ----------------------------------------------------------------------------- the test tier

def tier(c):
    """tests/test_cuda.py under pytest, one table row per test from its JUnit report."""
    xml = os.path.join(c.args.tmp, "tier.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-n", "0", "-q", "-rs", "-p", "no:cacheprovider",
           "--basetemp", os.path.join(c.args.tmp, "pytest"), "--junitxml", xml, "-o", "junit_family=xunit1",
           "tests/test_cuda.py"]
    timeout = min(c.s["tier_timeout"], c.left())
    rc, seconds, text = c.run(cmd, "tier", timeout)
    if not os.path.exists(xml):
        c.add("tests/test_cuda.py", "NOT RUN" if rc is None else "ERROR", f"{seconds:.0f} s",
              f"ran out of its {timeout:.0f} s" if rc is None else last_line(text))
        return
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name").removeprefix("test_").replace("_", " ")
        props = "; ".join(f"{p.get('name')}: {p.get('value')}" for p in case.iter("property"))
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            result, detail = ("FAILED" if bad.tag == "failure" else "ERROR"), (bad.get("message") or "").splitlines()
            detail = detail[0][:200] if detail else ""
        elif skipped is not None:
            result, detail = "skipped", (skipped.get("message") or "").removeprefix("Skipped: ")
        else:
            result, detail = "passed", props
        c.add(f"test: {name}", result, f"{float(case.get('time', 0)):.0f} s", detail)
    if rc is None:
        c.add("tests/test_cuda.py", "NOT RUN", f"{seconds:.0f} s", f"stopped after its {timeout:.0f} s")


# ----------------------------------------------------------------------------- the benchmarks

def bench_run(c, name, flags):
    """One bench.py process: its JSON (None if it failed or ran out of time), or a NOT RUN row."""
    if c.left() < c.s["min_bench_s"]:
        c.add(f"bench: {name}", "NOT RUN", "", f"the {c.args.budget or c.s['budget']} s budget was spent")
        return None
    out = os.path.join(c.args.tmp, f"{name.split()[0]}.json")
    cmd = [sys.executable, "bench.py", "--model", c.s["model"], "--image-size", c.s["image_size"], "--precision", c.s["precision"],
           *flags, "--json", out]
    rc, seconds, text = c.run(cmd, name.split()[0], c.left())
    if rc != 0 or not os.path.exists(out):
        c.add(f"bench: {name}", "NOT RUN" if rc is None else "FAILED", f"{seconds:.0f} s",
              "ran out of the budget" if rc is None else last_line(text))
        return None
    report = json.load(open(out))
    c.device = c.device or report["device"]
    report["seconds"] = seconds
    return report


def choose_batch(memory_row, device_gib, batches):
    """The largest batch whose need by the memory model (states + fixed + batch x activations per
    image) fits into MEMORY_FRACTION of the device; the smallest candidate if none does."""
    fits = [B for B in batches if memory_row["states_gib"] + memory_row["fixed_gib"]
            + B * memory_row["activations_mib_per_image"] / 1024 <= MEMORY_FRACTION * device_gib]
    return max(fits) if fits else min(batches)


def rate_detail(tflops, mfu, peak):
    if tflops is None:
        return ""
    return f"{tflops:.3g} TFLOP/s" + (f", MFU {mfu:.1%} of {peak:g}" if mfu is not None else "")


def peak(c, row):
    """bench.py's memory column: the GPU's peak allocation, or on CPU the process's max RSS."""
    what = "peak memory" if c.args.device == "cuda" else "max RSS"
    return f"{what} {row['peak_mem_gib']:.1f} GiB"


def training(c):
    mem = bench_run(c, "memory model (eager)", ["--proj", "--only", "memory", "--modes", "eager", "--batch-size", 1])
    if mem is None:
        return
    row = mem["rows"][0]
    batch = choose_batch(row, mem["device_memory_gib"], c.s["batches"])
    for B in [b for b in c.s["batches"] if b <= batch]:
        need = row["states_gib"] + row["fixed_gib"] + B * row["activations_mib_per_image"] / 1024
        name = f"training {c.s['model']} {c.s['image_size']}px + REPA, {c.s['precision']}, {c.s['modes']}, batch {B}"
        r = bench_run(c, name, ["--proj", "--only", "train", "--modes", c.s["modes"], "--batch-size", B,
                                "--warmup", c.s["warmup"], "--iters", c.s["iters"]])
        if r is None:
            return
        t = r["rows"][0]
        if t["images_per_s"] is None:  # bench.py's out-of-memory row: try the next smaller batch
            c.add(f"bench: {name}", "out of memory", "", f"memory model: at least {need:.1f} GiB; next batch")
            continue
        c.add(f"bench: {name}", "ok", f"{t['images_per_s']:.1f} images/s",
              f"{rate_detail(t['tflops'], t['mfu'], r['peak_tflops'])}; {peak(c, t)} "
              f"(eager memory model: at least {need:.1f} GiB of {r['device_memory_gib']:.0f} GiB); "
              f"{t['syncs'] if t['syncs'] is not None else '-'} host syncs per step; {r['seconds']:.0f} s")
        return
    c.add(f"bench: training {c.s['model']}", "OUT OF MEMORY", "", f"at every batch of {c.s['batches']}")


def sampling(c):
    import bench
    from diffusion import objective_of
    B, k = c.s["sample_batch"], SAMPLING
    single, guided = bench.sampler_evaluations(objective_of(c.s["model"]), k["steps"], k["cfg_scale"], k["low"], k["high"])
    name = (f"sampling {c.s['model']}, {k['steps']}-step SDE, guidance {k['cfg_scale']} for t <= {k['high']}, "
            f"{c.s['precision']}, {c.s['modes']}, batch {B}")
    r = bench_run(c, name, ["--only", "sample", "--modes", c.s["modes"], "--batch-size", B, "--cfg-scale", k["cfg_scale"],
                            "--warmup", c.s["warmup"], "--iters", c.s["iters"]])
    if r is None:
        return
    rows = r["rows"]  # B rows, then the guided 2B rows; one out-of-memory row instead of either
    if len(rows) < 2 or rows[0]["ms"] is None or rows[1]["ms"] is None:
        c.add(f"bench: {name}", "OUT OF MEMORY", "", rows[-1]["what"])
        return
    one, two = rows
    seconds = (single * one["ms"] + guided * two["ms"]) / 1e3
    ips = B / seconds
    flops = one["flops_per_image"] * (single + 2 * guided)
    tflops = flops * ips / 1e12
    mfu = tflops / r["peak_tflops"] if r["peak_tflops"] else None
    c.add(f"bench: {name}", "ok", f"{ips:.2f} images/s",
          f"{single} x {one['ms']:.1f} ms (B rows) + {guided} x {two['ms']:.1f} ms (2B rows) per batch, "
          f"{single + 2 * guided} rows per image; {rate_detail(tflops, mfu, r['peak_tflops'])}; "
          f"{peak(c, two)}; {r['seconds']:.0f} s")


def scoring(c):
    B = c.s["score_batch"]
    name = f"scoring {c.s['model']}, {SCORE_TIMESTEPS} forwards per image, {c.s['precision']}, {c.s['modes']}, batch {B}"
    r = bench_run(c, name, ["--only", "score", "--modes", c.s["modes"], "--batch-size", B, "--score-timesteps",
                            SCORE_TIMESTEPS, "--warmup", c.s["warmup"], "--iters", c.s["iters"]])
    if r is None:
        return
    s = r["rows"][0]
    if s["images_per_s"] is None:
        c.add(f"bench: {name}", "OUT OF MEMORY", "", s["what"])
        return
    c.add(f"bench: {name}", "ok", f"{s['images_per_s']:.1f} images/s",
          f"{rate_detail(s['tflops'], s['mfu'], r['peak_tflops'])}; {peak(c, s)}; "
          f"{r['seconds']:.0f} s")


# ----------------------------------------------------------------------------- the table

def table(c):
    """The report: a title line, then | check | result | value | details |."""
    import torch
    counts = {k: sum(r[1] == k for r in c.rows) for k in ("passed", "skipped", "FAILED", "ERROR")}
    minutes, seconds = divmod(int(time.time() - c.start), 60)
    where = (f"dry run on CPU, CUDA hidden ({c.s['model']}, tiny sizes): the script's structure, skips and table; "
             "no GPU figure" if c.args.device == "cpu" else f"on {c.device or 'the GPU'}, torch {torch.__version__}")
    lines = [f"GPU check {where}: tests {counts['passed']} passed, {counts['skipped']} skipped, "
             f"{counts['FAILED'] + counts['ERROR']} failed; {minutes} min {seconds} s",
             "", "| check | result | value | details |", "|---|---|---:|---|"]
    for row in c.rows:
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in row) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    from common import parser
    p = parser(__doc__)
    p.add_argument("--device", choices=sorted(SETTINGS), default="cuda",
                   help="cuda: the real check; cpu: the dry run (CUDA hidden from every step)")
    p.add_argument("--tmp", required=True, help="the temporary directory for every file made (gpu_check.sh makes it)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check; None: 540 on cuda (9 minutes), 300 on cpu")
    p.add_argument("--skip-tier", action="store_true", help="only the benchmarks")
    p.add_argument("--skip-bench", action="store_true", help="only the test tier")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device (torch.cuda.is_available() is False): run on a GPU machine, or "
                             "pass --device cpu for the dry run")
    c = Check(args)
    if not args.skip_tier:
        tier(c)
    if not args.skip_bench:
        training(c)
        sampling(c)
        scoring(c)
    print(table(c), flush=True)
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
