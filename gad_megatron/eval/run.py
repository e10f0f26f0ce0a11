"""``gad-eval``: generate the student's answers greedily, have the judge score them, summarise and plot.

    gad-eval run --model HF_DIR|CKPT --testset dolly:dolly.jsonl --testset lmsys:lmsys.jsonl:train.jsonl \
                 --out results/gad.jsonl [--engine auto|vllm|megatron] [--judge-model gpt-4o]
    gad-eval report results/before.jsonl results/seqkd.jsonl results/gad.jsonl --out-dir results/

Every judged item is appended to the results JSONL as soon as it is judged (resumable: judged ids are never
re-paid); answers are kept beside it (``.answers.jsonl``) so a restart does not regenerate them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from gad_megatron.convert.api import config_dir, is_checkpoint, load_model, mcore_to_hf
from gad_megatron.convert.megatron_ckpt import iter_dir, read_iteration
from gad_megatron.data.chat import prompt_ids
from gad_megatron.data.jsonl import recover_output
from gad_megatron.data.openai_chat import CollectConfig, FatalReply, RetryingChat, redact_key
from gad_megatron.data.prompts import PromptFormatError
from gad_megatron.eval import judge_prompts
from gad_megatron.eval.judge import Judge, aggregate
from gad_megatron.eval.testsets import load_testset
from gad_megatron.models.hf_config import load_hf_config
from gad_megatron.rollout.base import EngineInputs, SamplingConfig
from gad_megatron.rollout.factory import build_engine, choose_engine, engine_choices, engine_class
from gad_megatron.rollout.vllm_engine import VLLMConfig
from gad_megatron.runtime import ParallelConfig, destroy, initialize
from gad_megatron.runtime.outputs import check_not_an_input, read_json

log = logging.getLogger("gad_megatron.eval")


def _read_jsonl(path: str, repair: bool = True) -> list:
    """Rows of a JSONL this tool writes. ``repair`` drops a torn last line (a crash mid-write) of our own
    outputs; inputs (``report``) are only read, never written to."""
    rows: list = []
    _, torn = recover_output(path, on_row=rows.append, repair=repair)
    if torn and not repair:
        log.warning("%s: its last line is incomplete (a run still writing it, or one that crashed): ignored", path)
    return rows


def _key(row: dict) -> tuple:
    """Items are keyed by test set and id: two sets may both have an item "1"."""
    return (row.get("dataset"), str(row["id"]))


def _latest(rows: list) -> dict:
    """{(run, dataset, id): the last row written} (a re-judged failure supersedes the failure)."""
    return {(r.get("run", "run"),) + _key(r): r for r in rows}


def model_identity(model: str) -> dict:
    """What makes one model's answers different from another's: its path, the checkpoint iteration, and a
    fingerprint of the weight files (names, sizes, modification times)."""
    import hashlib

    ident = {"path": os.path.abspath(model)}
    if is_checkpoint(model):
        ident["iteration"] = read_iteration(model)
        wdir = iter_dir(model, ident["iteration"])
        files = [os.path.join(wdir, f) for f in sorted(os.listdir(wdir))]
    else:
        files = [os.path.join(model, f) for f in sorted(os.listdir(model)) if f.endswith((".safetensors", ".bin", ".json"))]
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
    ident["fingerprint"] = h.hexdigest()[:16]
    return ident


def check_run_identity(out: str, identity: dict) -> None:
    """Results and answers in ``out`` belong to one model and one set of settings: a rerun with another
    ``--model`` (or other generation / judge settings) is refused instead of reporting the old answers."""
    meta_path = out + ".meta.json"
    existing = [p for p in (out, out + ".answers.jsonl") if os.path.exists(p) and os.path.getsize(p)]
    if os.path.exists(meta_path):
        old = read_json(meta_path)
        diff = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
        if diff:
            k = diff[0]
            raise ValueError(f"{out} holds results for {k}={old.get(k)!r}, not {identity.get(k)!r} (differs in "
                             f"{', '.join(diff)}): use another --out, or move the old results aside")
        return
    if existing:
        raise ValueError(f"{existing[0]} has results but no {os.path.basename(meta_path)} saying which model and "
                         f"settings made them: use another --out, or move the old results aside")
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(identity, f, indent=2)
    os.replace(tmp, meta_path)


def model_max_len(model: str) -> int:
    """The model's context length from its config (an HF dir, or the config saved with a checkpoint)."""
    cfg = load_hf_config(config_dir(model))
    return int(cfg.get("max_position_embeddings") or 4096)


def resolve_max_model_len(model: str, requested=None) -> int:
    """``--max-model-len``: by default the model's own context (at most 4096); longer is an error."""
    context = model_max_len(model)
    if requested is None:
        return min(context, 4096)
    if requested > context:
        raise ValueError(f"--max-model-len {requested} is longer than the model's context "
                         f"(max_position_embeddings={context} in its config.json)")
    return requested


def parse_testset(spec: str) -> tuple:
    name, _, rest = spec.partition(":")
    path, _, train = rest.partition(":")
    if not path:
        raise ValueError(f"--testset {spec}: expected NAME:PATH[:TRAIN_FILE] (e.g. dolly:data/dolly.jsonl)")
    return name, path, train or None


def _append(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _hf_dir_for(model: str, workdir: str) -> str:
    """An HF directory for ``model``: itself, or the export of a megatron checkpoint."""
    if os.path.exists(os.path.join(model, "config.json")):
        return model
    import hashlib

    # One export per checkpoint identity (the same one the results are tied to): a shared workdir must never
    # answer for one model with another model's export.
    ident = json.dumps(model_identity(model), sort_keys=True)
    out = os.path.join(workdir, "exported_hf-" + hashlib.sha256(ident.encode()).hexdigest()[:16])
    if not os.path.exists(out):
        mcore_to_hf(model, out)
    return out


def engine_class_live(name: str) -> bool:
    return engine_class(name).live_weights


def generate_answers(model: str, items: list, engine: str = "auto", max_tokens: int = 1536,
                     workdir: str = "/tmp", max_model_len: int = 4096) -> dict:
    """{(dataset, id): (answer text, answer tokens)} with greedy decoding (paper: max 1536 new tokens)."""
    from transformers import AutoTokenizer

    hf_dir = _hf_dir_for(model, workdir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = [prompt_ids(tok, it["messages"]) for it in items]
    sampling = SamplingConfig().greedy(max_tokens=max_tokens)
    sampling.stop_token_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []

    engine, _ = choose_engine(engine)  # auto: vLLM where it imports, else the trainer's own megatron engine
    if engine_class_live(engine):  # the megatron engine: the model's own chunks on a one-rank parallel state
        initialize(ParallelConfig())
        try:
            _, chunks, _ = load_model(model)  # a megatron checkpoint or an HF dir
            groups = build_engine(engine, EngineInputs(chunks=chunks)).generate(ids, sampling)
        finally:
            destroy()
    else:  # an engine with its own copy of the weights (vLLM)

        eng = build_engine(engine, EngineInputs(vllm=VLLMConfig(model=hf_dir, max_model_len=max_model_len)))
        try:
            groups = eng.generate(ids, sampling)
        finally:
            eng.shutdown()
    out = {}
    for it, g in zip(items, groups):
        s = g[0]
        toks = [t for t in s.token_ids if t not in sampling.stop_token_ids]
        out[_key(it)] = (tok.decode(toks, skip_special_tokens=True), len(toks))
    return out


async def judge_items(items: list, answers: dict, results_path: str, judge_cfg, run_name: str,
                      max_in_flight: int = 8, parse_retries: int = 2, retry_failed: bool = True) -> list:
    """Judges every item not judged yet (and, with ``retry_failed``, every item whose last judgement failed:
    an outage must not fail items for good). ``answers``: {(dataset, id): (text, tokens)}."""
    latest = {k[1:]: r for k, r in _latest(_read_jsonl(results_path)).items() if k[0] == run_name}
    todo = [it for it in items if _key(it) not in latest or (retry_failed and latest[_key(it)].get("failed"))]
    chat = RetryingChat(judge_cfg)
    client = chat.client()
    judge = Judge(chat, client, judge_cfg.model, parse_retries)
    sem = asyncio.Semaphore(max_in_flight)

    async def one(it):
        answer, n_tokens = answers[_key(it)]
        async with sem:
            verdict = await judge.judge(it["messages"], answer)
        row = {"id": it["id"], "dataset": it["dataset"], "run": run_name, "messages": it["messages"],
               "student_answer": answer, "response_tokens": n_tokens, "judge_model": judge_cfg.model,
               "judge_prompt_version": judge_prompts.VERSION, **verdict}
        _append(results_path, row)

    try:
        await asyncio.gather(*(one(it) for it in todo))
    finally:
        await client.close()
    wanted = {_key(it) for it in items}
    return [r for k, r in _latest(_read_jsonl(results_path)).items() if k[0] == run_name and k[1:] in wanted]


def summarize(rows: list) -> dict:
    """{run: {dataset: aggregate}} over the last row of each item (judge prompt versions are never mixed)."""
    rows = list(_latest(rows).values())
    versions = {r.get("judge_prompt_version") for r in rows}
    if len(versions) > 1:
        raise ValueError(f"results mix judge prompt versions {sorted(map(str, versions))}: re-judge before comparing")
    out: dict = {}
    for r in rows:
        out.setdefault(r.get("run", "run"), {}).setdefault(r["dataset"], []).append(r)
    return {run: {ds: aggregate(items) for ds, items in sorted(by.items())} for run, by in out.items()}


def write_report(summary: dict, out_dir: str, plot: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    datasets = sorted({ds for by in summary.values() for ds in by})
    lines = ["| run | " + " | ".join(datasets) + " | failed | mean response tokens |",
             "|---|" + "---|" * (len(datasets) + 2)]
    for run, by in summary.items():
        cells = [f"{by[d]['score']:.1f}" if d in by and by[d]["score"] is not None else "-" for d in datasets]
        failed = sum(v["failed"] for v in by.values())
        toks = [v["mean_response_tokens"] for v in by.values() if v["mean_response_tokens"] is not None]
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {failed} | {sum(toks) / len(toks) if toks else 0:.0f} |")
    md = "\n".join(lines) + "\n"
    paths = {"markdown": os.path.join(out_dir, "summary.md"), "json": os.path.join(out_dir, "summary.json")}
    with open(paths["markdown"], "w") as f:
        f.write(md)
    with open(paths["json"], "w") as f:
        json.dump({"judge_prompt_version": judge_prompts.VERSION, "runs": summary}, f, indent=2)
    if plot and len(summary) >= 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(datasets), 3.6))
        width = 0.8 / len(summary)
        for k, (run, by) in enumerate(summary.items()):
            xs = [i + k * width for i in range(len(datasets))]
            ys = [by[d]["score"] if d in by and by[d]["score"] is not None else 0 for d in datasets]
            ax.bar(xs, ys, width=width, label=run)
        ax.set_xticks([i + width * (len(summary) - 1) / 2 for i in range(len(datasets))], datasets)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("judge score (student / (student + ref) x 100)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["png"] = os.path.join(out_dir, "scores.png")
        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
    print(md, end="")
    return paths


def _parser():
    p = argparse.ArgumentParser(prog="gad-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True, help="HF directory or megatron checkpoint")
    r.add_argument("--engine", choices=engine_choices(), default="auto",
                   help="auto: vLLM where it imports, else megatron-core's KV-cached generation")
    r.add_argument("--testset", action="append", required=True, help="NAME:PATH[:TRAIN_FILE for lmsys]")
    r.add_argument("--n", type=int, default=None, help="items per test set (lmsys default 500)")
    r.add_argument("--out", required=True)
    r.add_argument("--run-name", default=None)
    r.add_argument("--max-tokens", type=int, default=1536)
    r.add_argument("--max-model-len", type=int, default=None, help="default: the model's context, at most 4096")
    r.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    r.add_argument("--judge-model", default="gpt-4o")
    r.add_argument("--api-key-env", default="OPENAI_API_KEY")
    r.add_argument("--max-in-flight", type=int, default=8)
    r.add_argument("--parse-retries", type=int, default=2)
    r.add_argument("--timeout", type=float, default=120.0)
    r.add_argument("--backoff-base", type=float, default=0.5)
    r.add_argument("--no-plot", action="store_true")
    r.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="keep items whose judgement failed as failed (default: a rerun asks the judge again)")
    s = sub.add_parser("report")
    s.add_argument("results", nargs="+")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--no-plot", action="store_true")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    key_env = a.api_key_env if a.cmd == "run" else "OPENAI_API_KEY"
    try:
        if a.cmd == "report":
            for name in ("summary.md", "summary.json", "scores.png"):
                check_not_an_input(os.path.join(a.out_dir, name), {f"results[{i}]": p for i, p in enumerate(a.results)})
            rows = [r for path in a.results for r in _read_jsonl(path, repair=False)]
            write_report(summarize(rows), a.out_dir, plot=not a.no_plot)
            return 0
        # Everything that can be wrong is found before any model is loaded or any judge call is paid.
        specs = [parse_testset(spec) for spec in a.testset]
        for name, path, train in specs:
            check_not_an_input(a.out, {f"--testset {name}": path, "--testset train file": train})
        items = []
        for name, path, train in specs:
            items += load_testset(name, path, train, a.n)
        keys = [_key(it) for it in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"--testset {dup[0]}: id {dup[1]!r} appears twice (given the same test set twice?)")
        max_model_len = resolve_max_model_len(a.model, a.max_model_len)
        run_name = a.run_name or os.path.basename(os.path.normpath(a.model))

        a.engine, why = choose_engine(a.engine)  # the engine that ran goes into the run's identity
        print(f"[gad-eval] generation engine: {a.engine} ({why})", file=sys.stderr)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        check_run_identity(a.out, {"model": model_identity(a.model), "run_name": run_name, "engine": a.engine,
                                   "max_tokens": a.max_tokens, "max_model_len": max_model_len,
                                   "judge_model": a.judge_model, "judge_prompt_version": judge_prompts.VERSION})
        answers_path = a.out + ".answers.jsonl"
        answers = {_key(r): (r["answer"], r["response_tokens"]) for r in _read_jsonl(answers_path)}
        missing = [it for it in items if _key(it) not in answers]
        if missing:
            new = generate_answers(a.model, missing, a.engine, a.max_tokens, os.path.dirname(os.path.abspath(a.out)),
                                   max_model_len)
            for it in missing:
                text, n = new[_key(it)]
                _append(answers_path, {"id": it["id"], "dataset": it["dataset"], "answer": text, "response_tokens": n})
            answers.update(new)
        cfg = CollectConfig(base_url=a.base_url, model=a.judge_model, api_key_env=a.api_key_env,
                            timeout_s=a.timeout, backoff_base_s=a.backoff_base, progress=False)
        rows = asyncio.run(judge_items(items, answers, a.out, cfg, run_name, a.max_in_flight, a.parse_retries,
                                       a.retry_failed))
        write_report(summarize(rows), os.path.dirname(os.path.abspath(a.out)), plot=not a.no_plot)
    except (PromptFormatError, FatalReply, ValueError, OSError) as e:
        print(f"gad-eval: error: {redact_key(str(e), key_env)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gad-eval: interrupted: judged items are kept; run the same command to resume", file=sys.stderr)
        return 130
    failed = sum(1 for r in rows if r.get("failed"))
    if rows and failed == len(rows):
        errors = sorted({r.get("error", "?") for r in rows})
        print(f"gad-eval: error: all {failed} judgements failed ({errors[0]}); rerun to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
