"""``gad-plan`` (nothing in the trainer imports this package): memory per GPU and time per step of a GAD run,
for a model, a GPU type, a node count and a layout; layouts that do not fit are refused, those that fit are ranked by predicted run time.

    gad-plan --config examples/configs/gad_qwen2.5_14b.yaml --gpu h100-80gb --nodes 2
    gad-plan --model qwen2.5-14b --gpu h100-80gb --nodes 2 --search          # every layout, ranked
    gad-plan --config run.yaml --nodes 2 --shell                                 # KEY=VALUE for sbatch scripts

Memory (bytes per GPU, the most loaded pipeline stage):
- weights: the rank's parameters x dtype bytes, counted exactly as megatron shards them (TP splits of
  QKV / proj / fc1 / fc2 / vocab, replicated norms, embeddings on the first stage, output layer on the last,
  the discriminator's scalar head instead of the vocabulary projection) -- for G, D and (unless offloaded)
  the reference;
- grads: megatron DDP's fp32 main-grad buffer (``grad_reduce_in_fp32``): 4 bytes per parameter plus the
  distributed optimizer's padding, laid out as megatron lays it out (``grad_buffer_layout``);
- optimizer: Adam's two fp32 moments + an fp32 master copy when training in bf16/fp16; with the distributed
  optimizer, the most loaded DP rank's shard of that padded buffer (``optimizer_shard_numels``);
- activations (training, one micro-batch of ``micro_batch_tokens``, times the micro-batches 1F1B keeps in
  flight on the first stage): per token per layer, in dtype bytes, the tensors autograd saves: norm inputs and
  outputs (2h + 2h, /TP with sequence parallel), QKV (q + 2kv)/TP, attention output q/TP, fc1 2f/TP, SwiGLU
  output f/TP, plus the attention probabilities (a/TP x s per token) without a fused (flash) kernel; with
  full recomputation only each layer's input is kept; plus the fp32 vocab-parallel logits;
- vLLM (colocated): its weights at rollout TP and the KV cache the rollout batch needs; with sleep mode they
  are released while G and D train, so the peak is max(rollout phase, training phase).
Time per step: rollout decode (memory-bound: weights + KV read per decoded token step, in waves of
``max_num_seqs``), the FLOPs of G (old logprobs, update), the reference, D (scores, update) at an assumed MFU,
the DP gradient reduction, and the weight sync. The assumptions are arguments, printed with the plan.
"""

from gad_megatron.plan.layouts import Plan, check_layout, plan, search  # noqa: F401
from gad_megatron.models.memory import (  # noqa: F401
    MemoryPlan, activation_bytes_per_token_layer, ddp_bucket_size, fp32_params, grad_buffer_layout, grad_bytes, optimizer_bytes,
    optimizer_shard_numels, plan_memory,
)
from gad_megatron.models.params import param_list, rank_params, total_params  # noqa: F401
from gad_megatron.models.steptime import plan_time  # noqa: F401
from gad_megatron.models.plan_inputs import DTYPE_BYTES, GIB, GPU, GPUS, Assumptions, Layout, Workload  # noqa: F401
from gad_megatron.plan.cli import from_config, load_arch, main  # noqa: F401
