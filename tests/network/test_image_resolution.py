"""#22 item 2: the GPU image's install line resolves for linux x86_64 / CPython 3.12 with pip's own resolver (binary
wheels; needs the package index), torch is vLLM's exact pin, and the old NGC-constraint line does not resolve."""

import os
import re
import sys
import zipfile

import pytest
from conftest import ROOT
from packaging.requirements import Requirement

sys.path.insert(0, os.path.join(ROOT, "tools"))
import resolve_image  # noqa: E402

DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def _names(path) -> list:
    return [line.split("#")[0].strip() for line in open(path) if line.split("#")[0].strip()]


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_source_built_pieces_are_built_against_the_installed_torch_and_nowhere_else():
    text = open(DOCKERFILE).read().replace("\\\n", " ")
    runs = re.findall(r"^RUN (.*)$", text, re.M)
    binary = [r for r in runs if "-r docker/requirements.txt" in r]
    assert len(binary) == 1 and "-c docker/constraints.txt" in binary[0]  # the line the resolver test runs
    wheels = {_norm(Requirement(x).name) for x in _names(os.path.join(ROOT, "docker", "requirements.txt"))}
    for piece in _names(os.path.join(ROOT, "docker", "source-built.txt")):
        assert _norm(piece) not in wheels, piece
        lines = [r for r in runs if re.search(rf"(\b|@ ){re.escape(piece)}\b", r) and "pip install" in r]
        assert lines and all("--no-build-isolation" in r for r in lines), (piece, lines)
        assert runs.index(lines[0]) > runs.index(binary[0])  # after the torch it builds against


@pytest.fixture(scope="module")
def image_resolution():
    reqs, cons = resolve_image.image_line()
    rc, report, out = resolve_image.resolve(reqs, cons)
    assert rc == 0, out[-4000:]
    return report


def test_image_line_resolves_with_torch_at_vllms_pin(image_resolution):
    got = resolve_image.picked(image_resolution)
    meta = {_norm(i["metadata"]["name"]): i["metadata"] for i in image_resolution["install"]}
    vllm_torch = [Requirement(r) for r in meta["vllm"]["requires_dist"] if Requirement(r).name == "torch"]
    assert len(vllm_torch) == 1 and str(vllm_torch[0].specifier) == f"=={got['torch']}", vllm_torch
    from test_packaging import constraints

    pins = constraints()
    for name in ("torch", "vllm", "megatron-core", "transformer-engine", "transformer-engine-cu13"):
        assert got[name] == pins[name], (name, got[name], pins[name])
    # Transformer Engine inside megatron-core's own declared range (its dev extra)
    te_range = [Requirement(r) for r in meta["megatron-core"]["requires_dist"]
                if Requirement(r).name == "transformer-engine"]
    assert te_range and all(r.specifier.contains(got["transformer-engine"], prereleases=True) for r in te_range)
    assert len(got) > 100  # the whole stack, not a no-op


def _stand_in_torch(folder) -> None:
    """A wheel that claims to be the NGC image's torch (name and version only): what `pip` sees inside NGC."""
    version = "2.13.0a0+9186a08b2c.nv26.7"
    name = f"torch-{version}-cp312-cp312-linux_x86_64.whl"
    dist = f"torch-{version}.dist-info"
    with zipfile.ZipFile(os.path.join(folder, name), "w") as z:
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: cp312-cp312-linux_x86_64\n")
        z.writestr(f"{dist}/RECORD", "")
    return version


def test_the_old_ngc_constraint_line_is_unresolvable(tmp_path):
    """Negative control: the old Dockerfile constrained pip to NGC's torch; vLLM's exact pin cannot be met.
    (Its transformer-engine[pytorch] is left out: that is an sdist, outside a binary-only resolution.)"""
    version = _stand_in_torch(tmp_path)
    cons = tmp_path / "constraints.txt"
    cons.write_text(f"torch=={version}\n")
    rc, report, out = resolve_image.resolve(["megatron-core==0.16.1", "psutil", "vllm==0.32.0"], [str(cons)],
                                            find_links=[str(tmp_path)])
    assert rc != 0 and report is None
    assert "ResolutionImpossible" in out or "conflict" in out, out[-3000:]
    assert "torch==2.13.0" in out and version in out, out[-3000:]
