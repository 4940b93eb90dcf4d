#!/bin/sh
# A stand-in deploy step: prints what it does, takes $2 seconds.
set -eu
name="$1"
secs="${2:-1}"
echo "$name: starting (deployment $SLIPWAY_DEPLOYMENT, attempt $SLIPWAY_ATTEMPT, revision $(echo "$SLIPWAY_REVISION" | cut -c1-12))"
i=0
while [ "$i" -lt "$secs" ]; do
  sleep 1
  i=$((i + 1))
  echo "$name: step $i/$secs done"
done
echo "$name: finished" >&2
