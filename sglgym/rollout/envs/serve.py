"""Run one environment's resources server: `python -m sglgym.rollout.envs.serve --entrypoint M:C --port P`."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sglgym.rollout.envs.serve")
    p.add_argument("--entrypoint", required=True, help="module:Class of a ResourcesServer subclass")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--params", default="{}", help="JSON object of environment parameters")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)

    import uvicorn

    from .base import load_env_class

    env = load_env_class(args.entrypoint)(**json.loads(args.params))
    # One worker process: sessions live in memory, and the spin-up stops it by PID.
    uvicorn.run(env.app(), host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
