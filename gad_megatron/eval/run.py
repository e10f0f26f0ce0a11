"""``gad-eval``: generate the student's answers greedily, have the judge score them, summarise and plot.

    gad-eval run --model HF_DIR|CKPT --testset dolly:dolly.jsonl --testset lmsys:lmsys.jsonl:train.jsonl \
                 --out results/gad.jsonl [--engine vllm|megatron] [--judge-model gpt-4o]
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

from gad_megatron.eval import judge_prompts
from gad_megatron.eval.judge import Judge, aggregate

log = logging.getLogger("gad_megatron.eval")


def _read_jsonl(path: str) -> list:
    if not os.path.exists(path):
        return []
    from gad_megatron.data.collect import recover_output

    recover_output(path)  # drop a torn last line left by a crash
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


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

    from gad_megatron.convert.api import mcore_to_hf
    from gad_megatron.convert.megatron_ckpt import read_iteration

    # One export per checkpoint identity (path + iteration): a shared workdir must never answer for one model
    # with another model's export.
    ident = f"{os.path.abspath(model)}:{read_iteration(model)}"
    out = os.path.join(workdir, "exported_hf-" + hashlib.sha256(ident.encode()).hexdigest()[:16])
    if not os.path.exists(out):
        mcore_to_hf(model, out)
    return out


def generate_answers(model: str, items: list, engine: str = "vllm", max_tokens: int = 1536,
                     workdir: str = "/tmp", max_model_len: int = 4096) -> dict:
    """{id: (answer text, answer tokens)} with greedy decoding (paper: max 1536 new tokens)."""
    from transformers import AutoTokenizer

    from gad_megatron.data.chat import prompt_ids
    from gad_megatron.rollout.base import SamplingConfig

    hf_dir = _hf_dir_for(model, workdir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = [prompt_ids(tok, it["messages"]) for it in items]
    sampling = SamplingConfig().greedy(max_tokens=max_tokens)
    sampling.stop_token_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if engine == "vllm":
        from gad_megatron.rollout.vllm_engine import VLLMConfig, VLLMEngine

        eng = VLLMEngine(VLLMConfig(model=hf_dir, max_model_len=max_model_len))
        try:
            groups = eng.generate(ids, sampling)
        finally:
            eng.shutdown()
    elif engine == "megatron":
        from gad_megatron.convert.api import load_from_checkpoint
        from gad_megatron.rollout.megatron_engine import MegatronEngine
        from gad_megatron.runtime import ParallelConfig, initialize

        if os.path.exists(os.path.join(model, "config.json")):
            raise ValueError(f"{model}: the megatron engine reads a megatron checkpoint (convert with gad-convert)")
        initialize(ParallelConfig())
        _, chunks, _ = load_from_checkpoint(model)
        groups = MegatronEngine(chunks).generate(ids, sampling)
    else:
        raise ValueError(f"engine={engine!r}: use vllm or megatron")
    out = {}
    for it, g in zip(items, groups):
        s = g[0]
        toks = [t for t in s.token_ids if t not in sampling.stop_token_ids]
        out[it["id"]] = (tok.decode(toks, skip_special_tokens=True), len(toks))
    return out


async def judge_items(items: list, answers: dict, results_path: str, judge_cfg, run_name: str,
                      max_in_flight: int = 8, parse_retries: int = 2) -> list:
    from gad_megatron.data.collect import RetryingChat

    done = {r["id"] for r in _read_jsonl(results_path)}
    todo = [it for it in items if it["id"] not in done]
    chat = RetryingChat(judge_cfg)
    client = chat.client()
    judge = Judge(chat, client, judge_cfg.model, parse_retries)
    sem = asyncio.Semaphore(max_in_flight)

    async def one(it):
        answer, n_tokens = answers[it["id"]]
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
    return _read_jsonl(results_path)


def summarize(rows: list) -> dict:
    """{run: {dataset: aggregate}} (judge prompt versions are never mixed)."""
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
    r.add_argument("--engine", choices=("vllm", "megatron"), default="vllm")
    r.add_argument("--testset", action="append", required=True, help="NAME:PATH[:TRAIN_FILE for lmsys]")
    r.add_argument("--n", type=int, default=None, help="items per test set (lmsys default 500)")
    r.add_argument("--out", required=True)
    r.add_argument("--run-name", default=None)
    r.add_argument("--max-tokens", type=int, default=1536)
    r.add_argument("--max-model-len", type=int, default=4096)
    r.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    r.add_argument("--judge-model", default="gpt-4o")
    r.add_argument("--api-key-env", default="OPENAI_API_KEY")
    r.add_argument("--max-in-flight", type=int, default=8)
    r.add_argument("--parse-retries", type=int, default=2)
    r.add_argument("--timeout", type=float, default=120.0)
    r.add_argument("--backoff-base", type=float, default=0.5)
    r.add_argument("--no-plot", action="store_true")
    s = sub.add_parser("report")
    s.add_argument("results", nargs="+")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--no-plot", action="store_true")
    return p


def main(argv=None) -> int:
    from gad_megatron.data.collect import CollectConfig, FatalReply, _safe
    from gad_megatron.data.prompts import PromptFormatError
    from gad_megatron.eval.testsets import load_testset

    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.cmd == "report":
            rows = [r for path in a.results for r in _read_jsonl(path)]
            write_report(summarize(rows), a.out_dir, plot=not a.no_plot)
            return 0
        items = []
        for spec in a.testset:
            name, _, rest = spec.partition(":")
            path, _, train = rest.partition(":")
            items += load_testset(name, path, train or None, a.n)
        run_name = a.run_name or os.path.basename(os.path.normpath(a.model))
        answers_path = a.out + ".answers.jsonl"
        answers = {r["id"]: (r["answer"], r["response_tokens"]) for r in _read_jsonl(answers_path)}
        missing = [it for it in items if it["id"] not in answers]
        if missing:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            new = generate_answers(a.model, missing, a.engine, a.max_tokens, os.path.dirname(os.path.abspath(a.out)),
                                   a.max_model_len)
            for it in missing:
                _append(answers_path, {"id": it["id"], "answer": new[it["id"]][0], "response_tokens": new[it["id"]][1]})
            answers.update(new)
        cfg = CollectConfig(base_url=a.base_url, model=a.judge_model, api_key_env=a.api_key_env,
                            timeout_s=a.timeout, backoff_base_s=a.backoff_base, progress=False)
        rows = asyncio.run(judge_items(items, answers, a.out, cfg, run_name, a.max_in_flight, a.parse_retries))
        write_report(summarize(rows), os.path.dirname(os.path.abspath(a.out)), plot=not a.no_plot)
    except (PromptFormatError, FatalReply, ValueError, FileNotFoundError) as e:
        key_env = a.api_key_env if a.cmd == "run" else "OPENAI_API_KEY"
        print(f"gad-eval: error: {_safe(str(e), key_env)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
