#!/usr/bin/env bash
# One lent-GPU session's digits checks (the `device` tool's machine; CI never runs this). Writes under $OUT:
#   env.txt            versions and the GPU
#   cost_gpu.json      scripts/bench_cost.py on CUDA (ms per generator update, forward counts, CUDA memory)
#   bench/digits_long.{json,md,png}   scripts/bench.py digits_long on the GPU (max_steps sized to the time left)
#   runs.tgz           every run's record.json, fid_vs_step.* and config.yaml (kept even if the suite is cut short)
# The machine's image has torch/lightning but not diffusers/omegaconf/clean-fid: they travel in .gpu_site (pure
# Python, copied from .venv; docs/benchmarks.md "On a lent GPU"). Make it here once, then carry it:
#   SP=.venv/lib/python3.11/site-packages; mkdir -p .gpu_site; echo /.gpu_site/ >> .git/info/exclude
#   cp -r $SP/{diffusers,omegaconf,cleanfid,importlib_metadata}* .gpu_site/
#   usage (device tool): bash scripts/device_digits.sh [TOTAL_SECONDS]   (default 560: under the tool's 600 s cap)
set -u -o pipefail
export PYTHONPATH="$PWD/.gpu_site:$PWD" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/bench"
TOTAL_S=${1:-560}
t0=$(date +%s)
collect() {
  (cd /tmp && tar czf "$OUT/runs.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.npy' \
     --exclude='tb' --exclude='logs' runs 2>/dev/null)
}
trap collect EXIT
{ nvidia-smi -L; python3 -c "import sys, torch, lightning, diffusers, omegaconf, cleanfid
print(sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__, 'diffusers',
      diffusers.__version__, 'omegaconf', omegaconf.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 \
  | tee "$OUT/env.txt" || exit 1

echo "== smoke: 20 iterations of digits_sim through Lightning on the GPU, with an in-training evaluation"
timeout 150 python3 -m distill.cli train configs/digits_sim.yaml trainer.accelerator=gpu trainer.max_steps=20 \
  eval.every=10 eval.n_samples=200 eval.batch_size=200 'eval.seeds=[0]' trainer.progress_bar=false \
  out_dir=/tmp/smoke seed=0 > "$OUT/smoke.log" 2>&1
rc=$?; tail -n 25 "$OUT/smoke.log"; [ $rc -eq 0 ] || { echo "smoke failed ($rc)"; exit 1; }

echo "== cost on CUDA ($(( $(date +%s) - t0 )) s in)"
timeout 200 python3 scripts/bench_cost.py --json "$OUT/cost_gpu.json" --iters 20 --warmup 5 2>&1 | tail -n 20

LEFT=$(( TOTAL_S - ($(date +%s) - t0) ))   # the suite's share; ~70 s of it for start-up and evaluations
STEPS=$(python3 - "$OUT/cost_gpu.json" "$(( LEFT - 70 ))" <<'EOF'
import json, sys
try:
    rec = json.load(open(sys.argv[1]))
    rows = rec["methods"] if isinstance(rec.get("methods"), dict) else {r["method"]: r for r in rec["methods"]}
    ms = float(rows["sim"]["ms_per_iteration"])
except Exception as e:  # no cost record: assume 60 ms per iteration
    print(f"cost record unreadable ({e}); assuming 60 ms/it", file=sys.stderr)
    ms = 60.0
# five runs share the GPU and 16 cores: budget 2.5x the alone cost, whole thousands, 2000..12000
print(max(2000, min(12000, int(float(sys.argv[2]) * 1000 / (ms * 2.5)) // 1000 * 1000)))
EOF
)
echo "== digits_long with max_steps=$STEPS ($(( $(date +%s) - t0 )) s in)"
cp docs/bench/digits_score.json "$OUT/bench/digits_long.json"  # teacher rows: same solvers, seeds and sample count
timeout $(( LEFT - 10 )) python3 scripts/bench.py digits_long --jobs 5 --out "$OUT/bench" --runs /tmp/runs \
  --reuse-teacher --set trainer.accelerator=gpu --set trainer.max_steps=$STEPS > "$OUT/bench.log" 2>&1
rc=$?; tail -n 30 "$OUT/bench.log"
[ $rc -eq 0 ] || rm -f "$OUT/bench/digits_long.json"  # only the copied teacher rows: no suite record
echo "== done rc=$rc ($(( $(date +%s) - t0 )) s)"
