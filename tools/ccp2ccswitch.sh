#!/usr/bin/env bash
# ccp2ccswitch.sh [flags] — runs tools/ccp2ccswitch.py from any directory; --input defaults to
# $CONFIG or the config.json beside ccproxy.py. Every flag of ccp2ccswitch.py is passed on.
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$DIR/ccp2ccswitch.py" --input "${CONFIG:-$DIR/../config.json}" "$@"
