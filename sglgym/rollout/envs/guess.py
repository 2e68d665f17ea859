"""`guess`: multi-turn without tools. The environment answers each guess with "higher"/"lower" as a user
message until the number is found or the agent runs out of turns, so even a weak model has many turns."""

from __future__ import annotations

import random

from .base import ResourcesServer, assistant_texts, last_number


class GuessEnv(ResourcesServer):
    name = "guess"
    multi_turn = True

    @property
    def low(self) -> int:
        return int(self.params.get("low", 1))

    @property
    def high(self) -> int:
        return int(self.params.get("high", 100))

    def make_row(self, rng: random.Random, index: int, split: str) -> dict:
        target = rng.randint(self.low, self.high)
        prompt = (f"I picked a whole number between {self.low} and {self.high}. Guess it: reply with one "
                  "number and I will say higher or lower.")
        return {"responses_create_params": {"input": [{"role": "user", "content": prompt}]},
                "target": target, "low": self.low, "high": self.high}

    def observe(self, row: dict, response: dict) -> tuple[str | None, bool]:
        texts = assistant_texts(response)
        guess = last_number(texts[-1]) if texts else None
        if guess is None:
            return f"Reply with a number between {row['low']} and {row['high']}.", False
        if guess == row["target"]:
            return None, True
        return ("higher" if row["target"] > guess else "lower"), False

    def reward(self, row: dict, response: dict, session: dict) -> float:
        """1 when found; otherwise (with partial_credit) up to 0.5 for the closest guess."""
        guesses = [g for g in (last_number(t) for t in assistant_texts(response)) if g is not None]
        target = row["target"]
        if target in guesses:
            return 1.0
        if not guesses or not self.params.get("partial_credit", True):
            return 0.0
        span = max(1, row["high"] - row["low"])
        best = min(abs(g - target) for g in guesses)
        return round(0.5 * max(0.0, 1.0 - best / span), 4)
