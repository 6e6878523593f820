#!/bin/sh
# Entry point of both images: `python -m app <command>` with signals delivered to Python.
set -e
exec python -m app "$@"
