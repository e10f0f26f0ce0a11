"""The judge calls and the score arithmetic."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from gad_megatron.data.openai_chat import RequestFailed
from gad_megatron.eval import judge_prompts as P

_SCORE_RE = re.compile(r"score\s*a\s*[:=]\s*(\d+(?:\.\d+)?)\s*[\r\n]+\s*score\s*b\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


class UnparsableJudgeReply(ValueError):
    pass


def parse_scores(reply: str) -> tuple:
    """(score A, score B) from the judge's closing lines; both must lie in [1, 10]."""
    matches = _SCORE_RE.findall(reply or "")
    if not matches:
        raise UnparsableJudgeReply(f"no 'Score A: x / Score B: y' lines in judge reply: {reply[:120]!r}")
    a, b = (float(x) for x in matches[-1])
    if not (1 <= a <= 10 and 1 <= b <= 10):
        raise UnparsableJudgeReply(f"judge scores out of range 1-10: A={a} B={b}")
    return a, b


def relative_score(student: float, reference: float) -> float:
    """The paper's item score: student / (student + reference) x 100 (50 = as good as the judge's answer)."""
    return 100.0 * student / (student + reference)


def aggregate(items: list) -> dict:
    """Mean item score over judged items; failures are counted, never scored."""
    ok = [it for it in items if not it.get("failed")]
    return {
        "score": sum(it["score"] for it in ok) / len(ok) if ok else None,
        "judged": len(ok),
        "failed": len(items) - len(ok),
        "mean_response_tokens": sum(it.get("response_tokens", 0) for it in ok) / len(ok) if ok else None,
    }


@dataclass
class Judge:
    chat: object  # gad_megatron.data.openai_chat.RetryingChat
    client: object
    model: str
    parse_retries: int = 2

    async def judge(self, instruction_messages: list, student_answer: str) -> dict:
        """Reference answer, then scores (retrying an unparsable score reply ``parse_retries`` times)."""
        instruction = instruction_messages[-1]["content"]
        try:
            got = await self.chat.ask(self.client, [{"role": "system", "content": P.REFERENCE_SYSTEM}, *instruction_messages])
        except RequestFailed as e:
            return {"failed": True, "error": f"judge reference answer: {e}"}
        reference = got[0]
        msgs = [{"role": "system", "content": P.SCORE_SYSTEM},
                {"role": "user", "content": P.SCORE_USER.format(instruction=instruction, answer_a=student_answer,
                                                                answer_b=reference)}]
        last_err: Optional[str] = None
        for _ in range(self.parse_retries + 1):
            try:
                got = await self.chat.ask(self.client, msgs)
            except RequestFailed as e:
                return {"failed": True, "error": f"judge score: {e}", "reference_answer": reference}
            try:
                a, b = parse_scores(got[0])
            except UnparsableJudgeReply as e:
                last_err = str(e)
                continue
            return {"failed": False, "reference_answer": reference, "judge_reply": got[0], "score_student": a,
                    "score_reference": b, "score": relative_score(a, b)}
        return {"failed": True, "error": f"unparsable judge reply after {self.parse_retries + 1} tries: {last_err}",
                "reference_answer": reference}
