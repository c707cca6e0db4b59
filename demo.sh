#!/usr/bin/env bash
# The minigmr demo on a fresh machine: install, train the tiny reranker with SFT on the built-in synthetic data
# (generated into data/synth on first use, with its caption-pretrained tiny checkpoint), and print its evaluation
# table next to the untrained model's. Run outputs go to runs/demo-sft/; how long it takes: docs/experiments.md.
set -euo pipefail
cd "$(dirname "$0")"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU machines: the pinned wheel first (an unpinned torch pulls a multi-GB CUDA build). Skip if torch is present.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e .
rm -rf runs/demo-sft                                                      # the demo's own folder: a fresh run
python train.py --objective sft --out runs/demo-sft                       # generates data/synth on first use
python eval.py --suite synth --json runs/demo-sft/eval-untrained.json     # the untrained tiny checkpoint
# the trained model, with the untrained model's numbers in the "baseline" column and the gain in "vs base"
python eval.py --suite synth --model runs/demo-sft/merged --json runs/demo-sft/eval-trained.json \
    --baseline runs/demo-sft/eval-untrained.json
