"""`sglgym` command line: serve, build-model (more subcommands live next to their packages)."""

from __future__ import annotations

import sys

USAGE = """usage: sglgym <command> [args]

commands:
  serve         SGLang server with the token-in/token-out OpenAI route (default: the tiny model)
  build-model   build the embedded tiny model and print its directory
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
    else:
        print(f"sglgym: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
