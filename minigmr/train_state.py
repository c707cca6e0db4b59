"""What a training run (train.py) keeps on disk: checkpoint folders, RNG states, the log, and the merged export.

A run folder holds log.jsonl (one JSON line per logged step), the latest checkpoint and, at the end, merged/:

    step-000100/
      adapter/                  the LoRA adapter in peft format (peft_io.save_adapter), if LoRA trains
      trainable.safetensors     every other trained weight under its official name (e.g. visual.merger.mlp.0.weight)
      optimizer.pt              AdamW state
      state.pt                  {"step", "args", "rng": [one RNG state per process]}; the lr schedule is a function
                                of the step, so the step is the whole scheduler state
      args.json                 the run's settings, for humans
    merged/                     the model with LoRA merged, official Qwen2.5-VL layout, plus the processor files

A checkpoint is written into step-NNNNNN.tmp/ and renamed into place with os.replace, then older ones are deleted:
a crash never leaves a half-written step-NNNNNN/, only a .tmp folder that `checkpoints` ignores.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lora import remove_lora
from .peft_io import load_adapter, save_adapter
from .scoring import SCORE_FILE
from .weights import to_hf

# Settings a resumed run may change: they split the same global batch differently over processes, or only say
# where and how often to write. Every other setting changes the trajectory and must match the checkpoint's.
RESUME_FREE = {"resume", "save_every", "log_every", "out", "micro_batch", "grad_accum", "world_size",
               "grad_checkpointing"}
# Files of a checkpoint folder besides the weights that a processor / tokenizer needs; copied into merged/.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja", "generation_config.json")


def checkpoints(out: str) -> list[str]:
    """Complete checkpoint folders step-NNNNNN in `out`, oldest first."""
    if not os.path.isdir(out):
        return []
    return [os.path.join(out, d) for d in sorted(os.listdir(out)) if d.startswith("step-") and d[5:].isdigit()]


def rng_state() -> dict:
    """This process's Python, numpy, torch (and CUDA) RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def changed_settings(saved: dict, now: dict) -> dict:
    """{setting: (saved, now)} of the settings outside RESUME_FREE that differ from the checkpoint's."""
    return {k: (v, now.get(k)) for k, v in saved.items() if k not in RESUME_FREE and now.get(k) != v}


def restart_log(path: str, step: int) -> None:
    """Rewrite log.jsonl with only its lines of steps <= `step` (those a resumed checkpoint contains; none for a
    fresh run, step 0): a resumed run's log then reads like an uninterrupted one's."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def append_log(path: str, line: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def _extra_weights(model, lora_ids: set) -> dict:
    """{official name: Parameter} of the trainable weights that are not LoRA A/B matrices."""
    return {to_hf(name): param for name, param in model.named_parameters()
            if param.requires_grad and id(param) not in lora_ids}


def save_checkpoint(out: str, step: int, model, optimizer, lora_ids: set, args: dict, rng_states: list) -> str:
    """Write out/step-NNNNNN atomically (see the module docstring) and delete the older checkpoints."""
    final = os.path.join(out, f"step-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if lora_ids:
        save_adapter(model, os.path.join(tmp, "adapter"), extra_config={"base_model_name_or_path": args["model"]})
    extra = {k: param.detach().float().cpu().contiguous() for k, param in _extra_weights(model, lora_ids).items()}
    if extra:
        save_file(extra, os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save({"step": step, "args": args, "rng": rng_states}, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(args, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a run resumed after a test-hook stop)
    os.replace(tmp, final)
    for old in checkpoints(out):
        if old != final:
            shutil.rmtree(old)
    return final


def read_state(path: str) -> dict:
    """A checkpoint's state.pt: {"step", "args", "rng"}."""
    return torch.load(os.path.join(path, "state.pt"), weights_only=False)


def load_checkpoint(path: str, model, optimizer, lora_ids: set) -> None:
    """Load a checkpoint's trained weights into `model` (which has the same LoRA layers and trainable weights as
    when it was saved) and its optimizer state."""
    if lora_ids:
        load_adapter(model, os.path.join(path, "adapter"))
    want = _extra_weights(model, lora_ids)
    if want:
        with safe_open(os.path.join(path, "trainable.safetensors"), "pt") as f:
            if set(f.keys()) != set(want):
                raise ValueError(f"{path}/trainable.safetensors does not hold this run's trainable weights; "
                                 f"differing names: {sorted(set(f.keys()) ^ set(want))[:5]}")
            with torch.no_grad():
                for key, param in want.items():
                    param.copy_(f.get_tensor(key))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=False))


def export_merged(model, out: str, model_dir: str, score: str = "sft") -> str:
    """out/merged: the model with every LoRA adapter merged (lora.remove_lora, in place: call it last), saved in
    the official layout in the dtype `model_dir` was stored in, plus the processor files of `model_dir` and
    scoring.SCORE_FILE naming the score the model is to be read with ("sft": p(yes), "cl": the yes logit)."""
    final, tmp = os.path.join(out, "merged"), os.path.join(out, "merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    remove_lora(model)  # W <- W + scaling * B A; plain nn.Linear again, so the official key names apply
    model.save_pretrained(tmp, dtype=getattr(torch, model.config.dtype))
    with open(os.path.join(tmp, SCORE_FILE), "w") as f:
        json.dump({"score": score}, f)
        f.write("\n")
    for name in PROCESSOR_FILES:
        if os.path.exists(os.path.join(model_dir, name)):
            shutil.copy(os.path.join(model_dir, name), os.path.join(tmp, name))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
