#!/usr/bin/env bash
# The minigmr demo on a fresh machine, retrieve then rerank as MRB does, on the built-in synthetic world:
#   1. the world's base (data/synth, skipped if already there): an evaluation suite, training data and a tiny
#      caption-pretrained Qwen2.5-VL checkpoint;
#   2. two jobs side by side, one thread each: SFT of the reranker on the training data (in the background), and
#      the world's first stage (that checkpoint trained into an embedder), retrieval with it (each query's top 30)
#      and the untrained reranker on those candidates, the baseline;
#   3. the trained reranker on the same candidates: first stage vs reranked per task with paired 95% intervals,
#      then a verdict and where everything was written. Time and numbers: README, Quickstart.
set -euo pipefail
cd "$(dirname "$0")"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU machines: the pinned wheel first (an unpinned torch pulls a multi-GB CUDA build). Skip if torch is present.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e .
OUT=runs/demo
rm -rf "$OUT"                                                            # the demo's own folder: a fresh run
mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "1/3 the synthetic world: suite, training data and checkpoint (data/synth)"
python -m minigmr.synth --out data/synth --stage base
SYNTH=(--model data/synth/checkpoint --data data/synth/train/train.jsonl)
# fp32 on every machine (the default is bf16 on CPUs with AMX / AVX512-BF16): the same numbers everywhere
FIRST=(--first-stage embedder --embedder data/synth/embedder --dtype float32)

step "2/3 SFT of the reranker (background, log in $OUT/sft.log) beside the first stage and the baseline"
# One thread per job, so that the trained weights are the same on any core count (README, The synthetic world);
# fewer steps than train.py's default: about as long as the first stage and the baseline take beside it, so that
# the whole demo fits its time budget (README, Quickstart).
python train.py --objective sft --train full --steps 800 --threads 1 --micro-batch 8 --grad-accum 1 "${SYNTH[@]}" \
    --out "$OUT/sft" > "$OUT/sft.log" 2>&1 &
sft=$!
trap 'kill $sft 2>/dev/null || true' EXIT                               # a failed step stops the training too
python -m minigmr.synth --out data/synth                                 # the first-stage embedder, in place
echo "retrieve with the embedder, rerank with the untrained reranker (full table in $OUT/untrained.txt)"
python eval.py "${FIRST[@]}" --threads 1 --json "$OUT/untrained.json" > "$OUT/untrained.txt"
grep "^Verdict" "$OUT/untrained.txt"
echo "waiting for SFT ($OUT/sft.log)"
wait $sft || { tail -c 2000 "$OUT/sft.log"; exit 1; }

step "3/3 the trained reranker on the same candidates; baseline = the untrained reranker"
python eval.py "${FIRST[@]}" --model "$OUT/sft/merged" --json "$OUT/trained.json" --baseline "$OUT/untrained.json"

echo
echo "Done in $(( $(date +%s) - start )) s. Outputs: the world (suite, training data, checkpoint, embedder) in data/synth;"
echo "the trained reranker in $OUT/sft/merged (training log: $OUT/sft/log.jsonl); numbers in $OUT/untrained.json and"
echo "$OUT/trained.json; first-stage and reranked runs (TREC) in $OUT/untrained.runs/ and $OUT/trained.runs/."
