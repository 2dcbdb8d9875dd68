#!/usr/bin/env bash
# GPU readiness in one script: under 8 minutes on one large GPU (H100/H200), one markdown
# file of tables.
#
#   benchmarks/gpu_check.sh [--out FILE.md] [--work DIR]   # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run                        # the same code path on CPU, tiny shapes
#
# Sections, each under its own time limit (a section that overruns is stopped, marked
# TIMED OUT in the report with the end of its log, and the next one runs):
#   tests     the kernel tests (tests/test_kernels.py, tests/test_sparse_rows.py) on CUDA
#             tensors, the Triton kernels compiled (TRITON_INTERPRET=0, SAEKIT_TEST_DEVICE=cuda)
#   kernels   benchmarks/gpu_kernels.py: the fused Triton encoder against F.linear + torch.topk
#             and the bare cuBLAS GEMM (d_in 768, d_sae 32768/131072, k 32/128, batch
#             4096/16384, fp32/bf16, peak memory), training steps, impl="auto"'s choice beside
#             the faster impl, AuxK active (10% dead) at d_in 2304
#   train     saekit train of all 12 hook_z hooks of a random GPT-2-small-shaped model
#             (saekit.training.shaped_models) for 1M tokens
#   torchrun  one process under torchrun with NCCL, compared with the same run without torchrun
# then benchmarks/gpu_check.py report assembles the tables into --out.
#
# --dry-run: CPU, the Triton interpreter (TRITON_INTERPRET=1), gloo instead of NCCL, tiny shapes
# and token budgets, and a 12-layer GPT-2 of width 64 for the model; tests/test_gpu_check.py
# runs it. The script needs a Python with saekit installed (`make install`): .venv/bin/python
# when it exists, else python3; PYTHON=... picks another. Exit code 0 when every section passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
WORK=runs/gpu_check
MD=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) MD=$2; shift ;;
        --work) WORK=$2; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
MD=${MD:-$WORK/gpu_check.md}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# The dtype of the `saekit train` section (saekit train --dtype): the model and its buffered
# activations; the SAE trains in float32 from them.
TRAIN_DTYPE=bfloat16

HOOKS='blocks.*.attn.hook_z'
if [ "$DRY" = 1 ]; then
    MODE=dry-run
    # one thread: tiny shapes need no more, and idle OpenMP threads spin on a busy shared CPU
    export TRITON_INTERPRET=1 SAEKIT_TEST_DEVICE=cpu OMP_NUM_THREADS=1
    DEVICE=cpu
    SHAPE=gpt2-narrow
    TESTS=("tests/test_kernels.py::test_encode_topk_matches_dense_reference[24-200-1-dtype0-triton]"
           "tests/test_sparse_rows.py::test_triton_sparse_row_kernels_strided_and_empty")
    KERNEL_ARGS=(--small)
    TINY=(--batch-size 256 --fill-tokens 504 --seq-len 64 --expansion 2 -k 8 --progress false)
    TRAIN_ARGS=(--hook "$HOOKS" --total-tokens 512 --eval-tokens 63 --checkpoint-every 1000000 "${TINY[@]}")
    TORCHRUN_ARGS=(--hook blocks.5.attn.hook_z --total-tokens 512 --checkpoint-every 1 --eval-tokens 0 "${TINY[@]}")
    # generous: the dry run checks that the code path works, and a shared CPU may be slow
    # (the whole dry run is about a minute of CPU time)
    LIMIT_TESTS=900; LIMIT_KERNELS=900; LIMIT_TRAIN=900; LIMIT_TORCHRUN=900
else
    MODE=gpu
    export TRITON_INTERPRET=0 SAEKIT_TEST_DEVICE=cuda
    DEVICE=cuda
    SHAPE=gpt2-small
    TESTS=(tests/test_kernels.py tests/test_sparse_rows.py)
    KERNEL_ARGS=()
    # no checkpoints in the timed run (12 SAEs with Adam: ~2.7 GB each time); torchrun's run writes two
    TRAIN_ARGS=(--hook "$HOOKS" --total-tokens 1000000 --checkpoint-every 1000000 --progress false)
    TORCHRUN_ARGS=(--hook blocks.5.attn.hook_z --total-tokens 204800 --checkpoint-every 25 --eval-tokens 0
                   --progress false)
    # 90 + 140 + 150 + 60 s, each + 5 s to stop, + the report: under 8 minutes in all
    LIMIT_TESTS=90; LIMIT_KERNELS=140; LIMIT_TRAIN=150; LIMIT_TORCHRUN=60
fi

rm -rf "$WORK/train" "$WORK/torchrun"
mkdir -p "$WORK"
: > "$WORK/sections.tsv"
FAILED=0

section() {  # section NAME LIMIT_S COMMAND...: run it under `timeout`, log and record its exit
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "gpu_check: $name (limit ${limit} s) ..." >&2
    timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" >> "$WORK/sections.tsv"
    echo "gpu_check: $name exit $rc after $(( $(date +%s) - start )) s" >&2
    [ "$rc" = 0 ] || FAILED=1
}

section tests "$LIMIT_TESTS" "$PYTHON" -m pytest -v -p no:cacheprovider "${TESTS[@]}"
section kernels "$LIMIT_KERNELS" "$PYTHON" benchmarks/gpu_kernels.py "${KERNEL_ARGS[@]}" --out "$WORK/kernels.md"
section train "$LIMIT_TRAIN" "$PYTHON" benchmarks/gpu_check.py train --shape "$SHAPE" --model-dir "$WORK/model-$SHAPE" \
    --run "$WORK/train" --device "$DEVICE" --dtype "$TRAIN_DTYPE" -- "${TRAIN_ARGS[@]}"
section torchrun "$LIMIT_TORCHRUN" "$PYTHON" benchmarks/gpu_check.py torchrun --shape "$SHAPE" \
    --model-dir "$WORK/model-$SHAPE" --dir "$WORK/torchrun" --device "$DEVICE" -- "${TORCHRUN_ARGS[@]}"
"$PYTHON" benchmarks/gpu_check.py report --work "$WORK" --out "$MD" --mode "$MODE" || FAILED=1
exit "$FAILED"
