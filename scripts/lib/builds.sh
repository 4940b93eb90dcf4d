# Sourced by the walkthrough scripts, from the repository's root: sets
# `bin` and `demo` to the slipway and slipway-demo binaries they run.
#
# SLIPWAY_BIN and SLIPWAY_DEMO_BIN, when both set, name the builds to use
# instead of building here: tests/quickstarts.rs passes the suite's own,
# because a build here would relink binaries that other tests are running.
if [ -n "${SLIPWAY_BIN:-}" ] && [ -n "${SLIPWAY_DEMO_BIN:-}" ]; then
  bin=$SLIPWAY_BIN demo=$SLIPWAY_DEMO_BIN
  echo "==> using the builds $bin and $demo"
else
  echo "==> building slipway and the demo service (slipway-demo)"
  cargo build --quiet -p slipway -p slipway-demo
  bin="$PWD/target/debug/slipway" demo="$PWD/target/debug/slipway-demo"
fi
