"""Export any checkpoint (+ a LoRA adapter) as one folder that minigmr, transformers and sentence-transformers load.

    python tools/export_st.py CHECKPOINT OUT [--adapter ADAPTER] [--score sft|cl] [--dtype bfloat16]

then
    from sentence_transformers import CrossEncoder
    CrossEncoder("OUT").rank("which page mentions red circles?", ["a red circle", {"image": "page3.png"}])

CHECKPOINT is a folder in the official Qwen2.5-VL layout or a Hugging Face hub id (minigmr/hub.py); ADAPTER a
minigmr or peft LoRA folder, merged into the weights (W + scaling * B A). OUT gets the weights under the official
key names, the tokenizer and image-processor files, minigmr_reranker.json and the sentence-transformers files
(minigmr/st_export.py: the GMR chat template, LogitScore on the yes/no tokens). A merged `train.py` export is
already such a checkpoint: `write_sentence_transformers_files(OUT/merged)` is all it needs.
OUT is built in a hidden sibling folder and renamed into place, so a failed export leaves nothing behind.
"""
import argparse
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from minigmr.hub import resolve  # noqa: E402
from minigmr.lora import remove_lora  # noqa: E402
from minigmr.model import Qwen25VL  # noqa: E402
from minigmr.peft_io import load_adapter  # noqa: E402
from minigmr.scoring import checkpoint_score  # noqa: E402
from minigmr.st_export import write_sentence_transformers_files  # noqa: E402

# copied beside the weights; chat_template.json is not: the exported template replaces it (st_export.py)
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json")


def export(checkpoint: str, out: str, adapter: str | None = None, score: str | None = None, dtype=None) -> str:
    """Write OUT (see the module docstring) and return its path. dtype: the stored dtype (default: the
    checkpoint's config.json torch_dtype, else float32)."""
    checkpoint, adapter = resolve(checkpoint), resolve(adapter)
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} already exists and is not an empty folder; remove it or choose another")
    score = score or checkpoint_score(checkpoint)
    model = Qwen25VL.from_pretrained(checkpoint, dtype=torch.float32)  # merge in fp32, cast once when saving
    if dtype is None:
        dtype = getattr(torch, str(model.config.dtype), torch.float32)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    if adapter is not None:
        load_adapter(model, adapter)
        remove_lora(model)  # plain nn.Linear again, so the official key names apply
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp, dtype=dtype)
        for name in PROCESSOR_FILES:
            if os.path.exists(os.path.join(checkpoint, name)):
                shutil.copy(os.path.join(checkpoint, name), os.path.join(tmp, name))
        write_sentence_transformers_files(tmp, score)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="checkpoint (+ LoRA adapter) -> a folder for minigmr, transformers and "
                                            "sentence-transformers (CrossEncoder)")
    p.add_argument("checkpoint", help="checkpoint folder (official Qwen2.5-VL layout) or hub id")
    p.add_argument("out", help="output folder (must not exist, or be empty)")
    p.add_argument("--adapter", help="LoRA adapter folder (minigmr or peft format), merged into the weights")
    p.add_argument("--score", choices=("sft", "cl"), help="score the model is read with: sft = p(yes) (predict "
                   "gives it), cl = the yes logit; default: the checkpoint's minigmr_reranker.json, else sft")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="stored dtype (default: the checkpoint's config.json torch_dtype)")
    a = p.parse_args(argv)
    path = export(a.checkpoint, a.out, a.adapter, a.score, getattr(torch, a.dtype) if a.dtype else None)
    print(f"{path}: loads with minigmr.Reranker.from_pretrained, transformers and sentence_transformers.CrossEncoder")


if __name__ == "__main__":
    main()
