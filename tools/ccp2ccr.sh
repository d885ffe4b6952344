#!/usr/bin/env bash
# ccp2ccr.sh [flags] — runs tools/ccp2ccr.py from any directory; --input defaults to
# $CONFIG or the config.json beside ccproxy.py. Every flag of ccp2ccr.py is passed on.
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$DIR/ccp2ccr.py" --input "${CONFIG:-$DIR/../config.json}" "$@"
