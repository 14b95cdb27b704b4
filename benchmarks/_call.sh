. benchmarks/gpu_env.sh; export UNSLOTH_DISABLE_STATISTICS=1
start=$(date +%s)
log() { echo "$1 rc $2 $(( $(date +%s)-start ))s" >> $OUT/log.txt; }
B="python benchmarks/moe_bench.py --steps 4 --warmup 2 --batches 4 --experts-tokens --checkpointing auto"
timeout 170 $B --impls hf fastft_graphs --memory-budget-gib 75 --out $OUT/moe_auto_75 > $OUT/moe_a.txt 2>&1; log "auto75" $?
timeout 110 $B --impls fastft_graphs --memory-budget-gib 78 --out $OUT/moe_auto_78 > $OUT/moe_b.txt 2>&1; log "auto78" $?
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_memory_plan.py tests/test_moe.py -m "not slow" -k "not fastft_moe_matches" > $OUT/t.txt 2>&1; log "tests" $?
left=$(( 585 - ($(date +%s)-start) ))
timeout $left $B --impls fastft_graphs --memory-budget-gib 73 --out $OUT/moe_auto_73 > $OUT/moe_c.txt 2>&1; log "auto73" $?
grep -E "passed|failed|error" $OUT/t.txt | tail -5 >> $OUT/log.txt; grep -E "^FAILED|^ERROR" $OUT/t.txt | head >> $OUT/log.txt
cat $OUT/log.txt; grep -h "^| " $OUT/moe_auto_*.md; grep -h "plan\|Traceback\|Error" $OUT/moe_?.txt | head -20
