"""#30: the rollout topology (engines per rollout TP group, prompt blocks, per-request seeds), one engine count for
planner and trainer, vLLM's share of the GPU in the rollout phase and its one-line refusal, what rollout.offload
may name, the CUDA IPC handle renumbered for an engine worker. No process group: seconds."""

import pytest

from gad_megatron.runtime.topology import TopologyError, request_seed, rollout_topology

EXAMPLE_14B = "examples/configs/gad_qwen2.5_14b.yaml"


@pytest.mark.parametrize("world,rtp,per_node,engines,leaders", [
    (2, 1, 2, 2, [0, 1]), (16, 2, 8, 8, [0, 2, 4, 6, 8, 10, 12, 14]), (16, 8, 8, 2, [0, 8]), (4, 4, 4, 1, [0])])
def test_engines_leaders_and_devices(world, rtp, per_node, engines, leaders):
    t = rollout_topology(world, rtp, per_node)
    assert t.engines == engines and t.leaders == leaders
    for rank in range(world):
        e = t.engine_of(rank)
        assert t.leader(e) <= rank < t.leader(e) + rtp and t.is_leader(rank) == (rank in leaders)
        devs = t.local_devices(rank)  # the group's GPUs on its node, its leader's first
        assert devs == list(range(t.leader(e) % per_node, t.leader(e) % per_node + rtp)) and devs[-1] < per_node


@pytest.mark.parametrize("n_prompts,engines", [(6, 2), (7, 3), (2, 4), (256, 8)])
def test_prompt_blocks_cover_every_prompt_once_in_order(n_prompts, engines):
    t = rollout_topology(engines, 1)
    ranges = [t.prompt_range(e, n_prompts) for e in range(engines)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n_prompts
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_impossible_topologies_name_the_numbers():
    with pytest.raises(TopologyError, match="rollout TP 3 does not divide the 8 ranks of a node"):
        rollout_topology(16, 3, 8)
    with pytest.raises(TopologyError, match="rollout TP 16 does not divide the 8 ranks of a node: an engine would span"):
        rollout_topology(16, 16, 8)
    with pytest.raises(TopologyError, match="world size 12 is not a whole number of nodes of 8"):
        rollout_topology(12, 2, 8)


def test_request_seeds_depend_on_step_and_prompt_index_only():
    assert request_seed(7, 3) == request_seed(7, 3)
    seeds = {request_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000 and max(seeds) < 2**56


def test_planner_and_trainer_take_their_engine_count_from_one_function(monkeypatch):
    """gad-plan's rollout time / memory and gad-train's make_engine both call runtime.topology.rollout_topology."""
    import gad_megatron.runtime.topology as topology
    from gad_megatron.plan import GPUS, load_arch, plan
    from gad_megatron.plan.cli import from_config
    from gad_megatron.trainer.build import run_topology
    from gad_megatron.trainer.config import load_config

    calls = []
    real = topology.rollout_topology

    def counted(world, rtp, per_node=None):
        calls.append((world, rtp, per_node))
        return real(world, rtp, per_node)

    import gad_megatron.models.plan_inputs as plan_inputs
    from gad_megatron.trainer import build

    # both import the one function (at the top of their files): count its calls where each calls it
    assert plan_inputs.rollout_topology is real and build.rollout_topology is real
    for mod in (topology, plan_inputs, build):
        monkeypatch.setattr(mod, "rollout_topology", counted)
    cfg = load_config(EXAMPLE_14B, [])
    model, lay, wl = from_config(cfg)
    p = plan(load_arch(model), lay, 16, wl, GPUS["h100-80gb"])
    assert p.fits, p.problems
    planned = [c for c in calls]
    trainer = run_topology(cfg, 16, 8)
    assert planned and all(c == (16, 2, 8) for c in planned) and calls[-1] == (16, 2, 8)
    assert trainer.engines == 8 == real(*planned[0]).engines
    with pytest.raises(Exception, match="rollout.vllm_tensor_parallel=3: rollout TP 3 does not divide"):
        run_topology(load_config(EXAMPLE_14B, ["rollout.vllm_tensor_parallel=3"]), 16, 8)


def _plan_14b(*overrides):
    from gad_megatron.plan import GPUS, load_arch, plan
    from gad_megatron.plan.cli import from_config
    from gad_megatron.trainer.config import load_config

    cfg = load_config(EXAMPLE_14B, list(overrides))
    model, lay, wl = from_config(cfg)
    arch = load_arch(model)
    return cfg, arch, plan(arch, lay, 16, wl, GPUS["h100-80gb"])


def test_the_rollout_phase_counts_vllms_share_and_refuses_in_one_line(monkeypatch):
    """The pre-#30 14B layout (engine TP 8, nothing offloaded): 46 GiB of training state stays while vLLM at 0.7
    asks for 56 of the 80 GiB. gad-train --check says the same line before any model is built."""
    from gad_megatron.models.plan_inputs import GIB
    from gad_megatron.trainer import build, step_estimate
    from gad_megatron.trainer.config import ConfigError

    cfg, arch, p = _plan_14b("rollout.vllm_tensor_parallel=8", "rollout.offload=[]")
    m = p.memory
    assert m.vllm_share == pytest.approx(0.7 * 80 * GIB)
    assert m.rollout_phase == pytest.approx(m.resident_rollout + m.vllm_share)
    assert m.resident_rollout == pytest.approx(m.weights + m.grads + m.optimizer + m.reference + m.overhead)
    (line,) = p.problems
    assert "\n" not in line and not p.fits
    for needle in ("vLLM cannot start in the rollout phase: 46.0 GiB of training state", "optimizer 27.2",
                   "rollout.gpu_memory_utilization=0.7 asks for 56.0 GiB: 102.0 GiB > the h100-80gb's 80 GiB"):
        assert needle in line, line
    h100 = lambda device: __import__("gad_megatron.plan", fromlist=["GPUS"]).GPUS["h100-80gb"]  # noqa: E731
    for mod in (step_estimate, build):  # build reads it at the top of its file
        monkeypatch.setattr(mod, "device_gpu", h100)
    with pytest.raises(ConfigError) as e:
        build.check_vllm_can_start(cfg, arch)
    assert str(e.value) == line
    # Offloading G's and D's grads and Adam state makes room: what stays is weights, reference and overhead.
    cfg, arch, p = _plan_14b("rollout.vllm_tensor_parallel=8")
    assert p.fits and p.memory.resident_rollout == pytest.approx(p.memory.weights + p.memory.reference + p.memory.overhead)
    build.check_vllm_can_start(cfg, arch)  # no refusal


def test_the_14b_example_is_the_searchs_pick():
    """The example takes gad-plan --search's fastest fitting layout, with the paper's rollout TP 2."""
    from gad_megatron.plan import GPUS, load_arch, search
    from gad_megatron.plan.cli import from_config
    from gad_megatron.trainer.config import load_config

    model, lay, wl = from_config(load_config(EXAMPLE_14B, []))
    best = search(load_arch(model), 16, wl, GPUS["h100-80gb"])[0]
    assert best.fits
    pick = best.layout
    assert (pick.tp, pick.pp, pick.rollout_tp, pick.offload, pick.sp) == (lay.tp, lay.pp, lay.rollout_tp, lay.offload, lay.sp)
    assert best.workload.micro_batch_tokens == wl.micro_batch_tokens and lay.rollout_tp == 2


@pytest.mark.parametrize("over,needle", [
    ("rollout.offload=[grads,adam]", "rollout.offload=['grads', 'adam']: 'adam': use grads, optimizer and / or params"),
    ("rollout.offload=[params]", "params cannot leave: the megatron engine samples with G's own parameters")])
def test_offload_names_are_checked(over, needle):
    from gad_megatron.trainer.config import ConfigError, load_config

    overs = ["model.student=/x", "data.train=/y", over] + (["rollout.engine=megatron"] if "params" in over else [])
    with pytest.raises(ConfigError, match="rollout.offload") as e:
        load_config(None, overs)
    assert needle in str(e.value)


def test_ipc_handle_renumbered_for_the_engine_worker():
    from gad_megatron.rollout.vllm_worker import ipc_args_on_device

    args = tuple(range(15))
    assert ipc_args_on_device(args, "GPU-b", ["GPU-a", "GPU-b"]) == args[:6] + (1,) + args[7:]
    with pytest.raises(RuntimeError, match="which this engine worker does not see"):
        ipc_args_on_device(args, "GPU-c", ["GPU-a", "GPU-b"])


def test_engines_on_one_cpu_node_get_disjoint_cores(monkeypatch):
    """vLLM's automatic CPU binding gave both engines of a 2-rank run all cores (their OpenMP threads spun against
    each other: rollouts 8x, syncs 30x slower); each engine's worker now owns its rank's share."""
    from gad_megatron.rollout.vllm_engine import VLLMConfig, core_share, engine_placement

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    topo = rollout_topology(4, 2, 4)
    binds = [engine_placement(VLLMConfig(model="m", devices=topo.local_devices(r), node_ranks=4), on_gpu=False)
             for r in topo.leaders]
    assert binds == [{"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"}, {"VLLM_CPU_OMP_THREADS_BIND": "4,5|6,7"}]
    assert [core_share([0, 1], i, 2) for i in range(2)] == [[0], [1]]
    assert [core_share([0, 1], i, 4) for i in range(4)] == [[0], [1], [0], [1]]  # fewer cores than ranks
    assert [core_share(list(range(5)), i, 2) for i in range(2)] == [[0, 1, 2], [3, 4]]
    # one engine alone keeps vLLM's own binding; on GPU the engine sees its own GPUs only
    assert engine_placement(VLLMConfig(model="m", devices=[0], node_ranks=1), on_gpu=False) == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert engine_placement(VLLMConfig(model="m", devices=[2, 3], node_ranks=4), on_gpu=True) == {
        "CUDA_VISIBLE_DEVICES": "6,7"}
