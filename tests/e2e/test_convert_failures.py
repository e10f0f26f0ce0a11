"""gad-convert as an untrusting user's tool (#9): crafted checkpoints, kills, leftovers, overwrite safety,
a config that lies about the checkpoint, exit codes, one-line errors, permissions. Real processes, real files."""

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT
from hf_fixtures import make_hf_model

from gad_megatron.convert.megatron_ckpt import iter_dir, load_checkpoint, read_iteration
from gad_megatron.runtime import outputs

pytestmark = pytest.mark.multirank  # beyond its folder's markers


def _cli(*args, preexec=None, timeout=300, env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gad_megatron.convert.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, preexec_fn=preexec, start_new_session=True)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("gad-convert: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ckpt(converted, tmp_path):
    """A private copy of a TP2PP2 qwen2 student checkpoint (tests edit it)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(converted["qwen2_tied"], dst)
    return dst


class _Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _plant(ckpt, marker):
    with open(os.path.join(iter_dir(str(ckpt), read_iteration(str(ckpt))), ".metadata"), "wb") as f:
        pickle.dump(_Pwn(str(marker)), f)


def test_crafted_metadata_is_refused_everywhere(ckpt, hf_models, tmp_path):
    """Item 2: a .metadata pickle that would write a file is refused by export, verify and the model loader."""
    marker = tmp_path / "pwned"
    _plant(ckpt, marker)
    r = _cli("mcore-to-hf", "--ckpt", ckpt, "--out", tmp_path / "export")
    _one_line_error(r, ".metadata", "refused to load", "builtins.exec")
    r = _cli("verify", "--hf", hf_models["qwen2_tied"], "--ckpt", ckpt)
    _one_line_error(r, "refused to load")
    with pytest.raises(ValueError, match="refused to load"):
        load_checkpoint([], str(ckpt))  # the path gad-eval's megatron engine and load_model take
    from gad_megatron.trainer.checkpoint import load as load_training_checkpoint

    root = tmp_path / "run_checkpoints"
    shutil.copytree(ckpt, root / "student")
    with pytest.raises(ValueError, match="refused to load"):
        load_training_checkpoint(str(root), 0, {"student": object()})  # gad-train's resume
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_config_that_disagrees_with_the_checkpoint(ckpt, tmp_path):
    """Item 9: hf/config.json with the layer count edited: refused, nothing written (was: a truncated model, exit 0)."""
    cfg_path = ckpt / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 2
    cfg_path.write_text(json.dumps(cfg))
    r = _cli("mcore-to-hf", "--ckpt", ckpt, "--out", tmp_path / "export")
    _one_line_error(r, "does not match the checkpoint", "stored as [4,", "num_hidden_layers=2")
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob("export.tmp-*"))


def _signal_all(procs, sig) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _wait_pending(procs, sig, timeout: float = 20.0) -> None:
    """Until every process in ``procs`` has ``sig`` pending (/proc/<pid>/status) or is gone."""
    bit = 1 << (int(sig) - 1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        waiting = 0
        for p in procs:
            try:
                status = open(f"/proc/{p.pid}/status").read()
            except OSError:
                continue
            masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
            waiting += not any(m & bit for m in masks)
        if not waiting:
            return
        time.sleep(0.01)


def test_kill_stops_every_rank_and_the_next_run_cleans_up(hf_models, tmp_path):
    """Items 8 + 10: kill of a TP2 gad-convert leaves no rank running; kill -9 mid-write leaves a temp dir
    that the next run removes (and reports) before writing a whole checkpoint."""
    hf, out = hf_models["qwen2_tied"], tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gad_megatron.convert.cli", "hf-to-mcore", "--hf", hf, "--out", str(out), "--tp", "2"]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # kill -9 must land while the temp dir exists and the checkpoint is not yet published. The tiny model's
        # write takes milliseconds, and on a loaded machine this loop once saw the temp dir only after the ranks
        # had renamed it (the checkpoint existed: the test failed, not the tool). So the ranks are frozen
        # (SIGSTOP) the moment the temp dir is seen, and the precondition is checked on the frozen state; a
        # write that finished before the freeze is a missed window, started over (never a pass).
        for attempt in range(5):
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            launcher = psutil.Process(proc.pid)
            deadline, ranks = time.time() + 120, []
            while time.time() < deadline:
                ranks = [p for p in launcher.children(recursive=True) if "gad_megatron.convert.cli" in " ".join(p.cmdline())
                         and "torch.distributed.run" not in " ".join(p.cmdline())]
                if len(ranks) == 2 and list(tmp_path.glob("ckpt.tmp-*")):
                    break
                time.sleep(0.005)
            assert len(ranks) == 2, "ranks did not start"
            everyone = [launcher] + launcher.children(recursive=True)
            # SIGTERM too: on an idle machine the tiny write was published before a SIGTERM sent as soon as the
            # ranks existed reached them (the checkpoint existed: the test failed, not the tool).
            _signal_all(ranks, signal.SIGSTOP)
            if out.exists():  # missed the window: the write was published before the freeze
                _signal_all(everyone, signal.SIGKILL)
                proc.wait(timeout=30)
                shutil.rmtree(out)
                continue
            break
        else:
            pytest.fail("5 tries never froze the ranks mid-write")
        os.kill(proc.pid, sig)  # the launcher alone, as `kill PID` does
        if sig == signal.SIGTERM:  # the launcher forwards it: the frozen ranks hold it pending before they go on
            _wait_pending(ranks, sig)
        _signal_all(ranks, signal.SIGCONT)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(everyone, timeout=20)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "a rank outlived gad-convert"
        assert not out.exists()
    left = list(tmp_path.glob("ckpt.tmp-*"))
    assert left, "kill -9 during the write should leave the temp dir this test is about"
    r = _cli("hf-to-mcore", "--hf", hf, "--out", out, "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "removed" in r.stderr and "leftover" in r.stderr
    assert not list(tmp_path.glob("ckpt.tmp-*")) and read_iteration(str(out)) == 0


def test_leftovers_of_live_writers_are_left_alone(tmp_path):
    out = tmp_path / "model"
    dead = outputs.make_tmp_dir(str(out))
    with open(os.path.join(dead, outputs.OWNER_FILE), "w") as f:
        f.write(f"{os.uname().nodename} 999999999\n")
    live = outputs.make_tmp_dir(str(out))  # owned by this (live) process
    assert outputs.clean_stale_tmp(str(out)) == [dead]
    assert os.path.isdir(live) and not os.path.exists(dead)


def test_overwrite_keeps_the_old_output_until_the_new_one_is_in(tmp_path, monkeypatch):
    """Item 10: a crash between the renames of --overwrite loses neither; the next run restores the old one."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("old")
    tmp = outputs.make_tmp_dir(str(out))
    open(os.path.join(tmp, "weights"), "w").write("new")
    real, calls = os.replace, []

    def crash_on_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real(a, b)

    monkeypatch.setattr(outputs.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        outputs.publish_dir(tmp, str(out), overwrite=True)
    monkeypatch.setattr(outputs.os, "replace", real)
    assert not out.exists() and len(list(tmp_path.glob("model.old-*"))) == 1  # old is whole, aside
    outputs.clean_stale_tmp(str(out))
    assert (out / "weights").read_text() == "old"


def test_output_over_an_input_is_refused(hf_models, ckpt, tmp_path):
    """Item 10: `--hf X --out X --overwrite` used to delete the source."""
    src = tmp_path / "hf"
    shutil.copytree(hf_models["qwen2_tied"], src)
    before = sorted(os.listdir(src))
    r = _cli("hf-to-mcore", "--hf", src, "--out", src, "--overwrite")
    _one_line_error(r, "overlaps the input --hf")
    r = _cli("mcore-to-hf", "--ckpt", ckpt, "--out", ckpt / "hf", "--overwrite")
    _one_line_error(r, "overlaps the input --ckpt")
    assert sorted(os.listdir(src)) == before and (ckpt / "hf" / "config.json").exists()


def test_verify_fails_without_tol_when_models_differ(ckpt, tmp_path):
    """Item 11: verify has a default tolerance: another model of the same shape exits 1."""
    other = make_hf_model("qwen2_tied", str(tmp_path / "other"), seed=123)
    r = _cli("verify", "--hf", other, "--ckpt", ckpt, "--tp", 2)
    assert r.returncode == 1 and "exceeds --tol 0.001" in r.stderr, r.stderr[-3000:]


def test_verify_errors_before_any_compute(ckpt, hf_models, tmp_path):
    """Item 12: a missing --hf and a model of another shape are one line each, before any rank starts."""
    r = _cli("verify", "--hf", tmp_path / "nowhere", "--ckpt", ckpt, timeout=60)
    _one_line_error(r, "nowhere", "no config.json")
    r = _cli("verify", "--hf", hf_models["qwen3"], "--ckpt", ckpt, timeout=60)
    _one_line_error(r, "is not the model in")


def test_damaged_inputs_are_one_line(ckpt, hf_models, tmp_path):
    """Item 12: truncated .distcp shard, malformed gad_meta.json, a config without hidden_size."""
    shard = sorted((ckpt / "iter_0000000").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    r = _cli("mcore-to-hf", "--ckpt", ckpt, "--out", tmp_path / "e1")
    _one_line_error(r, "truncated", shard.name)
    assert not list(tmp_path.glob("e1*"))
    (ckpt / "gad_meta.json").write_text('{"role": "student",')
    r = _cli("mcore-to-hf", "--ckpt", ckpt, "--out", tmp_path / "e2")
    _one_line_error(r, "gad_meta.json: not valid JSON")
    hf = tmp_path / "hf"
    shutil.copytree(hf_models["qwen2_tied"], hf)
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["hidden_size"]
    (hf / "config.json").write_text(json.dumps(cfg))
    r = _cli("hf-to-mcore", "--hf", hf, "--out", tmp_path / "c")
    _one_line_error(r, "config.json: missing required field 'hidden_size'")


def test_disk_full_is_one_line_and_leaves_nothing(converted, tmp_path):
    """Item 12: a write that fails for space (here: the file-size limit, EFBIG) is one line; no output or temp."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    r = _cli("mcore-to-hf", "--ckpt", converted["qwen2_untied"], "--out", tmp_path / "export", preexec=small_files)
    _one_line_error(r, "File too large")
    assert not list(tmp_path.iterdir())


def test_outputs_follow_the_umask(hf_models, tmp_path):
    """Item 13: checkpoints and exports are readable by the group / others under umask 022 (were drwx------)."""
    def umask022():
        os.umask(0o022)

    ck, ex = tmp_path / "ck", tmp_path / "ex"
    r = _cli("hf-to-mcore", "--hf", hf_models["qwen2_tied"], "--out", ck, preexec=umask022)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("mcore-to-hf", "--ckpt", ck, "--out", ex, preexec=umask022)
    assert r.returncode == 0, r.stderr[-2000:]
    for d in (ck, ex):
        assert os.stat(d).st_mode & 0o777 == 0o755, oct(os.stat(d).st_mode)


def _plant_byte_item(ckpt, marker) -> tuple:
    """#17 item 1: a checkpoint whose .metadata passes the allow-list but one of whose byte items (an
    ``_extra_state``, ``torch.save`` payload in a .distcp shard) is a pickle that writes ``marker``. The payload is
    appended to its shard and the item's storage entry re-pointed at it. Returns (shard, item key, payload)."""
    import io

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    d = iter_dir(str(ckpt), read_iteration(str(ckpt)))
    with open(os.path.join(d, ".metadata"), "rb") as f:
        md = pickle.load(f)  # our own test checkpoint: trusted here
    key = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in md.storage_data if i.fqn == key)
    buf = io.BytesIO()
    torch.save(_Pwn(str(marker)), buf)
    payload = buf.getvalue()
    shard = os.path.join(d, md.storage_data[index].relative_path)
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(payload)
    md.storage_data[index] = _StorageInfo(md.storage_data[index].relative_path, offset, len(payload))
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    return shard, key, payload


def test_crafted_byte_item_in_a_shard_is_refused_everywhere(ckpt, hf_models, tmp_path):
    """#17 item 1: torch's load planner unpickles byte items with weights_only=False; every entry point checks
    them first (weights_only) and refuses naming the shard and the item; nothing runs."""
    marker = tmp_path / "pwned"
    shard, key, payload = _plant_byte_item(ckpt, marker)
    # the payload is a real exploit: loaded the way torch's load planner loads byte items, it runs
    (tmp_path / "payload").write_bytes(payload)
    subprocess.run([sys.executable, "-c", "import io, sys, torch; torch.load(io.BytesIO(open(sys.argv[1], 'rb')"
                    ".read()), weights_only=False)", str(tmp_path / "payload")], capture_output=True, timeout=120)
    assert marker.exists(), "the crafted payload does not run code: this test would show nothing"
    marker.unlink()
    r = _cli("mcore-to-hf", "--ckpt", ckpt, "--out", tmp_path / "export")
    line = _one_line_error(r, "refused to load item", key)
    assert os.path.basename(shard) in line
    r = _cli("verify", "--hf", hf_models["qwen2_tied"], "--ckpt", ckpt)
    _one_line_error(r, "refused to load item")
    with pytest.raises(ValueError, match="refused to load item"):
        load_checkpoint([], str(ckpt))  # gad-eval's megatron engine, model.student=<ckpt>
    from gad_megatron.trainer.checkpoint import load as load_training_checkpoint

    root = tmp_path / "run_checkpoints"
    shutil.copytree(ckpt, root / "student")
    with pytest.raises(ValueError, match="refused to load item"):
        load_training_checkpoint(str(root), 0, {"student": object()})  # gad-train's checkpoint.resume
    assert not marker.exists() and not (tmp_path / "export").exists()
