"""gad-plan (#8): its memory formulas against what CPU runs allocate, layouts refused and ranked, and the
paper's 14B run on 16 H100."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, read_json, run_ranks
from hf_fixtures import make_hf_model

from gad_megatron.models.hf_config import arch_spec_from_dir
from gad_megatron import plan as P

LAYOUTS = [  # (tp, pp, distributed optimizer, dtype, sequence parallel, arch)
    (1, 1, 0, "fp32", 0, "qwen2_untied"),
    (2, 1, 0, "fp32", 1, "qwen2_untied"),
    (1, 2, 0, "fp32", 0, "qwen2_tied"),
    (1, 1, 1, "bf16", 0, "qwen2_untied"),
    (1, 2, 1, "bf16", 0, "qwen2_tied"),  # 4 ranks: PP2 x DP2, the tied copy in a bucket of its own
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    base = tmp_path_factory.mktemp("plan")
    # Sizes that are not multiples of 64 (hidden 40, ffn 60, vocab 98), so the distributed optimizer's padding of
    # every parameter start and bucket end shows in the bytes.
    odd = dict(hidden_size=40, intermediate_size=60, vocab_size=98)
    hfs = {name: make_hf_model(name, str(base / name), seed=0, **odd) for name in ("qwen2_untied", "qwen2_tied")}
    out = {}
    for lay in LAYOUTS:
        tp, pp, do, dtype, sp, name = lay
        path = base / f"{tp}{pp}{do}{dtype}{sp}{name}.json"
        run_ranks(tp * pp * (2 if do else 1), "plan_worker.py", tp, pp, do, dtype, sp, hfs[name], path, timeout=300)
        out[lay] = (arch_spec_from_dir(hfs[name]), read_json(path))
    return out


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda l: f"TP{l[0]}PP{l[1]}{'-distopt' if l[2] else ''}-{l[3]}{'-SP' if l[4] else ''}-{l[5]}")
def test_memory_formulas_match_what_megatron_allocates(measured, lay):
    tp, pp, do, dtype, sp, _ = lay
    arch, rows = measured[lay]
    for r in rows:
        g_list = P.param_list(arch, tp, pp, r["stage"], "student")
        d_list = P.param_list(arch, tp, pp, r["stage"], "discriminator")
        # names, sizes, order and tied flags as megatron registers them (embeddings, tied copy, D's TP-split head)
        assert [list(x) for x in g_list] == r["g_param_list"] and [list(x) for x in d_list] == r["d_param_list"]
        g = P.rank_params(arch, tp, pp, r["stage"], "student")
        assert (r["g_params"], r["d_params"]) == (g, P.rank_params(arch, tp, pp, r["stage"], "discriminator"))
        assert r["g_grad_unpadded_bytes"] == 4 * g  # fp32 main grads
        # the whole buffer, padding included (distributed optimizer: 64-aligned starts, lcm(DP, 128) bucket ends)
        assert r["g_grad_bytes"] == P.grad_bytes(g_list, r["dp"], bool(do))
        # D's head is fp32 in a bf16 model: a buffer of its own
        assert r["d_grad_bytes"] == P.grad_bytes(d_list, r["dp"], bool(do), own_buffer=P.fp32_params("discriminator", dtype))
        # Adam moments (+ fp32 masters in bf16) this very rank holds: its shard of the padded buffer
        assert r["g_optimizer_bytes"] == P.optimizer_bytes(g_list, dtype, r["dp"], bool(do), dp_rank=r["dp_rank"])
        if do:  # the overlapped (GPU) configuration: several buckets, laid out as megatron does
            bk = r["bucketed"]
            numel, buckets, index = P.grad_buffer_layout(g_list, r["dp"], True, bk["bucket_size"])
            assert (numel, [list(b) for b in buckets], [list(i) for i in index]) == (bk["numel"], bk["buckets"], bk["index"])
            assert len(buckets) > 1 or bk["bucket_size"] is None
        if "saved_bytes" in r:
            per = P.activation_bytes_per_token_layer(arch, P.Layout(tp=tp, sp=bool(sp)), dtype, 64, flash=True, local_spec=True)  # CPU: local spec + SDPA
            predicted = per * r["tokens"] * arch.num_layers + r["tokens"] * arch.vocab_size / tp * 4 * 2
            assert abs(predicted - r["saved_bytes"]) <= 0.10 * r["saved_bytes"], (predicted, r["saved_bytes"])
    if do:  # the shards add up to the whole optimizer state of each stage, exactly
        for stage in range(pp):
            want = P.optimizer_bytes(P.param_list(arch, tp, pp, stage), dtype, 1, False)
            assert sum(r["g_optimizer_bytes"] for r in rows if r["stage"] == stage and r["rank"] % tp == 0) == want


def test_the_papers_14b_run_on_16_h100():
    """The shipped 14B config fits 2 x 8 H100 80GB and the planner says how long the paper's run takes
    (paper: ~30 h); a layout that does not fit is refused naming the phase; an impossible one names why."""
    from gad_megatron.trainer.config import load_config

    model, lay, wl = P.from_config(load_config(os.path.join(ROOT, "examples/configs/gad_qwen2.5_14b.yaml"), ["data.train=x"]))
    arch, h100 = P.load_arch(model), P.GPUS["h100-80gb"]
    assert P.total_params(arch) == 14_770_033_664  # Qwen2.5-14B's published parameter count
    p = P.plan(arch, lay, 16, wl, h100)
    assert p.fits and p.memory.peak <= 80 * P.GIB
    assert 15 <= p.time["run_hours"] <= 60, p.time  # the paper's ~30 h, within the model's stated assumptions
    big = P.plan(arch, P.Layout(tp=1, pp=1), 16, wl, h100)  # replicated 14B G + D + Adam per GPU
    assert not big.fits and "GiB per GPU" in big.problems[0]
    bad = P.plan(arch, P.Layout(tp=3), 16, wl, h100)
    assert not bad.fits and "not divisible by TP=3" in bad.problems[0]
    ranked = [q for q in P.search(arch, 16, wl, h100) if q.fits]
    assert ranked and [q.time["run_hours"] for q in ranked] == sorted(q.time["run_hours"] for q in ranked)
    r = subprocess.run([sys.executable, "-m", "gad_megatron.plan", "--config", "examples/configs/gad_qwen2.5_14b.yaml",
                        "--nodes", "2", "data.train=x"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 0 and "run (800 warmup + 1600 GAD steps)" in r.stdout, r.stdout + r.stderr


def test_presets_are_the_published_sizes():
    sizes = {"qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.62e9, "llama-3.2-3b": 3.21e9, "llama-3.1-8b": 8.03e9}
    for name, n in sizes.items():
        assert abs(P.total_params(P.load_arch(name)) - n) / n < 0.005, name


def test_each_calls_fixed_cost_is_counted_once_per_call():
    """#31 item 3: the step time adds each call's fixed cost (plan_inputs.CallCosts): per micro-batch of each
    forward and update pass (micro-batches of the token budget on each DP rank), per optimizer step, per decode
    step of the rollout, per weight sync into a separate engine; none into the megatron engine."""
    import dataclasses
    import math

    from gad_megatron.models.plan_inputs import CallCosts
    from gad_megatron.models.steptime import plan_time

    arch, cpu = P.load_arch("qwen2.5-3b"), P.GPUS["cpu"]
    wl = P.Workload(batch_prompts=8, n=4, mean_prompt_tokens=40, mean_response_tokens=24, max_prompt_tokens=64,
                    max_response_tokens=32, micro_batch_tokens=256)
    lay, asm = P.Layout(), P.Assumptions()
    calls = CallCosts(fwd_call_s=1.0, train_call_s=10.0, optim_step_s=100.0, decode_step_s=1000.0,
                      sync_s=10000.0)
    bare = plan_time(arch, lay, 2, wl, dataclasses.replace(cpu, calls=CallCosts()), asm)
    got = plan_time(arch, lay, 2, wl, dataclasses.replace(cpu, calls=calls), asm)
    extra = {k: round(got["step_s"][k] - bare["step_s"][k], 3) for k in bare["step_s"]}
    T, Tt = 8 * 4 * 64, 8 * 64  # student and teacher tokens of a step
    mbs = lambda tokens: math.ceil(tokens / (2 * 256))  # noqa: E731  (DP 2)
    steps = min(32, 24 * asm.decode_tail)  # decode steps of one wave
    assert extra == {"g_old_logprobs": 0.0, "reference": mbs(T) * 1.0, "d_scores": mbs(T + Tt) * 1.0,
                     "d_update": mbs(T + Tt) * 10.0 + 100.0, "g_update": mbs(T) * 10.0 + 100.0,
                     "rollout": steps * 1000.0, "dp_grad_reduce": 0.0, "weight_sync": 10000.0}, extra
    # the warmup step: G's cross-entropy over the teacher answers instead of GRPO, D's passes, the rollout, the sync
    assert round(got["warmup_step_s"] - bare["warmup_step_s"], 3) == round(
        mbs(T + Tt) * 11.0 + 100.0 + mbs(Tt) * 10.0 + 100.0 + steps * 1000.0 + 10000.0, 3)
    meg = plan_time(arch, lay, 2, dataclasses.replace(wl, engine_live_weights=True), dataclasses.replace(cpu, calls=calls), asm)
    assert meg["step_s"]["weight_sync"] == 0.0  # G's own weights: nothing to sync, no call, no copy


def test_the_plan_budgets_what_the_reward_builds(tmp_path):
    """#34: the planner asks the reward class: GAD budgets D; a scorer no D; OPD a local teacher, sharded over
    TP x PP and resident unless opd.offload_teacher (then its shard crosses PCIe for each forward)."""
    from gad_megatron.models.memory import plan_memory
    from gad_megatron.models.params import total_params
    from gad_megatron.models.steptime import plan_time
    from gad_megatron.trainer.config import load_config
    from gad_megatron.trainer.step_estimate import layout_and_workload

    student = make_hf_model("qwen2_untied", str(tmp_path / "student"))
    # the planner reads a teacher's config alone: a 7B-sized one (its offloaded shard takes measurable PCIe time)
    conf = json.loads(open(os.path.join(student, "config.json")).read())
    conf.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(conf))
    (tmp_path / "d.jsonl").write_text("")
    base = [f"model.student={student}", f"data.train={tmp_path / 'd.jsonl'}", "parallel.nproc=4",
            "parallel.tensor_parallel=2", "train.batch_prompts=8"]
    arch, gpu, asm = arch_spec_from_dir(student), P.GPUS["h100-80gb"], P.Assumptions()

    def planned(*over):
        lay, wl = layout_and_workload(load_config(None, base + list(over)))
        return wl, plan_memory(arch, lay, 4, wl, gpu, asm), plan_time(arch, lay, 4, wl, P.GPUS["cpu"], asm)["step_s"]

    gad_wl, gad_mem, gad_t = planned()
    sc_wl, sc_mem, sc_t = planned("reward.source=scorer", "reward.scorer=m:f")
    assert gad_wl.discriminator and not sc_wl.discriminator and gad_wl.teacher_params == 0
    for part in ("weights", "grads", "optimizer"):  # D's share gone (D: G's layers with a 1-row head)
        assert 0.5 * getattr(gad_mem, part) < getattr(sc_mem, part) < 0.6 * getattr(gad_mem, part), part
    assert sc_t["d_update"] == sc_t["d_scores"] == 0 < gad_t["d_update"]
    opd_wl, opd_mem, opd_t = planned("reward.source=opd", f"opd.teacher={teacher}")
    assert opd_wl.teacher_params == total_params(arch_spec_from_dir(teacher)) > 0 and not opd_wl.discriminator
    assert opd_mem.teacher == opd_wl.teacher_params * 4 / 2  # fp32, TP 2
    assert opd_t["teacher"] > 0 and "teacher" not in sc_t
    off_wl, off_mem, off_t = planned("reward.source=opd", f"opd.teacher={teacher}", "opd.offload_teacher=true")
    assert off_mem.teacher == 0 and off_t["teacher"] > opd_t["teacher"]
    gadopd_wl, _, _ = planned("reward.source=gad+opd", f"opd.teacher={teacher}")
    assert gadopd_wl.discriminator and gadopd_wl.teacher_params == opd_wl.teacher_params
