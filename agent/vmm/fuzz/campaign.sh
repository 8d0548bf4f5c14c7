#!/usr/bin/env bash
# Runs fuzz campaigns: every target (or those named) at once, each for SECONDS (default 620),
# without a sanitizer, on stable Rust. Each starts from its seeds (seeds/<target>/, read only)
# and grows corpus/<target>/ (not committed); crashes land in artifacts/<target>/. Logs and
# libFuzzer's final statistics go to campaign-logs/<target>.log.
#
#   ./campaign.sh                 # all five targets, 620 s each
#   SECONDS_EACH=60 ./campaign.sh virtio_blk
set -euo pipefail
cd "$(dirname "$0")"

seconds=${SECONDS_EACH:-620}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(virtio_blk virtio_rng virtio_net virtio_balloon virtio_mmio)
fi

nice -n 19 cargo fuzz build -s none
mkdir -p campaign-logs
pids=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    nice -n 19 cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=30 -print_final_stats=1 \
        >"campaign-logs/$target.log" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "${targets[$i]}: FAILED (see campaign-logs/${targets[$i]}.log, artifacts/${targets[$i]}/)"
        status=1
    fi
done
for target in "${targets[@]}"; do
    log="campaign-logs/$target.log"
    runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo '?')
    files=$(find "corpus/$target" -type f | wc -l)
    crashes=$(find "artifacts/$target" -type f \( -name 'crash-*' -o -name 'timeout-*' \
        -o -name 'oom-*' -o -name 'leak-*' \) 2>/dev/null | wc -l)
    echo "$target: ${runs} executions in ${secs} s, corpus ${files} files, ${crashes} crashes"
done
exit $status
