#!/usr/bin/env bash
# The minigmr demo on a fresh machine, retrieve then rerank as MRB does, on the built-in synthetic world:
#   1. the world (data/synth, skipped if already there): an evaluation suite, training data, a tiny caption-pretrained
#      Qwen2.5-VL checkpoint, and the first stage: that checkpoint trained into an embedder on the training data;
#   2. retrieval with that embedder (each query's top 30) and the untrained reranker on it, the baseline;
#   3. SFT of the reranker on the training data;
#   4. the trained reranker on the same candidates: first stage vs reranked per task with paired 95% intervals,
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

step "1/4 the synthetic world and its first-stage embedder (data/synth)"
python -m minigmr.synth --out data/synth
# fp32 on every machine (the default is bf16 on CPUs with AMX / AVX512-BF16): the same numbers everywhere
FIRST=(--first-stage embedder --embedder data/synth/embedder --dtype float32)

step "2/4 retrieve with the embedder, rerank with the untrained reranker (baseline; full table in $OUT/untrained.txt)"
python eval.py "${FIRST[@]}" --json "$OUT/untrained.json" > "$OUT/untrained.txt"
grep "^Verdict" "$OUT/untrained.txt"

step "3/4 train the reranker with SFT (runs/demo/sft)"
# fewer steps than train.py's default, so that the whole demo fits its time budget (README, Quickstart); one thread:
# the same trained weights on any core count (README, The synthetic world); 8 groups per forward, the same batch
python train.py --objective sft --steps 1400 --threads 1 --micro-batch 8 --grad-accum 1 --out "$OUT/sft"

step "4/4 the trained reranker on the same candidates; baseline = the untrained reranker"
python eval.py "${FIRST[@]}" --model "$OUT/sft/merged" --json "$OUT/trained.json" --baseline "$OUT/untrained.json"

echo
echo "Done in $(( $(date +%s) - start )) s. Outputs: the world (suite, training data, checkpoint, embedder) in data/synth;"
echo "the trained reranker in $OUT/sft/merged (training log: $OUT/sft/log.jsonl); numbers in $OUT/untrained.json and"
echo "$OUT/trained.json; first-stage and reranked runs (TREC) in $OUT/untrained.runs/ and $OUT/trained.runs/."
