"""The judge prompts of gad-eval, in one place. Change them only together with ``VERSION``: the version is
recorded with every judged item, so results made with different prompts are never averaged together.

Protocol (paper, Sec. 4): for each instruction the judge (GPT-4o by default) first writes its own reference
answer; then it rates the student's answer and its reference answer on a 1-10 scale in one call; the item's
score is ``student / (student + reference) * 100`` and a test set's score is the mean over items.
"""

VERSION = "gad-judge-v1"

REFERENCE_SYSTEM = "You are a helpful assistant. Answer the user's instruction as well as you can."

SCORE_SYSTEM = (
    "You are a fair and strict judge of AI assistant answers. You will see an instruction and two answers, "
    "A and B. Judge helpfulness, relevance, accuracy, depth and level of detail. Ignore the order and the "
    "length of the answers. Rate each answer with an integer from 1 to 10. Explain briefly, then end with "
    "exactly two lines:\nScore A: <1-10>\nScore B: <1-10>"
)

SCORE_USER = "[Instruction]\n{instruction}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}"
