"""`sglgym` command line: serve, build-model (more subcommands live next to their packages)."""

from __future__ import annotations

import sys

USAGE = """usage: sglgym <command> [args]

commands:
  serve         SGLang server with the token-in/token-out OpenAI route (default: the tiny model)
  build-model   build the embedded tiny model and print its directory
  rollout       spin up environments and collect grouped rollouts against an engine
  train         GRPO training (default: the tiny model on a built-in environment)
  bench         engine throughput: our route vs SGLang's /generate and its own chat route
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from sglgym.engine.launch import serve
        serve(rest)
    elif command == "build-model":
        from sglgym.models import main as build_main
        build_main(rest)
    elif command == "rollout":
        from sglgym.rollout.cli import main as rollout_main
        rollout_main(rest)
    elif command == "train":
        from sglgym.trainer.cli import main as train_main
        train_main(rest)
    elif command == "bench":
        from sglgym.bench.engine import main as bench_main
        bench_main(rest)
    else:
        print(f"sglgym: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
