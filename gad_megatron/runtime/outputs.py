"""Directory outputs written whole or not at all (``gad-convert`` checkpoints and exports, ``gad-eval``'s
exports), and the guards around them.

- An output is built in ``<out>.tmp-<random>`` beside it, with an ``.owner`` file naming host and pid, and
  renamed into place at the end. A temp directory whose owner is dead (kill -9) is removed by the next run
  writing the same output, and reported; one whose owner is alive (or on another host) is reported, not touched.
- ``--overwrite`` moves the old output aside (``<out>.old-<random>``), renames the new one in, and only then
  deletes the old one: a crash at any moment leaves one of them whole, never neither.
- An output that is (or is inside, or contains) one of the command's inputs is refused.
- Permissions follow the umask like any other file (``mkdtemp`` alone would leave ``drwx------``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile

from gad_megatron.runtime.launch import pid_alive

log = logging.getLogger("gad_megatron.outputs")
OWNER_FILE = ".owner"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str, error=ValueError):
    """A JSON file a user gave us (config, price table, metadata): a syntax error is one line naming the file
    and the line, raised as ``error``."""
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None


def check_not_an_input(out: str, inputs: dict) -> None:
    """Raises ValueError when ``out`` is one of ``inputs`` ({flag: path}), inside one, or contains one."""
    o = os.path.realpath(out)
    for flag, path in inputs.items():
        if not path:
            continue
        p = os.path.realpath(path)
        if o == p or o.startswith(p + os.sep) or p.startswith(o + os.sep):
            raise ValueError(f"output {out} overlaps the input {flag} {path}: writing it would destroy the input")


def _owner_alive(tmp: str) -> bool:
    try:
        host, pid = open(os.path.join(tmp, OWNER_FILE)).read().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False  # no owner file: written by a crashed run before it could say who it was
    if host != socket.gethostname():
        return True  # another node's process: we cannot know, so we leave it

    return pid_alive(pid)


def clean_stale_tmp(out: str) -> list:
    """Removes ``<out>.tmp-*`` / ``<out>.old-*`` left by dead writers; warns about live ones. Returns removed."""
    out = os.path.abspath(out)
    parent, base = os.path.dirname(out), os.path.basename(out)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in sorted(os.listdir(parent)):
        if not (name.startswith(base + ".tmp-") or name.startswith(base + ".old-")):
            continue
        path = os.path.join(parent, name)
        if name.startswith(base + ".old-") and not os.path.exists(out):
            # a crash between the two renames of an overwrite: the old output is all there is; give it back
            os.replace(path, out)
            log.warning("restored %s from %s (an overwrite was interrupted)", out, path)
            continue
        if os.path.isdir(path) and _owner_alive(path):
            log.warning("%s is being written by another live process: left alone", path)
            continue
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    if removed:
        log.warning("removed %d leftover partial output(s) of an interrupted run: %s", len(removed), ", ".join(removed))
    return removed


def make_tmp_dir(out: str) -> str:
    """A fresh ``<out>.tmp-*`` directory beside ``out`` (umask permissions, owner recorded)."""
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    os.chmod(tmp, 0o777 & ~_umask())
    with open(os.path.join(tmp, OWNER_FILE), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return tmp


def publish_dir(tmp: str, out: str, overwrite: bool = False) -> None:
    """Renames the finished ``tmp`` to ``out``; with ``overwrite`` the old ``out`` stays whole until the new
    one is in place."""
    out = os.path.abspath(out)
    os.remove(os.path.join(tmp, OWNER_FILE))
    old = None
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
        old = tempfile.mktemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(os.path.dirname(out))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryBusy(RuntimeError):
    pass


def lock_directory(path: str):
    """An exclusive lock on ``path`` (a run directory) for as long as the returned file stays open: one owner
    per directory, so a second run cannot delete the first's in-progress files as leftovers. The lock dies
    with its process (flock), so a killed run leaves no stale lock."""
    import fcntl

    os.makedirs(path, exist_ok=True)
    f = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DirectoryBusy(f"{path}: in use by a running gad-train ({holder}); two runs in one directory would "
                            f"delete each other's checkpoints") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    # A flock belongs to the open file, which a fork shares: a forked helper (megatron's checkpoint writers) that
    # outlives a killed run would keep the directory locked. Children drop their copy.
    os.register_at_fork(after_in_child=f.close)
    return f
