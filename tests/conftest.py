import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from hf_fixtures import ARCHS, make_hf_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(nproc: int, worker: str, *args, timeout: int = 300) -> str:
    """Runs tests/workers/<worker> on ``nproc`` gloo ranks under torchrun, in its own process session with a
    hard timeout: when one rank fails the others block in gloo, so on timeout the whole group is killed.
    The rendezvous port is picked free, but another process can take it before torchrun binds it: only that
    failure (EADDRINUSE) is retried, once, on a new port."""
    for attempt in range(2):
        out, rc = _launch(nproc, worker, args, timeout)
        if rc == 0:
            return out
        if attempt == 0 and ("EADDRINUSE" in out or "Address already in use" in out):
            continue
        raise AssertionError(f"{worker} x{nproc} failed ({rc}):\n{out[-8000:]}")


def _launch(nproc: int, worker: str, args: tuple, timeout: int):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", os.path.join(HERE, "workers", worker), *map(str, args),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{worker} x{nproc} timed out after {timeout}s:\n{out[-6000:]}")
    return out, proc.returncode


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{arch name: HF dir} of tiny random causal LMs of every supported architecture."""
    base = tmp_path_factory.mktemp("hf")
    return {name: make_hf_model(name, str(base / name), seed=i) for i, name in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory):
    """Every arch converted HF -> megatron at TP2PP2 (student), a bf16 model, and a discriminator from
    qwen2_untied. The bf16 model is not in ``hf_models`` (its logits are not fp32-comparable)."""
    import torch

    base = tmp_path_factory.mktemp("mcore")
    extra = {"qwen2_bf16": make_hf_model("qwen2_untied", str(base / "hf_qwen2_bf16"), seed=9, dtype=torch.bfloat16)}
    run_ranks(4, "convert_worker.py", str(base), json.dumps({**hf_models, **extra}), timeout=600)
    return {name: str(base / name) for name in [*hf_models, *extra]} | {"disc": str(base / "disc")} | {
        "hf_qwen2_bf16": extra["qwen2_bf16"]} | {f"eager_{n}": str(base / f"eager_{n}") for n in (
            "qwen3_student", "qwen2_bf16_student", "qwen2_untied_discriminator")}


KEY = "sk-test-DO-NOT-LEAK-8c1f2e"


class Server:
    def __init__(self, *args):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "gad_megatron.testing.fake_openai", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("fake OpenAI server did not start")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return json.load(r)

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def server_factory():
    servers = []

    def make(*args):
        s = Server(*args)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()
