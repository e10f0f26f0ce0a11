"""pip's resolver on the GPU image's binary install line, for the image's platform, without building the image.

The Dockerfile's first install is `pip install -c docker/constraints.txt -r docker/requirements.txt` on
CPython 3.12 / glibc 2.39 (Ubuntu 24.04) / x86_64. This runs the same resolution here (`--dry-run --report`,
binary wheels only, `--target` so that nothing of this machine's own environment counts) and prints the versions
it picked. The pieces the image compiles (docker/source-built.txt) are not in it.

    python tools/resolve_image.py                      # exit 0: resolvable; the report in /tmp
    python tools/resolve_image.py --report r.json -- extra pip args
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "docker")
PYTHON_VERSION = "3.12"
GLIBC_MINOR = 39  # Ubuntu 24.04


def platform_args(glibc_minor: int = GLIBC_MINOR) -> list:
    """Every manylinux tag a glibc 2.<minor> x86_64 system accepts: with an explicit --platform pip accepts
    exactly the tags it is given, so a wheel tagged manylinux_2_17 needs that tag named too."""
    tags = [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    out = []
    for t in tags:
        out += ["--platform", t]
    return out


def resolve(requirements: list, constraints: list = (), find_links: list = (), report: str = None,
            timeout: int = 1500) -> tuple:
    """(returncode, report dict or None, pip's output). requirements: pip arguments (specs or `-r FILE`)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = report or os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--report", report,
               "--target", os.path.join(tmp, "target"), "--only-binary=:all:", "--python-version", PYTHON_VERSION,
               "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
               "--disable-pip-version-check", *platform_args()]
        for c in constraints:
            cmd += ["-c", c]
        for f in find_links:
            cmd += ["--find-links", f]
        p = subprocess.run(cmd + list(requirements), capture_output=True, text=True, timeout=timeout)
        data = json.load(open(report)) if p.returncode == 0 and os.path.exists(report) else None
    return p.returncode, data, p.stdout + p.stderr


def picked(report: dict) -> dict:
    """{normalised name: version} of what the resolution would install."""
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}


def image_line() -> list:
    return ["-r", os.path.join(DOCKER, "requirements.txt")], [os.path.join(DOCKER, "constraints.txt")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", help="keep pip's JSON report here")
    ap.add_argument("pip_args", nargs="*", help="more pip arguments, after --")
    args = ap.parse_args(argv)
    reqs, cons = image_line()
    rc, report, out = resolve(reqs + args.pip_args, cons, report=args.report)
    if rc != 0:
        print(out[-4000:], file=sys.stderr)
        print("the image's install line does not resolve (above)", file=sys.stderr)
        return 1
    got = picked(report)
    print(f"resolvable: {len(got)} packages for CPython {PYTHON_VERSION} / glibc 2.{GLIBC_MINOR} x86_64")
    for name in ("torch", "vllm", "megatron-core", "transformer-engine", "transformer-engine-cu13"):
        print(f"  {name}=={got.get(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
