#!/usr/bin/env bash
# ccp2cliproxy.sh [flags] — runs tools/ccp2cliproxy.py from any directory; --input defaults to
# $CONFIG or the config.json beside ccproxy.py. Every flag of ccp2cliproxy.py is passed on.
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$DIR/ccp2cliproxy.py" --input "${CONFIG:-$DIR/../config.json}" "$@"
