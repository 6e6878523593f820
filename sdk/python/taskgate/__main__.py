"""`python -m taskgate worker mymodule:worker` runs the Worker object named there."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from taskgate.worker import Worker


def load(target: str) -> Worker:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"expected module:attribute, got {target!r}")
    sys.path.insert(0, os.getcwd())
    worker = getattr(importlib.import_module(module_name), attribute, None)
    if callable(worker) and not isinstance(worker, Worker):
        worker = worker()  # a factory
    if not isinstance(worker, Worker):
        raise SystemExit(f"{target} is not a taskgate.Worker")
    return worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskgate")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("worker", help="run a Worker: python -m taskgate worker mymodule:worker")
    run.add_argument("target", help="module:attribute of a taskgate.Worker (or a function returning one)")
    run.add_argument("--log-level", default=os.environ.get("TASKGATE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    load(args.target).run()


if __name__ == "__main__":
    main()
