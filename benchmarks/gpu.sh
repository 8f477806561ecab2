#!/usr/bin/env bash
# The GPU measurements of docs/performance.md ("On a GPU"), in two phases:
#
#   benchmarks/gpu.sh scaling OUTDIR TOKENIZER_DIR   CUDA tests; speed and memory of random-init
#                                                    models of real shapes (architectures.py)
#   benchmarks/gpu.sh real OUTDIR GGUF_FILE          the real SmolLM2: coarse to fine at 2,000 tokens
#                                                    against full token level; the evaluation suite
#
# Run from the repository root with the package importable (pip install -e ".[bench,evaluate]").
# Every step has its own time limit, so a slow step costs its own results only; each step writes
# its JSON as it goes.
set -u
phase=$1 out=$2 arg=$3
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%T)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s"
}
speed() {  # speed LIMIT NAME ARCHITECTURE SPEED-ARGS...
    local limit=$1 name=$2 arch=$3
    shift 3
    step "$limit" "$name" "$py" benchmarks/speed.py --architecture "$arch" --tokenizer "$tok" --device cuda \
        --dtype bfloat16 --long-run 2 --json "$out/$name.json" "$@"
}

case $phase in
scaling)
    tok=$arg
    step 50 cuda-tests "$py" -m pytest -q -p no:cacheprovider tests/test_engines.py -k cuda
    speed 60 gpu-smollm2-135m smollm2-135m --lengths 64 128 256 512
    speed 80 gpu-llama-8b-memory llama-8b --lengths 512 1024 2048 4096 \
        --methods plain atman-sentence captum-gxa captum-ig16
    speed 50 gpu-llama-1b llama-1b --lengths 256 1024
    speed 30 gpu-gemma3-270m gemma3-270m --lengths 128 512
    speed 40 gpu-llama-8b llama-8b --lengths 256 --methods plain atman-naive atman atman-lean captum-fa \
        captum-ig16 captum-gxa
    ;;
real)
    gguf=$arg
    step 100 gpu-refine-2000 "$py" benchmarks/refine.py --model "$gguf" --device cuda --tokens 2000 \
        --full --contexts 3 --json "$out/gpu-smollm2-refine-2000.json"
    step 110 evaluation "$py" -m atman evaluate --model "$gguf" --device cuda --quiet --qa 30 --squad 5 \
        --texts 8 -o "$out" --name evaluation-smollm2-gpu
    step 60 ablations "$py" -m atman evaluate --model "$gguf" --device cuda --quiet --ablations --qa 30 \
        --squad 5 --texts 8 -o "$out" --name ablations-smollm2-gpu
    ;;
*)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
