#!/usr/bin/env bash
# scripts/multi_gpu_all.sh — the several-GPU runs only, on every GPU of one machine (W = the GPU
# count), from a prebuilt tree (BUILD_DIR, see scripts/pack_gpu_tree.sh); logs to ${OUT:-out}/.
#   BUILD_DIR=build-wt OUT=/tmp/out bash scripts/multi_gpu_all.sh
# 1. correctness: `fusedmoe run --transport nccl` under mpirun (fp32; fp32 with a skewed gate),
#    examples/fused_torchrun.py under torchrun (bf16, fp32, bf16 with a skewed gate: every rank's
#    rows against W emulated ranks on one GPU), scripts/multi_gpu_train_check.py (a training step, expert parallel, skewed
#    routing with experts that get no tokens, against one process on all tokens; fp32, bf16);
# 2. speed: scripts/multi_gpu_bench.py (E 32, k 2, H = I = 2048, T 4K/8K/16K per GPU, bf16 and
#    fp32: fused / modular + all_to_all / torch all_to_all + _grouped_mm / all_to_all alone), the
#    decode shape, and T = 8K per GPU on one GPU (the weak-scaling base).
# NCCL_NVLS_ENABLE=0 throughout: no NVLink multicast.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
BUILD_DIR=${BUILD_DIR:-build-gpu}
export NCCL_NVLS_ENABLE=0
export LD_LIBRARY_PATH="$PWD/$BUILD_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FUSEDMOE_OPS_LIBRARY="$PWD/$BUILD_DIR/python/fusedmoe/_fusedmoe_ops.so"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${FUSEDMOE_NCCL_LIBRARY:-}" ]; then
  torch_nccl=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib', 'libnccl.so.2'))" 2>/dev/null)
  [ -n "$torch_nccl" ] && [ -f "$torch_nccl" ] && export FUSEDMOE_NCCL_LIBRARY="$torch_nccl"
fi
W=$(nvidia-smi -L | wc -l)
status=0
T0=$SECONDS
step() { echo; echo "== $* ($((SECONDS - T0)) s)"; }
log="$OUT/multi_gpu.log"
: >"$log"

step "device: $W GPUs"
nvidia-smi --query-gpu=index,name,memory.total,power.limit --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -$((W + 2))

mpi() {
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 240 mpirun -np "$W" \
    -x LD_LIBRARY_PATH -x FUSEDMOE_NCCL_LIBRARY -x NCCL_NVLS_ENABLE "$BUILD_DIR/cli/fusedmoe" run \
    --transport nccl --world-size "$W" "$@" >>"$log" 2>&1 || status=1
}
step "fusedmoe run --transport nccl under mpirun -np $W: fp32"
mpi --dtype fp32 --tokens $((512 * W))
grep -E "^rank" "$log" | tail -$((2 * W))
step "fusedmoe run --transport nccl under mpirun -np $W: fp32, skewed gate (--gate-scale 8)"
mpi --dtype fp32 --tokens $((1024 * W)) --gate-scale 8
grep -E "^rank" "$log" | tail -$((2 * W))

trun() { timeout 300 python3 -m torch.distributed.run --nproc_per_node "$1" "${@:2}" >>"$log" 2>&1 || status=1; }
for dtype in bf16 fp32; do
  step "examples/fused_torchrun.py under torchrun, $dtype"
  trun "$W" examples/fused_torchrun.py --dtype "$dtype" --tokens 4096
  grep -E "^rank .*(PASS|FAIL)|Error" "$log" | tail -"$W"
done
step "examples/fused_torchrun.py under torchrun, bf16, skewed gate (experts with no tokens)"
trun "$W" examples/fused_torchrun.py --dtype bf16 --tokens 4096 --skew
grep -E "^rank .*(PASS|FAIL)|Error" "$log" | tail -"$W"
for dtype in fp32 bf16; do
  step "training step across $W GPUs equals one process, $dtype"
  trun "$W" scripts/multi_gpu_train_check.py --dtype "$dtype"
  grep -E "PASS|FAIL|Error" "$log" | tail -"$W"
done

step "latency table: E 32, k 2, H = I = 2048, bf16 and fp32, W = $W"
trun "$W" scripts/multi_gpu_bench.py --out "$OUT/table_w$W"
grep -E "^W=|Error" "$log" | tail -8
step "decode: T 128 per GPU, H 7168, I 2048, E 256, k 8, bf16, W = $W"
trun "$W" scripts/multi_gpu_bench.py --tokens 128 --hidden 7168 --ffn 2048 --experts 256 --top-k 8 --dtypes bf16 \
  --out "$OUT/decode_w$W"
grep -E "^W=|Error" "$log" | tail -4
step "weak-scaling base: T 8K on one GPU"
trun 1 scripts/multi_gpu_bench.py --tokens 8192 --out "$OUT/base_w1"
grep -E "^W=|Error" "$log" | tail -4
step "done, status $status"
exit $status
