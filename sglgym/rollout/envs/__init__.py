"""Built-in environments: NeMo Gym-protocol resources servers with seeded dataset generators."""

BUILTIN = {
    "arithmetic": "sglgym.rollout.envs.arithmetic:ArithmeticEnv",
    "calculator": "sglgym.rollout.envs.calculator:CalculatorEnv",
    "guess": "sglgym.rollout.envs.guess:GuessEnv",
}
