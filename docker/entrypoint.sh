#!/bin/sh
# Container entrypoint: start the agent node, `python -m agent_runtime "$@"`.
#
# As PID 1 a plain Python process neither gets default signal handling (SIGTERM
# from `docker stop` would be ignored unless handled) nor reaps orphaned
# children, and agents spawn plenty of subprocesses. So when we are PID 1 and
# tini is installed (the bookworm base has it), run the node under tini. If the
# container already has an init (`docker run --init`) or the base image lacks
# tini (e.g. python:3.11-slim), exec Python directly.
set -eu

if [ "$$" = 1 ] && command -v tini >/dev/null 2>&1; then
    exec tini -- python -m agent_runtime "$@"
fi
exec python -m agent_runtime "$@"
