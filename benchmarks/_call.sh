. benchmarks/gpu_env.sh; export UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi -L > $OUT/gpu.txt; git log --oneline -1 >> $OUT/gpu.txt 2>/dev/null
start=$(date +%s)
timeout 150 python -m pytest -q -x -p no:cacheprovider tests/test_cuda_graphs.py > $OUT/t_graphs.txt 2>&1; echo "graphs rc $? $(( $(date +%s)-start ))s" >> $OUT/log.txt
timeout 60 python benchmarks/glu_weighted.py --out $OUT/glu_weighted > $OUT/glu.txt 2>&1; echo "glu rc $? $(( $(date +%s)-start ))s" >> $OUT/log.txt
timeout 270 python benchmarks/moe_bench.py --steps 4 --warmup 2 --impls hf fastft fastft_graphs --experts-tokens --out $OUT/moe_qwen3_30b_a3b_48l_shared_buffers > $OUT/moe.txt 2>&1; echo "moe rc $? $(( $(date +%s)-start ))s" >> $OUT/log.txt
left=$(( 580 - ($(date +%s)-start) ))
timeout $left python -m pytest -q -p no:cacheprovider tests/test_glu.py tests/test_moe.py tests/test_moe_gpt_oss.py -m "not slow" > $OUT/t_kernels.txt 2>&1; echo "kernels rc $? $(( $(date +%s)-start ))s" >> $OUT/log.txt
cat $OUT/log.txt; tail -3 $OUT/t_graphs.txt $OUT/t_kernels.txt; cat $OUT/glu.txt | tail -15; tail -25 $OUT/moe.txt
