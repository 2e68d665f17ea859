"""`calculator`: multi-step tool use. The model calls add/mul tools, then states the final answer."""

from __future__ import annotations

import random

from .base import ResourcesServer, assistant_texts, function_tool, last_number

SYSTEM = ("Solve the problem with the tools: call add or mul for each step, then reply with the final "
          "answer as a number.")
_NUM = {"type": "number", "description": "an operand"}


def _operands(args: dict) -> tuple[float, float]:
    missing = [k for k in ("a", "b") if k not in args]
    if missing:
        raise ValueError(f"missing argument(s): {', '.join(missing)}")
    a, b = args["a"], args["b"]
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) \
            or not isinstance(b, (int, float)):
        raise ValueError("arguments 'a' and 'b' must be numbers")
    return a, b


def _add(args: dict):
    a, b = _operands(args)
    return a + b


def _mul(args: dict):
    a, b = _operands(args)
    return a * b


class CalculatorEnv(ResourcesServer):
    name = "calculator"

    def tools(self):
        return {
            "add": (function_tool("add", "Add two numbers: a + b", {"a": _NUM, "b": _NUM}, ["a", "b"]), _add),
            "mul": (function_tool("mul", "Multiply two numbers: a * b", {"a": _NUM, "b": _NUM}, ["a", "b"]), _mul),
        }

    def make_row(self, rng: random.Random, index: int, split: str) -> dict:
        steps = int(self.params.get("steps", 2))
        value = rng.randint(1, 20)
        expr = str(value)
        for _ in range(steps):
            x = rng.randint(2, 20)
            if rng.random() < 0.5:
                expr, value = f"({expr} + {x})", value + x
            else:
                expr, value = f"({expr} * {x})", value * x
        expr = expr[1:-1] if expr.startswith("(") else expr
        return {
            "responses_create_params": {"input": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Compute {expr}."},
            ]},
            "expected_answer": value, "steps": steps,
        }

    def reward(self, row: dict, response: dict, session: dict) -> float:
        texts = [t for t in assistant_texts(response) if t.strip()]
        got = last_number(texts[-1]) if texts else None
        return 1.0 if got is not None and got == float(row["expected_answer"]) else 0.0
