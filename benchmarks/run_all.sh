#!/usr/bin/env bash
# Run every benchmark in turn and print each one's figures; docs/performance.md records a run.
# The flamegraph comparison uses the flamegraph.pl the flamegraph tests fetch into the test cache.
# bench_scale (last) builds its 1,000,000-session store once (~5 min, 5.7 GB under
# .builder-cache/bench-scale/) and reuses it afterwards.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FGPL=.builder-cache/test-assets/flamegraph.pl
for b in bench_codec bench_ingest bench_memory bench_overhead bench_analyzer bench_alert_latency bench_tracer bench_flamegraph bench_bes bench_partitions bench_scale; do
  extra=()
  [ "$b" = bench_flamegraph ] && [ -f "$FGPL" ] && extra=(--flamegraph-pl "$FGPL")
  echo "===== $b  (load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)) $(date +%T)"
  "$PY" -m "benchmarks.$b" "${extra[@]}" 2>&1 | tail -25
done
