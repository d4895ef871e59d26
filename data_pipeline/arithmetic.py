"""A small arithmetic task with checkable answers, for the README's walkthrough of the three stages.

`python -m data_pipeline.arithmetic OUT_DIR` writes, from one seeded shuffle of every problem
"a+b=" with 0 <= a, b < 20 (400 problems; answers "0".."38"):
  sft.jsonl / sft_valid.jsonl    {prompt, response} for `apogee sft` (sft.inputs / sft.valid_inputs)
  pairs.jsonl / pairs_valid.jsonl {prompt, chosen, rejected} for `apogee dpo` (the rejected answer is off by 1..3)
  prompts.jsonl / prompts_valid.jsonl {prompt, answer} for `apogee grpo` (grpo.inputs / grpo.valid_inputs)
  tasks.jsonl                    {prompt, answer} held out from all of the above, for `apogee eval --tasks`
  heldout.jsonl                  {text: "a+b=c"} of the held-out problems, for `apogee eval --data`
The held-out problems (tasks, heldout) never appear in any training or validation file.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OPERAND_LIMIT = 20
"""Operands are 0..OPERAND_LIMIT-1."""

HELD_OUT = 80
"""Problems kept for evaluation only."""

VALID = 40
"""Problems of each stage's validation files."""


def problems(seed: int = 0) -> list[tuple[str, str]]:
    """Every (prompt 'a+b=', answer) pair, in the seeded order the files are cut from."""
    pairs = [(f"{a}+{b}=", str(a + b)) for a in range(OPERAND_LIMIT) for b in range(OPERAND_LIMIT)]
    random.Random(seed).shuffle(pairs)
    return pairs


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: off by 1 to 3 (never negative)."""
    value = int(answer) + rng.choice([-3, -2, -1, 1, 2, 3])
    return str(value if value >= 0 else int(answer) + 1)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_task_files(directory, seed: int = 0) -> dict[str, Path]:
    """Write the walkthrough's files into `directory` (see the module doc); returns them by name."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    everything = problems(seed)
    held_out, valid, train = everything[:HELD_OUT], everything[HELD_OUT:HELD_OUT + VALID], everything[HELD_OUT + VALID:]
    rng = random.Random(seed + 1)

    def pairs(items):
        return [{"prompt": p, "chosen": a, "rejected": wrong_answer(a, rng)} for p, a in items]

    files = {
        "sft": [{"prompt": p, "response": a} for p, a in train],
        "sft_valid": [{"prompt": p, "response": a} for p, a in valid],
        "pairs": pairs(train),
        "pairs_valid": pairs(valid),
        "prompts": [{"prompt": p, "answer": a} for p, a in train],
        "prompts_valid": [{"prompt": p, "answer": a} for p, a in valid],
        "tasks": [{"prompt": p, "answer": a} for p, a in held_out],
        "heldout": [{"text": p + a} for p, a in held_out],
    }
    return {name: _write(out / f"{name}.jsonl", records) for name, records in files.items()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m data_pipeline.arithmetic OUT_DIR", file=sys.stderr)
        sys.exit(2)
    for name, path in write_task_files(sys.argv[1]).items():
        print(f"{name}: {path}")
