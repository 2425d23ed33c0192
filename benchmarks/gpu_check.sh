#!/usr/bin/env bash
# One GPU check of ntk-ray, sized for one H200 and under 8 minutes (issue 15, item 6).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke         # the same parts at a tiny size on the CPU (the test)
#   bash benchmarks/gpu_check.sh --parts precision,select
#
# Parts (each under its own `timeout`; a part that fails or times out is recorded and the next
# one runs; the summary is rewritten after every part, so a killed run leaves partial results):
#   setup        a small random Llama (the CUDA-vs-CPU checks) and a ~1.1B-parameter one (hidden
#                2048, 16 layers, intermediate 5632, 32 heads, 8 kv heads, vocab 32000: TinyLlama's
#                shape) built from their configs with random weights into a local directory (no
#                hub), word-level tokenizers, synthetic prompt/response rows (benchmarks/_gpu_check.py)
#   precision    `ntk-ray features` of the same rows on the CPU in float32 (the reference) and on
#                the GPU in float32 and in bfloat16 (--dtype): per-row feature cosines and the
#                Spearman correlation of cosine scores, GPU float32 vs CPU, GPU bfloat16 vs GPU
#                float32 (the CountSketch's index_add_ atomics may change low bits on a GPU)
#   determinism  `ntk-ray select` twice on the GPU: identical ranked.parquet (id, rank, stage)?
#                and against the CPU's ranking: the overlap of the selected sets
#   features     benchmarks/bench_features.py --random-arch on the GPU: NTK features samples/s
#                against the fwd+bwd floor (the run bench_features_gpu.sh makes, smaller)
#   coarse       benchmarks/bench_coarse.py on the GPU with the 1.1B model: the Embedder's
#                tokens/s against the batched forward floor
#   select       a 100,000-row `ntk-ray select` with the 1.1B model (Ray executor, one GPU
#                actor): stage seconds and rows/s from its manifest
# Results: benchmarks/results/gpu_check.md (summary) and gpu_features.md, gpu_coarse.md (the
# benchmarks' reports); --results DIR writes them elsewhere (--smoke: a temporary directory).
#
# Environment: PYTHON (default .venv/bin/python, else python3) with the project's dependencies
# (torch with CUDA, transformers, peft, ray, polars, ...); nothing is installed or downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled

SMOKE=0
PARTS=setup,precision,determinism,features,coarse,select
RESULTS=""
RUN_PART=""  # internal: run one part in this process (each part is this script again under `timeout`)
ARGS=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --parts) PARTS=$2; shift ;;
        --results) RESULTS=$2; shift ;;
        --run-part) RUN_PART=$2; shift ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
export GPU_CHECK_WORK=$WORK
if [ "$SMOKE" = 1 ]; then
    RESULTS=${RESULTS:-$WORK/results}
    DEVICE=cpu; ACCEL=cpu; GPUDTYPE=float32
    SMALL=(--hidden 32 --layers 2 --intermediate 64 --heads 4 --kv-heads 2 --vocab 200)
    BIG=("${SMALL[@]}")
    ROWS=(--vocab 200 --domain 8 --pool 40 --min-words 4 --max-words 12)
    BIGROWS=(--vocab 200 --domain 8 --pool 200 --min-words 4 --max-words 12)
    T_SETUP=300 T_PRECISION=300 T_DETERMINISM=300 T_FEATURES=300 T_COARSE=300 T_SELECT=300  # caps: a loaded CPU
    FEATURES_ARGS=(--arch-hidden 32 --arch-layers 2 --arch-intermediate 64 --arch-heads 4 --arch-kv-heads 2
                   --arch-vocab 128 --samples 4 --less-samples 2 --dense-samples 2 --anchors 2 --dim 64
                   --max-length 32 --max-tokens 256 --pool-rows 200 --score-anchors 4 --topk 10 --repeats 1
                   --skip error dense less cli scoring)
    COARSE_ARGS=(--synthetic 40 --max-length 32 --repeats 1 --layers 1 --max-tokens 8)
    SELECT_ARGS=(--budget 10 --max-length 32 --proj-dim 64 --warmup-epochs 0.5 --executor local)
    CHECK_ARGS=(--budget 4 --max-length 32 --proj-dim 64 --warmup-epochs 0.5)
else
    RESULTS=${RESULTS:-$ROOT/benchmarks/results}
    DEVICE=cuda; ACCEL=gpu; GPUDTYPE=bfloat16
    SMALL=(--hidden 256 --layers 4 --intermediate 688 --heads 8 --kv-heads 4 --vocab 2000)
    BIG=(--hidden 2048 --layers 16 --intermediate 5632 --heads 32 --kv-heads 8 --vocab 32000)
    ROWS=(--vocab 2000 --domain 32 --pool 512 --min-words 16 --max-words 96)
    BIGROWS=(--vocab 32000 --domain 256 --pool 100000 --min-words 16 --max-words 60)
    T_SETUP=90 T_PRECISION=60 T_DETERMINISM=60 T_FEATURES=80 T_COARSE=60 T_SELECT=210
    FEATURES_ARGS=(--samples 256 --max-length 256 --max-tokens 16384 --anchors 32 --less-samples 8
                   --dense-samples 8 --repeats 2 --pool-rows 20000 --skip error cli dense)
    COARSE_ARGS=(--synthetic 8000 --max-length 128 --batch-tokens 32768 --repeats 2)
    SELECT_ARGS=(--budget 1000 --max-length 64 --warmup-epochs 1 --executor ray --accelerator gpu)
    CHECK_ARGS=(--budget 32 --max-length 128 --proj-dim 8192 --warmup-epochs 1)
fi
mkdir -p "$RESULTS"
SUMMARY=$RESULTS/gpu_check.md
START=$(date +%s)
ROWS_MD=()

write_summary() {
    {
        echo "# GPU check (benchmarks/gpu_check.sh$([ "$SMOKE" = 1 ] && echo ' --smoke'))"
        echo
        echo "- started $(date -u -d "@$START" '+%Y-%m-%d %H:%M:%S UTC' 2>/dev/null || date -u), device $DEVICE"
        echo "- machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo 'no nvidia-smi')"
        echo "- total so far: $(( $(date +%s) - START )) s"
        echo
        echo "| part | status | seconds | result |"
        echo "|---|---|---:|---|"
        for row in "${ROWS_MD[@]+"${ROWS_MD[@]}"}"; do echo "$row"; done
    } > "$SUMMARY"
}

# run_part NAME TIMEOUT: runs part_NAME (this script again, with --run-part NAME) under `timeout`,
# records its status, seconds and last output line
run_part() {
    local name=$1 limit=$2
    case ",$PARTS," in *",$name,"*) ;; *) return 0 ;; esac
    local t0 rc=0 log=$WORK/$name.log
    t0=$(date +%s)
    echo "== $name (timeout ${limit}s)"
    timeout -k 10 "$limit" bash "$0" "${ARGS[@]+"${ARGS[@]}"}" --results "$RESULTS" --run-part "$name" > "$log" 2>&1 || rc=$?
    local secs=$(( $(date +%s) - t0 )) status=ok
    [ "$rc" = 0 ] || status="FAILED (exit $rc)"
    [ "$rc" = 124 ] && status="TIMED OUT after ${limit}s"
    local last
    last=$(grep -v '^\s*$' "$log" | tail -1 | tr '|' '/' | cut -c1-400) || true
    ROWS_MD+=("| $name | $status | $secs | \`$last\` |")
    tail -5 "$log"
    [ "$rc" = 0 ] || { echo "-- $name: $status; its log:"; tail -30 "$log"; }
    write_summary
}

part_setup() {
    if [ "$SMOKE" = 0 ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
    fi
    "$PY" benchmarks/_gpu_check.py model "$WORK/small" "${SMALL[@]}" --device "$DEVICE"
    "$PY" benchmarks/_gpu_check.py data "$WORK/rows" "${ROWS[@]}"
    if [ "$SMOKE" = 1 ]; then ln -sfn "$WORK/small" "$WORK/big"; else
        "$PY" benchmarks/_gpu_check.py model "$WORK/big" "${BIG[@]}" --device "$DEVICE"; fi
    "$PY" benchmarks/_gpu_check.py data "$WORK/bigrows" "${BIGROWS[@]}"
}

ntk() { "$PY" -m ntk_ray "$@"; }

part_precision() {
    local common=(--data "$WORK/rows/pool.jsonl" --model "$WORK/small" --executor local --proj-dim 8192 --seed 0)
    ntk features "${common[@]}" --out "$WORK/f-cpu32" --accelerator cpu --dtype float32 --quiet
    ntk features "${common[@]}" --out "$WORK/f-dev32" --dtype float32 --quiet
    ntk features "${common[@]}" --out "$WORK/f-devlow" --dtype "$GPUDTYPE" --quiet
    echo "GPU float32 vs CPU float32: $("$PY" benchmarks/_gpu_check.py features "$WORK/f-cpu32" "$WORK/f-dev32")"
    echo "GPU $GPUDTYPE vs GPU float32: $("$PY" benchmarks/_gpu_check.py features "$WORK/f-dev32" "$WORK/f-devlow")"
}

part_determinism() {
    local common=(--domain "$WORK/rows/domain.jsonl" --pool "$WORK/rows/pool.jsonl" --model "$WORK/small" --seed 0
                  --executor local --quiet "${CHECK_ARGS[@]}")
    ntk select "${common[@]}" --out "$WORK/s-dev-1"
    ntk select "${common[@]}" --out "$WORK/s-dev-2"
    ntk select "${common[@]}" --out "$WORK/s-cpu" --accelerator cpu --dtype float32
    echo "CPU vs GPU: $("$PY" benchmarks/_gpu_check.py rankings "$WORK/s-cpu" "$WORK/s-dev-1")"
    echo "GPU run 1 vs run 2: $("$PY" benchmarks/_gpu_check.py rankings "$WORK/s-dev-1" "$WORK/s-dev-2")"
}

part_features() {
    local extra=()
    [ "$SMOKE" = 1 ] || extra=(--bf16)
    "$PY" benchmarks/bench_features.py --random-arch --device "$DEVICE" "${extra[@]+"${extra[@]}"}" \
        "${FEATURES_ARGS[@]}" --out "$RESULTS/gpu_features.md"
    grep -E "within 1.5x of the floor" "$RESULTS/gpu_features.md" | head -2 | tr '\n' ' '; echo
}

part_coarse() {
    "$PY" benchmarks/bench_coarse.py --device "$DEVICE" --model "$WORK/big" "${COARSE_ARGS[@]}" \
        --out "$RESULTS/gpu_coarse.md"
}

part_select() {
    local t0 out=$WORK/s-100k
    t0=$(date +%s)
    ntk select --domain "$WORK/bigrows/domain.jsonl" --pool "$WORK/bigrows/pool.jsonl" --model "$WORK/big" \
        --out "$out" --seed 0 --quiet "${SELECT_ARGS[@]}"
    "$PY" - "$out/manifest.json" "$(( $(date +%s) - t0 ))" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
c, s = m["counts"], m.get("stage_seconds", {})
rows = c["pool_rows"]
print(json.dumps({"pool_rows": rows, "selected": c["selected"], "wall_s": int(sys.argv[2]), "model_dtype": m["model"].get("dtype"),
                  "stage_seconds": {k: round(v, 1) for k, v in s.items()},
                  "embed_rows_per_s": round(rows / s["embed"], 1) if s.get("embed") else None}))
EOF
}

if [ -n "$RUN_PART" ]; then
    "part_$RUN_PART"
    exit 0
fi
write_summary
run_part setup "$T_SETUP"
run_part precision "$T_PRECISION"
run_part determinism "$T_DETERMINISM"
run_part features "$T_FEATURES"
run_part coarse "$T_COARSE"
run_part select "$T_SELECT"
write_summary
echo "total: $(( $(date +%s) - START )) s; summary: $SUMMARY"
cat "$SUMMARY"
grep -q "FAILED\|TIMED OUT" "$SUMMARY" && exit 1
exit 0
