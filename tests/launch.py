"""
How the tests start a stage script: torchrun (gloo) for several processes; for one, either a fresh
interpreter (script_cmd) or `run`, a child forked from a server that imported torch, numpy, PIL,
torchvision and scipy once, which then runs the script as __main__ with its own argv, environment
and working directory. A fresh interpreter spends ~3 s of each short run importing those; `run`
serves the runs that only look at what a script writes and says. Runs that need a real process
keep script_cmd: a signal sent from outside, a thread count other than one (the server's OpenMP,
numpy's and scipy's BLAS were loaded with one thread, and the child keeps them), an exit the
interpreter makes after the script (atexit handlers do not run in a forked child).
"""
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from unittest import mock

PRELOAD = ["torch", "numpy", "PIL.Image", "torchvision", "scipy.linalg"]

# what `python script argv` does, in the forked child: output to files at the file descriptors
# (C-level writes land there too); sys.path is the script's folder, the run's PYTHONPATH and the
# interpreter's own (not the tests' path, which the child inherits), as for `python script`. A
# stdlib target (exec), so the child imports nothing of the tests. An uncaught exception prints its
# traceback and a SystemExit its message, each exiting 1, as the interpreter does (multiprocessing's
# bootstrap).
AS_MAIN = """
import os, runpy, sys
os.environ.clear()
os.environ.update(env)
os.chdir(cwd)
for fd, path in ((1, stdout), (2, stderr)):
    f = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(f, fd)
    os.close(f)
sys.argv = [script, *argv]
path = os.path.abspath(script)
sys.path[:] = [os.path.dirname(path), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep)), *syspath]
runpy.run_path(path, run_name="__main__")
"""

_lock, _started = threading.Lock(), []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_cmd(script, nproc=1):
    """The command line that runs `script` as a user would, on nproc local processes."""
    if nproc == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", script]


def server():
    """(the forkserver context, a fresh interpreter's sys.path after its first entry); the server is
    started once per test process, with OMP_NUM_THREADS=1 (OpenMP and BLAS read it when it loads them)."""
    ctx = multiprocessing.get_context("forkserver")
    with _lock:
        if not _started:
            multiprocessing.set_forkserver_preload(PRELOAD)
            with mock.patch.dict(os.environ, OMP_NUM_THREADS="1"):
                p = ctx.Process(target=len, args=((),))
                p.start()
                p.join()
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # each run's own goes first
            r = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"], env=env,
                               capture_output=True, text=True, check=True)
            _started.append(json.loads(r.stdout))   # a fresh interpreter's path after the script's folder
    return ctx, _started[0]


def start(script, argv, cwd, env=None, merge=False):
    """Start `python script argv` in cwd as a forked child; returns finish(timeout), which waits and
    gives a subprocess.CompletedProcess (text; stderr into stdout when merge, stderr then None)."""
    d = tempfile.mkdtemp(prefix="launch-")
    out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
    for f in (out, err):
        open(f, "w").close()
    argv = [str(a) for a in argv]
    ctx, syspath = server()
    p = ctx.Process(target=exec, args=(AS_MAIN, dict(
        env=dict(os.environ if env is None else env), cwd=str(cwd), stdout=out, stderr=out if merge else err,
        script=script, argv=argv, syspath=syspath)))
    p.start()

    def finish(timeout=300):
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired([script, *argv], timeout)
        texts = []
        for f in (out, err):
            with open(f) as fh:
                texts.append(fh.read())
        shutil.rmtree(d, ignore_errors=True)
        return subprocess.CompletedProcess([script, *argv], p.exitcode, texts[0], None if merge else texts[1])
    return finish


def run(script, argv, cwd, env=None, merge=False, timeout=300):
    """`python script argv` in cwd, forked from the preloaded server: a subprocess.CompletedProcess
    as subprocess.run(..., capture_output=True, text=True) gives (stderr into stdout when merge)."""
    return start(script, argv, cwd, env, merge)(timeout)
