"""The commands the README and docs/ show are commands that exist: every fenced ``bash`` line is read, its
script or console command found, each ``--flag`` looked up in that command's own ``--help``, and each dotted
config override (``train.total_steps=70``) checked against gad-train's config schema. A renamed flag, script or
config key fails here. (The demo command itself runs in tests/e2e/test_gad_train.py; the suite command is CI.)"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT  # noqa: E402  (the repository root)
CONSOLE = {"gad-train": "gad_megatron.trainer.cli", "gad-convert": "gad_megatron.convert.cli",
           "gad-collect": "gad_megatron.data.collect", "gad-eval": "gad_megatron.eval.run",
           "gad-plan": "gad_megatron.plan.cli", "gad-doctor": "gad_megatron.doctor.cli"}
LAUNCHERS = ("srun", "torchrun", "sbatch")
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def fenced_commands(page: str) -> list:
    """(line number, tokens) of each command in the page's ```bash blocks (comments and continuations joined)."""
    out, inside, pending, start = [], False, "", 0
    for i, line in enumerate(open(os.path.join(ROOT, page)), 1):
        s = line.rstrip("\n")
        if s.strip().startswith("```"):
            inside = s.strip() == "```bash" if not inside else False
            continue
        if not inside:
            continue
        body = s.split(" #")[0].rstrip() if not s.lstrip().startswith("#") else ""
        if not pending:
            start = i
        pending += " " + body.rstrip("\\")
        if body.endswith("\\"):
            continue
        if pending.strip():
            out.append((start, shlex.split(pending)))
        pending = ""
    return out


COMMANDS = [(page, n, toks) for page in PAGES for n, toks in fenced_commands(page)]


def _help(module: str, sub: str = None) -> str:
    args = [sys.executable, "-m", module] + ([sub] if sub else []) + ["--help"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, (args, r.stderr[-2000:])
    return r.stdout


_HELP = {}


def help_of(module: str, sub: str = None) -> str:
    if (module, sub) not in _HELP:
        _HELP[(module, sub)] = _help(module, sub)
    return _HELP[(module, sub)]


def overrides_are_config_keys(tokens: list) -> None:
    from omegaconf import OmegaConf

    from gad_megatron.trainer.config import GADConfig

    dotted = [t for t in tokens if re.fullmatch(r"[a-z_]+\.[a-z_.]+=.*", t)]
    schema = OmegaConf.structured(GADConfig)
    for t in dotted:
        try:
            OmegaConf.merge(schema, OmegaConf.from_dotlist([t]))  # an unknown key or a wrong type raises
        except Exception as e:  # noqa: BLE001 (OmegaConf's errors have no common base worth naming)
            raise AssertionError(f"{t}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def test_the_pages_show_commands():
    pages = {p for p, _, _ in COMMANDS}
    assert "README.md" in pages and len(COMMANDS) >= 20, COMMANDS


@pytest.mark.parametrize("page,line,tokens", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_a_shown_command_exists_with_its_flags_and_keys(page, line, tokens):
    toks = list(tokens)
    if toks[0] in ("export", "cd", "pip", "python3", "docker") or "=" in toks[0]:
        return  # environment and third-party lines
    while toks and toks[0] in LAUNCHERS:  # the launcher's own flags end at the first non-flag
        toks = toks[1:]
        while toks and toks[0].startswith("-"):
            toks = toks[1:]
    if toks[0] == "bash":
        assert os.path.isfile(os.path.join(ROOT, toks[1])), f"{page}:{line}: no script {toks[1]}"
        overrides_are_config_keys(toks[2:])
        return
    if toks[0] == "python" and toks[1].endswith(".py"):
        path = os.path.join(ROOT, toks[1])
        assert os.path.isfile(path), f"{page}:{line}: no script {toks[1]}"
        text = open(path).read()
        for flag in [t.split("=")[0] for t in toks[2:] if t.startswith("--")]:
            assert flag in text, f"{page}:{line}: {toks[1]} has no {flag}"
        return
    if toks[0] == "-m":  # torchrun ... -m module
        toks = toks[1:]
        module = toks[0]
        tool = next((k for k, v in CONSOLE.items() if v == module), None)
        assert tool, f"{page}:{line}: unknown module {module}"
    else:
        tool = toks[0]
        assert tool in CONSOLE, f"{page}:{line}: unknown command {tool}"
    sub = toks[1] if len(toks) > 1 and re.fullmatch(r"[a-z][a-z0-9-]+", toks[1]) and tool != "gad-train" else None
    text = help_of(CONSOLE[tool], sub)
    for flag in [t.split("=")[0] for t in toks[1:] if t.startswith("--")]:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), f"{page}:{line}: {tool} {sub or ''} has no {flag}"
    overrides_are_config_keys(toks[1:])
