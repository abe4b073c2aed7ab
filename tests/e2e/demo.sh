#!/usr/bin/env bash
# The README's main command, checked: scripts/demo runs the demo project
# through liminald into PostgreSQL and asserts what it shows (stability
# classes, the telling signal first in the causality trail, co-failures).
# 16 runs: the coin-toss tests then both pass and fail with near certainty
# (a 35% failure chance never failing in 16 runs: 0.1%), and the check on
# the causality trail only asks for a failure with passing runs before it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
exec "$root/scripts/demo" --runs 16 --check
