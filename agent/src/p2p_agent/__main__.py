"""Entry point of p2p-agent (not yet implemented beyond configuration)."""

from __future__ import annotations

import argparse
import sys

from p2p_common.settings import ConfigError
from p2p_agent.settings import AgentSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2p-agent")
    parser.add_argument("--config", help="YAML configuration file (the mounted ConfigMap)")
    args = parser.parse_args(argv)
    try:
        settings = AgentSettings.load(args.config)
    except ConfigError as exc:
        print(f"p2p-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    print(settings.dump())
    return 0


if __name__ == "__main__":
    sys.exit(main())
