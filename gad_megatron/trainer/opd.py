"""White-box on-policy distillation (OPD), and GAD + OPD.

When the teacher's weights exist and it shares the student's tokenizer, the teacher's logprob of every token
G sampled is a dense signal: the per-token reverse KL ``log pi_G(y_t) - log pi_T(y_t)`` (its k1 estimate)
on G's own samples, minimised by a policy gradient with advantage ``teacher_logp - old_logp`` per token
(slime's and NeMo-RL's OPD advantage), detached, clamped to ``+- opd.adv_clamp`` and times ``opd.coef``.

- ``reward.source=opd``: that advantage alone, through the reward's per-token channel (``Scores``); no D.
- ``reward.source=gad+opd``: ``opd.weight_discriminator x GRPO(D) + w_opd x OPD`` per token, ``w_opd`` from
  ``opd.weight`` going linearly to ``opd.weight_final`` over the GAD steps (a function of the step: a resume
  lands on the same weight); D keeps learning Bradley-Terry as in GAD.

The teacher is a frozen megatron GPT (``opd.teacher``: an HF folder or a gad-convert checkpoint) built on G's
parallel state, so TP / PP / DP layouts see the same numbers; it may be larger than the student, and its
embedding may have padded rows beyond the tokenizer (Qwen2.5-3B has 151,936 rows, 7B / 14B 152,064).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from omegaconf import OmegaConf

from gad_megatron.algo.policy import low_var_kl
from gad_megatron.convert.api import is_checkpoint, model_hf_dir
from gad_megatron.models.hf_config import arch_spec_from_dir
from gad_megatron.trainer import passes
from gad_megatron.trainer.metrics import max_over_world, reduce_pairs
from gad_megatron.trainer.policy import model_logprobs, offload_chunks
from gad_megatron.trainer.rewards import (
    DiscriminatorReward,
    PlannedModels,
    Reward,
    RewardContext,
    Scores,
    WithDiscriminator,
)


def validate_opd_section(cfg, bad) -> None:
    """The ``opd`` section's own rules, whichever reward is chosen (``bad(key, why)`` records a problem)."""
    o = cfg.opd
    if o.url and (cfg.rollout.temperature if o.teacher_temperature is None else o.teacher_temperature) != 1.0:
        bad("opd.teacher_temperature", "must be 1 with opd.url (vLLM applies no temperature to prompt logprobs)")
    for key in ("opd.teacher_temperature", "opd.adv_clamp"):
        if OmegaConf.select(cfg, key) is not None and not OmegaConf.select(cfg, key) > 0:
            bad(key, "must be > 0")
    for key in ("opd.coef", "opd.weight", "opd.weight_discriminator", "opd.weight_final"):
        if OmegaConf.select(cfg, key) is not None and not OmegaConf.select(cfg, key) >= 0:
            bad(key, "must be >= 0")


def _one_teacher(cfg, bad) -> None:
    o = cfg.opd
    if bool(o.teacher) == bool(o.url):
        bad("opd.teacher", f"reward.source={cfg.reward.source} needs one teacher: opd.teacher (a model) or opd.url")


class TeacherMismatch(ValueError):
    """The teacher cannot score the student's tokens (another tokenizer, too few embedding rows)."""


def opd_advantages(old_logp: torch.Tensor, teacher_logp: torch.Tensor, coef: float = 1.0,
                   clamp: float = 10.0, mask: torch.Tensor = None) -> torch.Tensor:
    """Per-token OPD advantage ``coef x clamp(teacher_logp - old_logp, -clamp, clamp)``, detached; 0 where
    ``mask`` is 0 (prompt, padding)."""
    adv = (teacher_logp.detach() - old_logp.detach()).clamp(-clamp, clamp) * coef
    return adv if mask is None else adv * mask.to(adv.dtype)


def teacher_folder_problem(path: str) -> str:
    """'' when ``path`` is a model OPD can load (an HF folder with config and weights, or a gad-convert
    checkpoint); else why not, in words that name no library (#32 items 6, 7)."""
    if not os.path.isdir(path):
        return "no such folder (an HF model folder or a gad-convert checkpoint)"
    if is_checkpoint(path):
        return ""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "holds no config.json: not an HF model folder or a gad-convert checkpoint"
    if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
        return "holds no weights (*.safetensors / *.bin): the teacher would be built without them"
    return ""


def check_teacher(student_dir: str, teacher_dir: str) -> None:
    """Before any model is built: the teacher reads the student's tokens as the same tokens. Compares the two
    tokenizers' token maps and end tokens; the teacher's embedding may have more rows than its tokenizer
    (padding), not fewer than the student's token ids. Raises TeacherMismatch in one line."""
    from transformers import AutoTokenizer

    st, te = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    sv, tv = st.get_vocab(), te.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:3]
        moved = [k for k in sv if k in tv and sv[k] != tv[k]][:3]
        raise TeacherMismatch(
            f"opd.teacher={teacher_dir}: its tokenizer differs from the student's ({len(tv):,} vs {len(sv):,} "
            f"tokens; only the student's: {only_s}; other ids: {moved}): OPD needs the student's tokenizer "
            "(use reward.source=discriminator for a teacher with another one)")
    if st.eos_token_id != te.eos_token_id:
        raise TeacherMismatch(f"opd.teacher={teacher_dir}: end token {te.eos_token_id} differs from the "
                              f"student's {st.eos_token_id}")
    rows = arch_spec_from_dir(teacher_dir).vocab_size
    if rows < max(sv.values()) + 1:
        raise TeacherMismatch(f"opd.teacher={teacher_dir}: {rows:,} embedding rows cannot hold the student's token "
                              f"ids up to {max(sv.values()):,}")


class MegatronTeacher:
    """The teacher as a frozen megatron GPT on G's parallel state (in host memory between uses when
    ``opd.offload_teacher``, on GPU)."""

    def __init__(self, chunks: list, temperature: float, layout, offload: bool):
        self.chunks, self.temperature, self.layout, self.offload = chunks, temperature, layout, offload
        offload_chunks(chunks, "cpu", offload)

    def logprobs(self, seqs: list) -> None:
        """Collective: ``per_token["teacher_logp"]`` of every sequence (real on the last pipeline stage)."""
        offload_chunks(self.chunks, "device", self.offload)
        model_logprobs(self.chunks, seqs, "teacher_logp", self.temperature, self.layout)
        offload_chunks(self.chunks, "cpu", self.offload)


class ServerTeacher:
    """The teacher behind an OpenAI-compatible vLLM server: the logprob of every response token as a prompt
    token (vLLM's ``prompt_logprobs``, one completion token asked), at temperature 1 (vLLM applies none to
    prompt tokens; the config refuses another). Ranks on the last pipeline stage ask for their own share."""

    def __init__(self, url: str, model: str = None, batch: int = 64, timeout_s: float = 600.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), timeout=timeout_s)
        self.model = model or self.client.models.list().data[0].id
        self.batch = batch

    def logprobs(self, seqs: list) -> None:
        from megatron.core import parallel_state as ps

        if not ps.is_pipeline_last_stage():
            for s in seqs:
                s.per_token["teacher_logp"] = torch.zeros(len(s.response))
            return
        for i in range(0, len(seqs), self.batch):
            part = seqs[i : i + self.batch]
            r = self.client.completions.create(model=self.model, prompt=[s.tokens for s in part], max_tokens=1,
                                               temperature=0.0, extra_body={"prompt_logprobs": 0})
            for choice in r.choices:
                s = part[choice.index]
                per_pos = (choice.model_extra or {}).get("prompt_logprobs")
                if per_pos is None or len(per_pos) != len(s):
                    raise RuntimeError(f"opd.url: the server gave no prompt logprobs for a {len(s)}-token sequence "
                                       "(is it a vLLM server?)")
                p = len(s.prompt)
                s.per_token["teacher_logp"] = torch.tensor(
                    [per_pos[p + k][str(tok)]["logprob"] for k, tok in enumerate(s.response)], dtype=torch.float32)


def _server_json(url: str, path: str, body: Optional[dict] = None):
    """GET (or POST ``body``) ``<server>/<path>`` of an OpenAI-compatible server as JSON; anything else (HTML, an
    empty answer) is one TeacherMismatch naming opd.url and what came back."""
    import urllib.request

    root = url.rstrip("/").removesuffix("/v1")
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + os.environ.get("OPENAI_API_KEY", "EMPTY")}
    req = urllib.request.Request(root + path, json.dumps(body).encode() if body is not None else None, headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = r.read()  # one HTTP answer (not a JSONL line)
    try:
        return json.loads(answer)
    except (json.JSONDecodeError, UnicodeDecodeError):
        shown = answer[:60].decode("utf-8", "replace") if answer else "nothing"
        raise TeacherMismatch(f"opd.url={url}: {path} answered {shown!r}, not JSON: not a vLLM OpenAI server") from None


def check_server_tokenizer(student_dir: str, url: str, model: str = None) -> None:
    """Before any model is built: the server tokenizes a chat-formatted probe as the student does, and gives the
    prompt logprobs OPD reads (#32 items 10, 11: an HTML answer, JSON without ``tokens``, a server without prompt
    logprobs each died later with a traceback)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    probe = [{"role": "user", "content": "repeat: fox red owl; 12+7=19, naïve café."}]
    text = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True) + "fox red owl"
    ours = tok(text, add_special_tokens=False)["input_ids"]
    said = _server_json(url, "/tokenize", {"prompt": text, "add_special_tokens": False, **({"model": model} if model else {})})
    theirs = said.get("tokens") if isinstance(said, dict) else None
    if not isinstance(theirs, list):
        raise TeacherMismatch(f"opd.url={url}: /tokenize answered without 'tokens' ({str(said)[:80]}): not a vLLM "
                              "OpenAI server")
    if theirs != ours:
        raise TeacherMismatch(f"opd.url={url}: the server's tokenizer differs from the student's (a probe gives "
                              f"{len(theirs)} vs {len(ours)} tokens): OPD needs the student's tokenizer")
    if model is None:
        listed = _server_json(url, "/v1/models")
        model = ((listed.get("data") or [{}])[0] if isinstance(listed, dict) else {}).get("id")
    done = _server_json(url, "/v1/completions", {"model": model, "prompt": ours, "max_tokens": 1, "temperature": 0.0,
                                                "prompt_logprobs": 0})
    choice = ((done.get("choices") or [{}])[0] if isinstance(done, dict) else {})
    per_pos = choice.get("prompt_logprobs")
    if not isinstance(per_pos, list) or len(per_pos) != len(ours):
        raise TeacherMismatch(f"opd.url={url}: a {len(ours)}-token probe came back without prompt logprobs "
                              f"({'none' if per_pos is None else f'{len(per_pos)} positions'}): OPD reads the "
                              "teacher's logprobs of the student's tokens as vLLM's prompt_logprobs")


def make_teacher(ctx: RewardContext):
    """The teacher ``opd.teacher`` (a model) or ``opd.url`` (a server) names."""
    o, cfg = ctx.cfg.opd, ctx.cfg
    if o.url:
        return ServerTeacher(o.url, o.served_model)
    temperature = cfg.rollout.temperature if o.teacher_temperature is None else o.teacher_temperature
    return MegatronTeacher(ctx.load_frozen(o.teacher), temperature, ctx.layout, o.offload_teacher)


class TeacherChecks:
    """The teacher's part of a reward's contract: its pre-flight and what the planner budgets for it."""

    @classmethod
    def preflight(cls, cfg, student_dir: str) -> str:
        """The teacher folder loads and reads the student's tokens (or the server's tokenizer does): '' or why not."""
        o = cfg.opd
        problem = "" if o.url else teacher_folder_problem(o.teacher)
        if problem:
            return f"opd.teacher={o.teacher}: {problem}"
        try:
            if o.url:
                check_server_tokenizer(student_dir, o.url, o.served_model)
            else:
                check_teacher(student_dir, model_hf_dir(o.teacher))
        except (TeacherMismatch, OSError) as e:
            where = f"opd.url={o.url}" if o.url else f"opd.teacher={o.teacher}"
            said = " ".join(str(e).split())  # the tokenizer loader's errors run over several lines
            return said if isinstance(e, TeacherMismatch) else f"{where}: {said[:300]}"
        return ""

    @classmethod
    def planned_models(cls, cfg) -> dict:
        """A local teacher is a frozen GPT on G's parallel state (one behind opd.url costs this job nothing)."""
        o = cfg.opd
        return PlannedModels(cls.uses_discriminator, None if o.url else model_hf_dir(o.teacher), bool(o.offload_teacher))


class OPDReward(TeacherChecks, Reward):
    """The teacher's per-token advantages on G's samples; rewards are all 0 (no sequence-level signal)."""

    reads_old_logprobs = True

    def __init__(self, teacher, cfg):
        self.teacher, self.cfg = teacher, cfg
        self.coef, self.clamp = cfg.opd.coef, cfg.opd.adv_clamp

    @classmethod
    def validate(cls, cfg, bad) -> None:
        _one_teacher(cfg, bad)
        if cfg.opd.coef == 0:  # #32 item 9 (as the mixed reward's zero weights are refused)
            bad("opd.coef", "is 0 with reward.source=opd: every advantage would be 0")

    @classmethod
    def build(cls, ctx: RewardContext) -> "OPDReward":
        return cls(make_teacher(ctx), ctx.cfg)

    def score(self, batch) -> Scores:
        """Needs G's old logprobs on ``batch.students`` (the GAD stage fills them first)."""
        students = batch.students
        self.teacher.logprobs(students)
        adv = [opd_advantages(s.per_token["old_logp"], s.per_token["teacher_logp"], self.coef, self.clamp)
               for s in students]
        n_prompts, n = len(batch.examples), self.cfg.rollout.n
        return Scores(torch.zeros(n_prompts * n, dtype=torch.float64), torch.zeros(n_prompts, dtype=torch.float64),
                      opd_metrics(students, adv), token_advantages=adv)


def opd_metrics(students: list, adv: list) -> dict:
    """Reverse KL to the teacher on G's samples (k1 and the never-negative k3, per token), the advantage's
    mean and std, and the mean |teacher - student| logprob gap; over the world (last-stage ranks write)."""
    names = ("opd_kl_k1", "opd_kl_k3", "opd_adv_mean", "opd_adv_sq", "opd_logp_gap")
    pairs = {k: torch.zeros(2, dtype=torch.float64) for k in names}
    gap_max = 0.0
    if passes.last_stage_writer() and students:
        old = torch.cat([s.per_token["old_logp"] for s in students]).double()
        teacher = torch.cat([s.per_token["teacher_logp"] for s in students]).double()
        a = torch.cat(adv).double()
        gap = (teacher - old).abs()
        count = torch.tensor(float(old.numel()), dtype=torch.float64)
        for k, v in zip(names, (old - teacher, low_var_kl(old, teacher, 1e9), a, a * a, gap)):
            pairs[k] = torch.stack([v.sum(), count])
        gap_max = gap.max().item() if old.numel() else 0.0
    m = reduce_pairs(pairs)
    m["opd_adv_std"] = max(0.0, m.pop("opd_adv_sq") - m["opd_adv_mean"] ** 2) ** 0.5
    m["opd_logp_gap_max"] = max_over_world(gap_max)
    return m


class GadOpdReward(TeacherChecks, WithDiscriminator):
    """``w_d x GRPO(D) + w_opd(step) x OPD``: D's scores and BT updates as in GAD, the teacher's per-token
    advantages added; both parts' weights and sizes logged."""

    reads_old_logprobs = True

    def __init__(self, d: DiscriminatorReward, opd: OPDReward, cfg, warm: int, total: int):
        self.d, self.opd, self.cfg, self.warm, self.total = d, opd, cfg, warm, total

    @classmethod
    def validate(cls, cfg, bad) -> None:
        _one_teacher(cfg, bad)
        o = cfg.opd
        if o.weight_discriminator == 0 and not (o.coef and (o.weight or o.weight_final)):
            bad("opd.weight", "(or opd.coef) and opd.weight_discriminator are 0 with reward.source=gad+opd: every "
                              "advantage would be 0")

    @classmethod
    def build(cls, ctx: RewardContext) -> "GadOpdReward":
        s = ctx.schedule
        return cls(DiscriminatorReward.build(ctx), OPDReward.build(ctx), ctx.cfg, s.warm, s.total)

    def opd_weight(self, step: int) -> float:
        o = self.cfg.opd
        if o.weight_final is None:
            return float(o.weight)
        frac = min(1.0, max(0.0, (step - self.warm) / max(1, self.total - self.warm - 1)))
        return float(o.weight + (o.weight_final - o.weight) * frac)

    def score(self, batch) -> Scores:
        sd, so = self.d.score(batch), self.opd.score(batch)
        w = self.opd_weight(batch.step)
        m = {**so.metrics, "opd_weight": w, "reward_d_mean": sd.rewards.mean().item()}
        return Scores(sd.rewards, sd.teacher, m, token_advantages=[w * a for a in so.token_advantages],
                      sequence_weight=self.cfg.opd.weight_discriminator)
