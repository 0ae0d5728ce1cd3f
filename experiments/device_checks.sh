#!/usr/bin/env bash
# Issue 8's GPU checks as one prepared script, for a session that is lent a
# GPU machine for a few minutes (README, "Step-time benchmark").
#
# Each part fits one device call (at most 10 minutes), and every section runs
# under a share of a deadline, so a slow compile costs that section only and
# the files of the others still come back. Results, at most 8 files, go to
# $OUT (the device tool's folder; default runs/device_checks):
#   summary.md       every section's Markdown table, in order
#   log.txt          everything the sections printed
#   results.tar.gz   every section's workdir (benchmark.json, levers.json, ...),
#                    without its compilation caches
#
# Part 1 (default), at most BUDGET_S (9 minutes), sized from the H100 compile
# times of an earlier session:
#   ResNet steps (single b16, 4-level MGE by mesh, single b240) at 64/128/256^2;
#   mesh-free conv vs 3x3 conv; time to the first UNet MGE step (cold, warm
#   XLA cache, warm step cache); UNet steps (b16, MGE) at 64^2.
# Part 2: UNet steps at 128^2, then levers in one process each: model passes
#   one after another (--sequential off/on) and bfloat16 compute, ResNet MGE
#   by mesh at 64/128/256^2.
# Part 3: compile-time levers for the UNet MGE step at 64^2 (the first step's
#   cold compile took 58 s on an H200, against a 20 s target). Each cold
#   compile runs in a fresh process with empty caches, because XLA's
#   autotuner keeps its results in memory for the rest of a process: XLA's
#   defaults, then the step as one program per mesh (--split-step,
#   mgtrain.split_step: its programs compile side by side on the host's
#   cores; cold, then warm from the caches), then
#   --xla_gpu_autotune_level=1 (keeps autotuning, skips its
#   buffer initialisation and correctness checks), then JAX's threefry PRNG
#   lowered to one CUDA kernel (JAX_THREEFRY_GPU_KERNEL_LOWERING; the UNet's
#   initialiser is mostly random-number kernels), then the initialiser run on
#   the host CPU (--init-platform cpu; on CPU its parameters' sha256 begins
#   6337712d510a). Each run prints the initial parameters' sha256, to show
#   whether a flag changed them. The split step's step time against one
#   program comes right after its first-step runs (it decides whether the
#   split step could be the GPU's default too); later, the step time under
#   autotune level 1 against the default (one process, interleaved rounds),
#   a cold compile under --xla_gpu_force_compilation_parallelism=16, and
#   bfloat16 compute for the ResNet at 256^2, which part 2 did not reach.
# Part 4: where the GPU's time goes (python -m experiments.profile_step, ms
#   per HLO instruction): the ResNet's MGE step by mesh and its single b16
#   step at 64^2 (the MGE step is latency-bound there: 3.50x against the
#   4x target), the same MGE step with XLA's command buffers off (so that
#   each kernel is traced on its own), the mesh-free conv and the 3x3 conv
#   at 128 channels, 128^2, batch 16, and the UNet's MGE step at 64^2. Then
#   the UNet's MGE step at 128^2 in float32 and bfloat16 compute (30.2 ms in
#   float32 on the H200, against a 25 ms target).
# Part 5: a whole Full-Multiscale training run (experiments.denoise, cpu4
#   config: four stages at 64^2, cold caches) without and with
#   --compile-ahead, which compiles the later stages' steps in a background
#   thread while the GPU trains.
#
# On the device machine, from the repository root, with dm-pix carried as a
# wheel in .whl (the device README says how to download it):
#   bash experiments/device_checks.sh 1
# Here, in seconds, to check the plumbing (the tests do this):
#   CONFIG=smoke DEVICE=cpu OUT=/tmp/dc bash experiments/device_checks.sh 1
# and, to list what a part would run on the GPU without running anything (the
# tests parse every command it lists with its module's own parser):
#   DRY_RUN=1 OUT=/tmp/dc bash experiments/device_checks.sh 3
#
# Environment: OUT (results), CONFIG (gpu | smoke; default gpu), DEVICE
# (passed to the benchmark's --device; default: what JAX finds), BUDGET_S
# (seconds for the whole part; default 540), WORK (scratch folder), DRY_RUN
# (non-empty: write each section's limit and command, shell-quoted, to
# summary.md, and run nothing).
set -uo pipefail

part="${1:-1}"
case "$part" in
  1|2|3|4|5) ;;
  *) echo "usage: $0 [1|2|3|4|5]  (part 1: steps, mfc, first step; part 2: UNet 128^2," \
          "levers; part 3: compile levers; part 4: profiles; part 5: compile ahead)" >&2
     exit 2 ;;
esac

CONFIG="${CONFIG:-gpu}"
case "$CONFIG" in
  gpu|smoke) ;;
  *) echo "CONFIG must be gpu or smoke, not '$CONFIG'" >&2; exit 2 ;;
esac
OUT="${OUT:-runs/device_checks}"
dry_run="${DRY_RUN:-}"
# A dry run names a scratch folder without making it.
WORK="${WORK:-$(mktemp -d ${dry_run:+-u} /tmp/mgtrain_device_checks.XXXXXX)}"
BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT"
[ -n "$dry_run" ] || mkdir -p "$WORK"
log="$OUT/log.txt"
summary="$OUT/summary.md"
: >"$log"
echo "# mgtrain device checks, part $part, config $CONFIG${dry_run:+, dry run} ($(date -u +%FT%TZ))" >"$summary"

# Carried wheels (dm-pix is not on the GPU machine), as the device README does it.
if [ -z "$dry_run" ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

device_args=()
[ -n "${DEVICE:-}" ] && device_args=(--device "$DEVICE")

[ -n "$dry_run" ] || {
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} >>"$log" 2>&1

start=$(date +%s)

# section NAME SHARE TABLE_FILE COMMAND...: runs COMMAND (which may start
# with `env VAR=value`) with --workdir
# $WORK/NAME under a limit of SHARE percent of the budget (or what is left,
# if less), then appends its table to the summary.
section() {
  local name="$1" share="$2" table="$3"
  shift 3
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  local limit=$(( BUDGET_S * share / 100 ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "## $name: skipped, ${left}s of the budget left" | tee -a "$log" >>"$summary"
    return
  fi
  if [ -n "$dry_run" ]; then
    printf '\n## %s (dry run, limit %ss)\n\n`%s--workdir %q`\n' "$name" "$limit" \
      "$(printf '%q ' "$@")" "$WORK/$name" >>"$summary"
    return
  fi
  echo "== $name (limit ${limit}s): $*" >>"$log"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" --workdir "$WORK/$name" >>"$log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  {
    echo
    echo "## $name (rc $rc, ${took}s)"
    echo
    echo "\`$*\`"
    echo
    if [ -f "$WORK/$name/$table" ]; then cat "$WORK/$name/$table"; else echo "(no $table: see log.txt)"; fi
  } >>"$summary"
  echo "== $name: rc $rc in ${took}s" >>"$log"
}

bench=(python3 -m experiments.benchmark --config "$CONFIG" "${device_args[@]}")
levers=(python3 -m experiments.levers)
profile=(python3 -m experiments.profile_step "${device_args[@]}")
if [ "$CONFIG" = smoke ]; then
  profile+=(--config smoke --calls 2); layer_args=(); fm_config=smoke
  resnet_sizes=(); unet_sizes_1=(); unet_sizes_2=(); lever_sizes=(); lever_size_256=()
  # Smoke mode puts the ResNet in the UNet's place wherever the UNet adds
  # nothing to a check of the script's plumbing: its 16^2 steps compile for
  # 20-30 s even there. Part 4 still profiles the UNet.
  unet_models=(--models resnet); unet_lever=(--model resnet); unet_lever_128=(); repeats=(--repeats 1)
  levers+=(--config smoke)
else
  resnet_sizes=(--sizes 64 128 256); unet_sizes_1=(--sizes 64); unet_sizes_2=(--sizes 128)
  lever_sizes=(--sizes 64 128 256); lever_size_256=(--sizes 256)
  unet_models=(--models unet)
  unet_lever=(--model unet --sizes 64); unet_lever_128=(--model unet --sizes 128)
  repeats=(--repeats 10)
  profile+=(--config paper --calls 5); layer_args=(--size 128 --channels 128 --batch 16)
  fm_config=cpu4
fi

# Shares follow the H100 compile times of docs/benchmark_h100.md: the ResNet
# steps compiled for 137 s in all (the 256^2 b240 step 48 s of it), the UNet's
# MGE step for 66-75 s and its b16 step for about 30 s per size. On the H200
# (2026-12-04) the mesh-free conv section needed 44-100 s, hence its 20%.
if [ "$part" = 1 ]; then
  section resnet_steps 40 benchmark.md "${bench[@]}" --sections steps --models resnet \
    --mge by-mesh "${resnet_sizes[@]}" "${repeats[@]}"
  section mfc 20 benchmark.md "${bench[@]}" --sections mfc
  section first_step 30 benchmark.md "${bench[@]}" --sections first-step
  section unet_steps_64 100 benchmark.md "${bench[@]}" --sections steps "${unet_models[@]}" \
    --mge by-mesh "${unet_sizes_1[@]}" --skip-same-samples "${repeats[@]}"
elif [ "$part" = 2 ]; then
  section unet_steps_128 40 benchmark.md "${bench[@]}" --sections steps "${unet_models[@]}" \
    --mge by-mesh "${unet_sizes_2[@]}" --skip-same-samples "${repeats[@]}"
  section levers_sequential 30 levers.md "${levers[@]}" --model resnet --mge by-mesh \
    "${lever_sizes[@]}" --sequential off on "${repeats[@]}"
  section levers_bfloat16 100 levers.md "${levers[@]}" --model resnet --mge by-mesh \
    "${lever_sizes[@]}" --compute-dtype float32 bfloat16 "${repeats[@]}"
elif [ "$part" = 3 ]; then
  cold=("${bench[@]}" --sections first-step --first-step-runs cold)
  flags="${XLA_FLAGS:-}"
  # In smoke mode tests/test_benchmark.py runs this same command (and its
  # warm runs) already.
  [ "$CONFIG" = smoke ] || section first_step_cold_default 17 benchmark.md "${cold[@]}"
  section first_step_split 25 benchmark.md "${bench[@]}" --sections first-step \
    --mge by-mesh --split-step
  section levers_split 30 levers.md "${levers[@]}" "${unet_lever[@]}" \
    --mge by-mesh --split-step off on "${repeats[@]}"
  # Smoke mode leaves out the sections that differ from one above only by a
  # setting the CPU ignores (an XLA flag or option only the GPU compiler
  # reads, a CUDA PRNG kernel) or by a platform the CPU already is: on CPU
  # each would compile the same program again. tests/test_device_checks.py
  # parses their commands from a dry run instead, and the benchmark's and the
  # levers' own tests run --init-platform and --options.
  [ "$CONFIG" = smoke ] || section first_step_cold_autotune1 17 benchmark.md \
    env XLA_FLAGS="$flags --xla_gpu_autotune_level=1" "${cold[@]}"
  [ "$CONFIG" = smoke ] || section first_step_cold_threefry_kernel 17 benchmark.md \
    env JAX_THREEFRY_GPU_KERNEL_LOWERING=true "${cold[@]}"
  [ "$CONFIG" = smoke ] || section first_step_cold_init_on_cpu 17 benchmark.md \
    "${cold[@]}" --init-platform cpu
  [ "$CONFIG" = smoke ] || section levers_autotune 70 levers.md "${levers[@]}" \
    "${unet_lever[@]}" --mge by-mesh --options '{}' '{"xla_gpu_autotune_level": 1}' \
    "${repeats[@]}"
  [ "$CONFIG" = smoke ] || section first_step_cold_parallel16 100 benchmark.md \
    env XLA_FLAGS="$flags --xla_gpu_force_compilation_parallelism=16" "${cold[@]}"
  # In smoke mode this would repeat part 2's bfloat16 lever exactly.
  [ "$CONFIG" = smoke ] || section levers_bfloat16_256 100 levers.md "${levers[@]}" \
    --model resnet --mge by-mesh "${lever_size_256[@]}" --compute-dtype float32 bfloat16 \
    "${repeats[@]}"
elif [ "$part" = 4 ]; then
  section profile_resnet_mge 15 profile.md "${profile[@]}" --model resnet --step mge-by-mesh
  section profile_resnet_b16 10 profile.md "${profile[@]}" --model resnet --step single
  # A GPU-only flag: in smoke mode the first section's program again.
  [ "$CONFIG" = smoke ] || section profile_resnet_mge_no_command_buffers 15 profile.md \
    env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
    "${profile[@]}" --model resnet --step mge-by-mesh
  section profile_mfc_layer 10 profile.md "${profile[@]}" --program layer --layer mfc \
    "${layer_args[@]}"
  section profile_conv3x3_layer 10 profile.md "${profile[@]}" --program layer \
    --layer conv3x3 "${layer_args[@]}"
  section profile_unet_mge 35 profile.md "${profile[@]}" --model unet --step mge-by-mesh
  # In smoke mode (a ResNet) this would repeat part 2's bfloat16 lever exactly.
  [ "$CONFIG" = smoke ] || section levers_unet_bfloat16 100 levers.md "${levers[@]}" \
    "${unet_lever_128[@]}" --mge by-mesh --compute-dtype float32 bfloat16 "${repeats[@]}"
else
  fm=(python3 -m experiments.denoise --config "$fm_config" --strategy full-multiscale
      --compile-cache '' --step-cache '' --no-progress)
  # In smoke mode tests/test_denoise_cli.py trains this run already (on CPU
  # --compile-ahead auto is off), and tests/test_full_multiscale.py checks
  # that compiling ahead trains the same values.
  [ "$CONFIG" = smoke ] || section full_multiscale_compile_ahead_off 50 summary.md "${fm[@]}" \
    --compile-ahead off
  section full_multiscale_compile_ahead_on 100 summary.md "${fm[@]}" --compile-ahead on
fi

if [ -n "$dry_run" ]; then
  echo "part $part: dry run, nothing ran; commands in $summary" | tee -a "$log"
  exit 0
fi
# Compiled programs stay behind: the UNet's are tens of MB, and a file that
# comes back from the device machine may hold 16 MiB at most.
tar czf "$OUT/results.tar.gz" --exclude='*_cache' --exclude=./site -C "$WORK" . 2>>"$log"
echo "part $part done in $(( $(date +%s) - start ))s; results in $OUT" | tee -a "$log"
