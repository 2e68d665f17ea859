"""`arithmetic`: one turn, one exact numeric answer, reward 1/0. Difficulty sets operand size and shape."""

from __future__ import annotations

import random

from .base import ResourcesServer, assistant_texts, last_number

SYSTEM = "You are a careful calculator. Reply with the final answer as a number."


def make_problem(rng: random.Random, difficulty: int) -> tuple[str, int]:
    if difficulty <= 1:                      # one-digit addition
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} + {b}", a + b
    if difficulty == 2:                      # two-digit addition or subtraction
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        return f"{a} {op} {b}", a + b if op == "+" else a - b
    if difficulty == 3:                      # multiplication
        a, b = rng.randint(2, 99), rng.randint(2, 12)
        return f"{a} * {b}", a * b
    a, b, c = rng.randint(10, 999), rng.randint(2, 30), rng.randint(10, 999)   # mixed, with precedence
    return f"{a} * {b} + {c}", a * b + c


class ArithmeticEnv(ResourcesServer):
    name = "arithmetic"

    def make_row(self, rng: random.Random, index: int, split: str) -> dict:
        difficulty = int(self.params.get("difficulty", 1))
        expr, answer = make_problem(rng, difficulty)
        return {
            "responses_create_params": {"input": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"What is {expr}?"},
            ]},
            "expected_answer": answer, "difficulty": difficulty,
        }

    def reward(self, row: dict, response: dict, session: dict) -> float:
        texts = assistant_texts(response)
        got = last_number(texts[-1]) if texts else None
        return 1.0 if got is not None and got == float(row["expected_answer"]) else 0.0
