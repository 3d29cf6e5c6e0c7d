"""How the tests start a stage script: plain python for one process, torchrun (gloo) for more."""
import socket
import sys


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
