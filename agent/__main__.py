"""``python -m agent run [--config F] [-v]``: the agent service process, without click.

``provision-agent run`` (click) checks the config and then replaces itself with
this command (``agent.runner.service_argv``), and so does the service after it
has provisioned or renewed: the long-running process never holds click or
cryptography (design.md §7, docs/agent.md "Memory"). Any other command line
(``--help``, ``status``, a usage error) goes to the click CLI unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path


def parse_run(args: list[str]) -> tuple[Path | None, bool] | None:
    """``(config_path, verbose)`` for a plain ``run`` command line, else None (click decides)."""
    if not args or args[0] != "run":
        return None
    config: Path | None = None
    verbose = False
    rest = iter(args[1:])
    for arg in rest:
        if arg in ("-v", "--verbose"):
            verbose = True
        elif arg == "--config":
            value = next(rest, None)
            if not value:
                return None
            config = Path(value)
        elif arg.startswith("--config=") and len(arg) > len("--config="):
            config = Path(arg.partition("=")[2])
        else:
            return None
    return config, verbose


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    parsed = parse_run(args)
    if parsed is None:
        from agent.cli import main as cli

        cli(args=args, prog_name="provision-agent")
        return
    from agent.runner import serve

    sys.exit(serve(*parsed))


if __name__ == "__main__":
    main()
