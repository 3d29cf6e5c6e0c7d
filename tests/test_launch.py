"""
The tests' forked launcher (launch.run) must look to a script like `python script`: the same
sys.path, working directory, environment, __name__, exit status and output, the last line of an
error included. Each case runs the same probe script both ways and compares.
"""
import json
import os
import subprocess
import sys

import launch

PROBE = r'''
import ctypes, json, os, sys
print(json.dumps({"path": sys.path, "cwd": os.getcwd(), "env": os.environ.get("PROBE_VAR"), "name": __name__,
                  "prog": os.path.basename(sys.argv[0]), "args": sys.argv[1:], "file": __file__,
                  "torch_threads": __import__("torch").get_num_threads()}))
sys.stdout.flush()
ctypes.CDLL(None).write(2, b"c-level\n", 8)
what = sys.argv[1]
if what == "raise":
    raise ValueError("uncaught")
if what == "exit-message":
    sys.exit("error: --flag is wrong; pass --flag FIX")
if what == "exit-code":
    sys.exit(3)
if what == "import-sibling":
    import sibling
    print(sibling.VALUE)
'''


def both(tmp_path, what, env_extra=None):
    folder = tmp_path / "scripts"
    folder.mkdir(exist_ok=True)
    (folder / "probe.py").write_text(PROBE)
    (folder / "sibling.py").write_text("VALUE = 'found beside the script'\n")
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "PROBE_VAR": "seen", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    script = str(folder / "probe.py")
    real = subprocess.run([sys.executable, script, what, "x y"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    forked = launch.run(script, [what, "x y"], work, env, timeout=120)
    return real, forked


def test_a_forked_run_sees_the_path_cwd_environment_and_name_a_fresh_interpreter_sees(tmp_path):
    real, forked = both(tmp_path, "ok", {"PYTHONPATH": str(tmp_path / "extra")})
    assert real.returncode == forked.returncode == 0, real.stderr + forked.stderr
    a, b = json.loads(real.stdout), json.loads(forked.stdout)
    assert a == b
    assert b["path"][:2] == [str(tmp_path / "scripts"), str(tmp_path / "extra")] and b["name"] == "__main__"
    assert real.stderr == forked.stderr == "c-level\n"


def test_a_forked_run_imports_modules_beside_the_script_not_the_tests(tmp_path):
    real, forked = both(tmp_path, "import-sibling")
    assert real.returncode == forked.returncode == 0
    assert real.stdout.splitlines()[-1] == forked.stdout.splitlines()[-1] == "found beside the script"
    assert not any(p.rstrip(os.sep).endswith("tests") for p in json.loads(forked.stdout.splitlines()[0])["path"])


def test_a_forked_run_exits_and_reports_errors_as_the_interpreter_does(tmp_path):
    for what, code in (("raise", 1), ("exit-message", 1), ("exit-code", 3)):
        real, forked = both(tmp_path, what)
        assert real.returncode == forked.returncode == code, (what, forked.stderr)
        last = [r.stderr.strip().splitlines()[-1] for r in (real, forked)]
        assert last[0] == last[1], what
        assert ("Traceback" in real.stderr) == ("Traceback" in forked.stderr) == (what == "raise")


def test_merged_output_keeps_stdout_and_stderr_in_one_stream(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "p.py").write_text("import sys\nprint('out', flush=True)\nprint('err', file=sys.stderr, flush=True)\n"
                                 "print('out again', flush=True)\n")
    r = launch.run(str(folder / "p.py"), [], tmp_path, merge=True)
    assert r.returncode == 0 and r.stdout == "out\nerr\nout again\n" and r.stderr is None
