"""What a training run (train.py) keeps on disk: checkpoint folders, RNG states, the log, and the merged export.

A run folder holds log.jsonl (one JSON line per logged step), the latest checkpoint and, at the end, merged/:

    step-000100/
      adapter/                  the LoRA adapter in peft format (peft_io.save_adapter), if LoRA trains
      trainable.safetensors     every other trained weight under its official name (e.g. visual.merger.mlp.0.weight)
      optimizer.safetensors     the optimizer's per-parameter state tensors ("<param index>.exp_avg", ".exp_avg_sq",
                                ".step" for AdamW)
      optimizer.json            its param_groups and any non-tensor per-parameter state
      rng-00000.safetensors     one per process: the torch (and CUDA) RNG state as uint8 tensors, the Python and
                                numpy RNG states as JSON in the file's metadata
      state.json                {"step", "args"}: the run's settings; the lr schedule is a function of the step,
                                so the step is the whole scheduler state
    merged/                     the model with LoRA merged, official Qwen2.5-VL layout, plus the processor files

Only safetensors and JSON, which cannot run code when read: --resume refuses a checkpoint holding a pickle
(.pt, .bin, ...), e.g. the state.pt / optimizer.pt of an older minigmr, and never unpickles anything.
A checkpoint is written into step-NNNNNN.tmp/ and renamed into place with os.replace, then older ones are deleted:
a crash never leaves a half-written step-NNNNNN/, only a .tmp folder that `checkpoints` ignores.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save

from .files import open_safetensors, read_json_object, write_json, write_safetensors
from .lora import remove_lora
from .peft_io import load_adapter, save_adapter
from .scoring import SCORE_FILE
from .weights import to_hf

# Settings a resumed run may change: they split the same global batch differently over processes, or only say
# where and how often to write. Every other setting changes the trajectory and must match the checkpoint's.
RESUME_FREE = {"resume", "save_every", "log_every", "out", "micro_batch", "grad_accum", "world_size",
               "grad_checkpointing", "eval_every", "eval_suite", "eval_queries", "eval_depth"}  # watching only
# Files of a checkpoint folder besides the weights that a processor / tokenizer needs; copied into merged/.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja", "generation_config.json")
# Names of pickle-based formats (torch.save, pickle, joblib): never read, and their presence refuses a resume.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
NEVER_UNPICKLES = ("minigmr never unpickles (loading a pickle can run arbitrary code); its checkpoints hold only "
                   "safetensors and JSON")


def checkpoints(out: str) -> list[str]:
    """Complete checkpoint folders step-NNNNNN in `out`, oldest first."""
    if not os.path.isdir(out):
        return []
    return [os.path.join(out, d) for d in sorted(os.listdir(out)) if d.startswith("step-") and d[5:].isdigit()]


def changed_settings(saved: dict, now: dict) -> dict:
    """{setting: (saved, now)} of the settings outside RESUME_FREE that differ from the checkpoint's."""
    return {k: (v, now.get(k)) for k, v in saved.items() if k not in RESUME_FREE and now.get(k) != v}


def _looks_pickled(path: str) -> str:
    """A hint for an error message when the file starts like a pickle (protocol >= 2) or a torch.save zip."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    return f"; it looks like a pickle, which {NEVER_UNPICKLES}" if head[:1] == b"\x80" or head == b"PK\x03\x04" \
        else ""


# ----------------------------------------------------------------------------------------------------- RNG
def rng_state_bytes() -> bytes:
    """This process's Python, numpy, torch (and CUDA) RNG states as the bytes of a safetensors file: bytes travel
    between processes as a uint8 tensor (all_rng_states), and the master writes them as rng-NNNNN.safetensors."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    meta = {"python": json.dumps([version, list(internal), gauss_next]),
            "numpy": json.dumps([name, keys.tolist(), pos, has_gauss, cached_gaussian])}
    return save(tensors, metadata=meta)


def all_rng_states(device) -> list[bytes]:
    """Every process's rng_state_bytes(), in rank order (under torch.distributed; else this process's). Gathered as
    uint8 tensors padded to the longest, on `device` (nccl gathers GPU tensors): all_gather_object would pickle."""
    if not dist.is_initialized():
        return [rng_state_bytes()]
    mine = torch.frombuffer(bytearray(rng_state_bytes()), dtype=torch.uint8).to(device)
    n = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([mine.numel()], device=device))
    sizes = [int(size) for size in sizes]
    chunks = [torch.zeros(max(sizes), dtype=torch.uint8, device=device) for _ in range(n)]
    dist.all_gather(chunks, torch.cat([mine, mine.new_zeros(max(sizes) - mine.numel())]))
    return [bytes(chunk[:size].cpu().numpy()) for chunk, size in zip(chunks, sizes)]


def set_rng_state(checkpoint: str, rank: int) -> None:
    """Restore process `rank`'s RNG states from the checkpoint's rng-NNNNN.safetensors."""
    path = os.path.join(checkpoint, f"rng-{rank:05d}.safetensors")
    with open_safetensors(path, _looks_pickled(path)) as f:
        try:
            meta = f.metadata() or {}
            version, internal, gauss_next = json.loads(meta["python"])
            name, keys, pos, has_gauss, cached_gaussian = json.loads(meta["numpy"])
            state = f.get_tensor("torch")
            if state.dtype != torch.uint8 or state.shape != torch.get_rng_state().shape:
                raise ValueError(f"'torch' is {state.dtype} {tuple(state.shape)}, not this torch's RNG state")
            random.setstate((version, tuple(internal), gauss_next))
            np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
            torch.set_rng_state(state)
            if "cuda" in f.keys() and torch.cuda.is_available():
                torch.cuda.set_rng_state(f.get_tensor("cuda"))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a minigmr RNG state ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------- log
def read_log(path: str, step: int) -> tuple[list[str], str | None]:
    """The log.jsonl lines of steps <= `step` (those a resumed checkpoint contains; none for a fresh run, step 0),
    which train.py writes back: a resumed run's log then reads like an uninterrupted one's. A torn last line (no
    newline and not JSON: a crash during the append) is dropped and named in the returned warning; any other bad
    line is an error naming path:line. -> (lines, warning or None)."""
    kept, torn = [], None
    if step == 0 or not os.path.exists(path):
        return kept, torn
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    for n, raw in enumerate(lines, 1):
        try:
            line = json.loads(raw.decode("utf-8"))
            if not isinstance(line, dict) or type(line.get("step")) is not int:
                raise ValueError("expected a JSON object with an integer 'step'")
        except ValueError as e:  # also UnicodeDecodeError and JSONDecodeError
            if n == len(lines) and not raw.endswith(b"\n"):
                torn = f"{path}:{n}: dropped a torn last line (a crash while it was written): {raw[:60]!r}"
                break
            raise ValueError(f"{path}:{n}: {e}") from None
        if line["step"] <= step:
            kept.append(raw.decode("utf-8").rstrip("\r\n") + "\n")
    return kept, torn


def append_log(path: str, line: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(line, allow_nan=False) + "\n")  # strict JSON: non-finite values stop training earlier


# ----------------------------------------------------------------------------------------------------- checkpoints
def _extra_weights(model, lora_ids: set) -> dict:
    """{official name: Parameter} of the trainable weights that are not LoRA A/B matrices."""
    return {to_hf(name): param for name, param in model.named_parameters()
            if param.requires_grad and id(param) not in lora_ids}


def _save_optimizer(optimizer, folder: str) -> None:
    """optimizer.state_dict() as optimizer.safetensors (its tensors) + optimizer.json (everything else)."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for i, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(i), {})[key] = value
    write_safetensors(os.path.join(folder, "optimizer.safetensors"), tensors)
    write_json(os.path.join(folder, "optimizer.json"), {"param_groups": sd["param_groups"], "state": other})


def _load_optimizer(optimizer, folder: str) -> None:
    path = os.path.join(folder, "optimizer.json")
    saved = read_json_object(path, _looks_pickled(path))
    if not isinstance(saved.get("param_groups"), list) or not isinstance(saved.get("state"), dict):
        raise ValueError(f"{path}: expected an object with 'param_groups' (a list) and 'state' (an object)")
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's index order
    state = {}
    tensor_path = os.path.join(folder, "optimizer.safetensors")
    with open_safetensors(tensor_path, _looks_pickled(tensor_path)) as f:
        for key in f.keys():
            i, _, name = key.partition(".")
            if not i.isdigit() or int(i) >= len(params) or not name:
                raise ValueError(f"{tensor_path}: tensor {key!r} is not '<param index < {len(params)}>.<name>'")
            t = f.get_tensor(key)
            if t.dim() and t.shape != params[int(i)].shape:  # e.g. exp_avg; 0-dim: AdamW's step
                raise ValueError(f"{tensor_path}: {key!r} has shape {tuple(t.shape)}, but parameter {i} of this "
                                 f"run has {tuple(params[int(i)].shape)}")
            state.setdefault(int(i), {})[name] = t
    for i, values in saved["state"].items():
        if not i.isdigit() or not isinstance(values, dict):
            raise ValueError(f"{path}: 'state' key {i!r} is not a parameter index with an object of values")
        state.setdefault(int(i), {}).update(values)
    # JSON has no tuples: AdamW's betas come back as a list
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              if isinstance(g, dict) else g for g in saved["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: does not fit this run's optimizer ({type(e).__name__}: {e})") from None


def save_checkpoint(out: str, step: int, model, optimizer, lora_ids: set, args: dict, rng_states: list) -> str:
    """Write out/step-NNNNNN atomically (see the module docstring) and delete the older checkpoints.
    rng_states: every process's rng_state_bytes(), in rank order."""
    final = os.path.join(out, f"step-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if lora_ids:
        save_adapter(model, os.path.join(tmp, "adapter"), extra_config={"base_model_name_or_path": args["model"]})
    extra = {k: param.detach().float().cpu().contiguous() for k, param in _extra_weights(model, lora_ids).items()}
    if extra:
        write_safetensors(os.path.join(tmp, "trainable.safetensors"), extra)
    _save_optimizer(optimizer, tmp)
    for rank, state in enumerate(rng_states):
        with open(os.path.join(tmp, f"rng-{rank:05d}.safetensors"), "wb") as f:
            f.write(state)
    write_json(os.path.join(tmp, "state.json"), {"step": step, "args": args})
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a run resumed after a test-hook stop)
    os.replace(tmp, final)
    for old in checkpoints(out):
        if old != final:
            shutil.rmtree(old)
    return final


def read_state(path: str) -> dict:
    """A checkpoint's state.json, {"step", "args"}, after checking that the folder holds no pickle and every file
    a resume reads (adapter/ and trainable.safetensors are checked when loaded)."""
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            if name.lower().endswith(PICKLE_SUFFIXES):
                raise ValueError(f"{os.path.join(root, name)}: a pickle file; {NEVER_UNPICKLES}. A checkpoint written "
                                 "by an older minigmr (state.pt, optimizer.pt) cannot be resumed: train again into a "
                                 "new --out (its adapter/ and trainable.safetensors still hold the weights)")
    file = os.path.join(path, "state.json")
    for name in ("state.json", "optimizer.json", "optimizer.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{os.path.join(path, name)}: missing; not a complete minigmr checkpoint")
    state = read_json_object(file, _looks_pickled(file))
    if type(state.get("step")) is not int or not isinstance(state.get("args"), dict):
        raise ValueError(f"{file}: expected an object with an integer 'step' and an object 'args'")
    folder = os.path.basename(os.path.normpath(path))
    if f"step-{state['step']:06d}" != folder:
        raise ValueError(f"{file}: says step {state['step']}, but the folder is {folder}")
    world_size = state["args"].get("world_size")
    if type(world_size) is not int or world_size < 1:
        raise ValueError(f"{file}: args.world_size must be a positive integer, got {world_size!r}")
    for rank in range(world_size):
        if not os.path.isfile(os.path.join(path, f"rng-{rank:05d}.safetensors")):
            raise ValueError(f"{path}/rng-{rank:05d}.safetensors: missing (the run had {world_size} process(es))")
    return state


def load_checkpoint(path: str, model, optimizer, lora_ids: set) -> None:
    """Load a checkpoint's trained weights into `model` (which has the same LoRA layers and trainable weights as
    when it was saved) and its optimizer state."""
    if lora_ids:
        load_adapter(model, os.path.join(path, "adapter"))
    want = _extra_weights(model, lora_ids)
    if want:
        file = os.path.join(path, "trainable.safetensors")
        if not os.path.isfile(file):
            raise ValueError(f"{file}: missing, but this run trains {len(want)} non-LoRA weights")
        with open_safetensors(file, _looks_pickled(file)) as f:
            if set(f.keys()) != set(want):
                raise ValueError(f"{file} does not hold this run's trainable weights; "
                                 f"differing names: {sorted(set(f.keys()) ^ set(want))[:5]}")
            with torch.no_grad():
                for key, param in want.items():
                    t = f.get_tensor(key)
                    if t.shape != param.shape:
                        raise ValueError(f"{file}: {key!r} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
                    param.copy_(t)
    _load_optimizer(optimizer, path)


# ----------------------------------------------------------------------------------------------------- export
def storage_dtype(config, model_dir: str) -> torch.dtype:
    """The torch dtype config.json records (the merged export is saved in it); an error naming the file if none."""
    dtype = getattr(torch, str(config.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{os.path.join(model_dir, 'config.json')}: torch_dtype {config.dtype!r} is not a torch "
                         "dtype (e.g. 'bfloat16', 'float32'); the merged export is saved in it")
    return dtype


def export_merged(model, out: str, model_dir: str, score: str = "sft") -> str:
    """out/merged: the model with every LoRA adapter merged (lora.remove_lora, in place: call it last), saved in
    the official layout in the dtype `model_dir` was stored in, plus the processor files of `model_dir` and
    scoring.SCORE_FILE naming the score the model is to be read with ("sft": p(yes), "cl": the yes logit)."""
    final, tmp = os.path.join(out, "merged"), os.path.join(out, "merged.tmp")
    dtype = storage_dtype(model.config, model_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    remove_lora(model)  # W <- W + scaling * B A; plain nn.Linear again, so the official key names apply
    model.save_pretrained(tmp, dtype=dtype)
    write_json(os.path.join(tmp, SCORE_FILE), {"score": score})
    for name in PROCESSOR_FILES:
        if os.path.exists(os.path.join(model_dir, name)):
            shutil.copy(os.path.join(model_dir, name), os.path.join(tmp, name))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
