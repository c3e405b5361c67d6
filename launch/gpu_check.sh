#!/usr/bin/env bash
# The GPU job of docs/benchmarks.md: one run on the H200 machine, every log under $OUT.
#
#   bash launch/gpu_check.sh --prepare          # here, where PyPI is reachable: the cp312 wheels the GPU machine
#                                               # lacks (omegaconf, wandb, deepspeed, torchao and their missing deps)
#                                               # and the plain-PyTorch anchor, into .gpu/ (git-ignored; carry it)
#   OUT=/some/dir bash launch/gpu_check.sh      # on the GPU machine: part "core" (about 7 minutes)
#   OUT=/some/dir bash launch/gpu_check.sh --part levers   # the second run: each lever on the 8B recipe
#   bash launch/gpu_check.sh --cpu-smoke        # the rehearsal on a CPU: every step of both parts, tiny sizes
#
# core:   install the wheels; the environment; tests/gpu/ (4 workers); launch/bench.py on llama1b_1gpu and
#         llama8b_1gpu (planner vs tracker vs allocator, the per-phase split, a trace); the anchor
#         (plain_torch_llama.py) on the same shapes in the same job; the table (launch/bench.py --report).
# levers: llama8b_1gpu with one change at a time (SDPA kernel, SAC policy, FSDP2 bf16 parameters, chunked loss,
#         float8 tensorwise and rowwise) and the anchor with each SDPA kernel.
# Files under $OUT (the device tool brings back 8): gpu_check.log, env.txt, gpu_tests.log, results.jsonl,
# anchor.log, report.md, trace.json.gz.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
MODE=gpu
PART=core
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --cpu-smoke) MODE=smoke ;;
    --part) PART=${2:?--part core or levers}; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --prepare, --cpu-smoke or --part core|levers)" >&2; exit 2 ;;
  esac
  shift
done
case "$PART" in core|levers|all) ;; *) echo "gpu_check.sh: --part $PART: use core, levers or all" >&2; exit 2 ;; esac
cd "$REPO"
GPU_DIR=${GPU_DIR:-$REPO/.gpu}
if [ "$MODE" = gpu ]; then PY=${PYTHON:-python3}; else PY=${PYTHON:-$REPO/.venv/bin/python}; fi

if [ "$MODE" = prepare ]; then
  set -e
  mkdir -p "$GPU_DIR/wheels"
  PLAT="--python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:"
  # with their dependencies, except what the GPU image has (torch, numpy, the CUDA libraries: none of these pull them)
  "$PY" -m pip download -q --dest "$GPU_DIR/wheels" $PLAT omegaconf==2.4.0 wandb==0.31.0 pydantic==2.14.4 hjson
  "$PY" -m pip download -q --no-deps --dest "$GPU_DIR/wheels" $PLAT torchao==0.18.0
  # DeepSpeed publishes a source archive only: built here into a pure-Python wheel (its ops compile on first use)
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$GPU_DIR/wheels"
  if [ -f "$REPO/../shared/bench/plain_torch_llama.py" ]; then
    cp "$REPO/../shared/bench/plain_torch_llama.py" "$GPU_DIR/plain_torch_llama.py"
  else
    echo "gpu_check.sh: no ../shared/bench/plain_torch_llama.py beside this checkout: the anchor is not carried" >&2
  fi
  du -sh "$GPU_DIR"
  ls "$GPU_DIR/wheels"
  exit 0
fi

OUT=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} WANDB_SILENT=true
T0=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run it under a time limit; a failed step is logged and the job goes on
  local name=$1 limit=$2; shift 2
  echo "== $name: start at +$(( $(date +%s) - T0 ))s (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: rc=$rc at +$(( $(date +%s) - T0 ))s"
  [ "$rc" = 0 ] || FAILED+=("$name (rc=$rc)")
  return 0
}
FAILED=()
ANCHOR=${ANCHOR_SCRIPT:-$GPU_DIR/plain_torch_llama.py}  # (ANCHOR_SCRIPT: another copy of it)
[ -f "$ANCHOR" ] || [ -n "${ANCHOR_SCRIPT:-}" ] || ANCHOR=$REPO/../shared/bench/plain_torch_llama.py
APPEND=(bash -c 'out=$1; shift; "$@" >> "$out" 2>&1' append)  # APPEND FILE COMMAND...: output into FILE
anchor() {  # anchor NAME [VAR=value ...] -- ARGS...: the plain-PyTorch anchor, its lines appended to anchor.log
  local name=$1 envs=()
  shift
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  if [ ! -f "$ANCHOR" ]; then
    echo "== $name: no plain_torch_llama.py in .gpu/ or ../shared/bench/"
    [ "$MODE" = smoke ] || FAILED+=("$name: the anchor is missing (bash launch/gpu_check.sh --prepare beside ../shared)")
    return 0
  fi
  step "$name" 420 "${APPEND[@]}" "$OUT/anchor.log" env "${envs[@]}" "$PY" "$ANCHOR" "$@"
}

# the tiny stand-in for the GPU recipes in the rehearsal
# (the anchor's "tiny" shape: the same parameters, so the ratio column is exercised too)
TINY_ARGS=(model.dim=64 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2 model.vocab_size=256 model.ffn_hidden_dim=128
           training.seq_len=32 training.micro_batch_size=2 training.global_batch_size=2 training.device=cpu
           parallel.compile=false)
bench() {  # bench NAME RECIPE OVERRIDES...: launch/bench.py, its JSON appended to results.jsonl
  local name=$1 recipe=$2; shift 2
  local extra=(steps=8 warmup=3 profile_steps=1)
  [ "$PART" = core ] || extra=(steps=4 warmup=2 profile_steps=0)
  [ "$MODE" = smoke ] && extra=(steps=2 warmup=1 profile_steps=1 "${TINY_ARGS[@]}")
  step "bench $name" 420 "$PY" launch/bench.py "recipe=$recipe" "$@" "${extra[@]}" "run_dir=$SCRATCH/$name" \
    "out=$SCRATCH/$name.json"
  [ -f "$SCRATCH/$name.json" ] && "$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" \
    "$SCRATCH/$name.json" >> "$OUT/results.jsonl"
  return 0
}

echo "gpu_check.sh mode=$MODE part=$PART repo=$REPO out=$OUT date=$(date -u +%FT%TZ)"
if [ "$MODE" = gpu ]; then
  step "install the carried wheels" 180 "$PY" -m pip install -q --no-index --find-links "$GPU_DIR/wheels" \
    omegaconf wandb deepspeed torchao
else  # the rehearsal: every wheel there, each installable on Python 3.12 / x86-64 (a dry run into a scratch target)
  for pkg in omegaconf wandb deepspeed torchao; do
    ls "$GPU_DIR"/wheels/"$pkg"-*.whl >/dev/null 2>&1 || FAILED+=("missing wheel: $pkg (run bash launch/gpu_check.sh --prepare)")
  done

  step "wheels resolve for cp312" 120 "$PY" -m pip install -q --dry-run --no-deps --no-index --target "$SCRATCH/target" \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --only-binary=:all: "$GPU_DIR"/wheels/*.whl
fi
{
  nvidia-smi 2>/dev/null || echo "nvidia-smi: none (a CPU machine)"
  "$PY" - <<'EOF'
import importlib, json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for mod in ("omegaconf", "wandb", "deepspeed", "torchao", "transformers", "triton", "xdist"):
    try:
        info[mod] = getattr(importlib.import_module(mod), "__version__", "present")
    except Exception as e:  # noqa: BLE001 - a probe
        info[mod] = f"missing ({type(e).__name__})"
print(json.dumps(info, indent=1))
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$PART" = core ] || [ "$PART" = all ]; then
  WORKERS=()
  "$PY" -c "import xdist" 2>/dev/null && WORKERS=(-n 4 --dist loadfile)
  step "tests/gpu" 300 "${APPEND[@]}" "$OUT/gpu_tests.log" "$PY" -m pytest -q tests/gpu "${WORKERS[@]}" -p no:cacheprovider -rs -v
  tail -25 "$OUT/gpu_tests.log"
  bench llama1b_1gpu llama1b_1gpu
  if [ -f "$SCRATCH/llama1b_1gpu/profile/bench-rank0.pt.trace.json" ]; then
    gzip -c "$SCRATCH/llama1b_1gpu/profile/bench-rank0.pt.trace.json" > "$OUT/trace.json.gz"
  fi
  bench llama8b_1gpu llama8b_1gpu
  if [ "$MODE" = smoke ]; then
    anchor "anchor" ANCHOR_SMOKE=1 -- 0 1
  else  # its 1.5B row with compile and no AC, and its 8B row with SAC, compile and Adafactor
    anchor "anchor" -- 1 8
  fi
fi
if [ "$PART" = levers ] || [ "$PART" = all ]; then
  if [ "$MODE" = smoke ]; then F8=(training.float8_emulate=true); KERNELS=(flash); else F8=(); KERNELS=(flash cudnn efficient); fi
  bench base llama8b_1gpu
  for k in "${KERNELS[@]}"; do bench "attention_$k" llama8b_1gpu "model.attention=$k"; done
  bench sac_every_second llama8b_1gpu parallel.sac_matmuls=every_second
  bench fsdp_bf16_params llama8b_1gpu parallel.data=fsdp
  bench loss_chunks_8 llama8b_1gpu training.loss_chunks=8
  bench float8_tensorwise llama8b_1gpu training.float8=tensorwise "${F8[@]}"
  bench float8_rowwise llama8b_1gpu training.float8=rowwise "${F8[@]}"
  if [ "$MODE" = smoke ]; then
    anchor "anchor, flash" ANCHOR_SMOKE=1 ANCHOR_SDPA=flash -- 0
  else
    for k in cudnn flash; do anchor "anchor, $k" "ANCHOR_SDPA=$k" -- 8; done
  fi
fi
if [ -f "$OUT/results.jsonl" ]; then
  ANCHOR_LOGS=()
  [ -f "$OUT/anchor.log" ] && ANCHOR_LOGS=("$OUT/anchor.log")
  step "report" 60 "${APPEND[@]}" "$OUT/report.md" "$PY" launch/bench.py --report "$OUT/results.jsonl" "${ANCHOR_LOGS[@]}"
  cat "$OUT/report.md"
fi
rm -rf "$SCRATCH"
echo "gpu_check.sh: done in $(( $(date +%s) - T0 ))s; files: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'gpu_check.sh: failed: %s\n' "${FAILED[@]}"
  exit 1
fi
