"""The JSON and safetensors files minigmr reads and writes. A file that is missing, unreadable or malformed is a
ValueError naming its path (and line); a write goes to a temporary name renamed into place, so a crash never leaves
half a file. A leaf module."""
import json
import os
import re

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def read_json(path: str | os.PathLike, hint: str = ""):
    """The JSON value of a UTF-8 file (a leading BOM is dropped, RFC 8259 §8.1); errors name `path`, then `hint`."""
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: not found{hint}") from None
    except OSError as e:  # a folder, no permission, ...
        raise ValueError(f"{path}: cannot be read ({e.strerror}){hint}") from None
    bad = _NOT_UTF8.search(text)
    if bad:
        line, column = text.count("\n", 0, bad.start()) + 1, bad.start() - text.rfind("\n", 0, bad.start())
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at column "
                         f"{column}), so not valid JSON{hint}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}){hint}") from None


def read_json_object(path: str | os.PathLike, hint: str = "") -> dict:
    """read_json for a file that must hold a JSON object."""
    obj = read_json(path, hint)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}{hint}")
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON (no NaN / Infinity), indented, atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"  # fails before any file is touched
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def open_safetensors(path: str | os.PathLike, hint: str = ""):
    """safe_open(path) (lazy: tensors are read one at a time), or a ValueError naming the file."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:  # truncated, empty, not safetensors at all, unreadable
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated "
                         f"or not a safetensors file at all{hint}") from None


def write_safetensors(path: str | os.PathLike, tensors: dict) -> None:
    """{name: tensor} as a safetensors file with transformers' {"format": "pt"} metadata, atomically."""
    save_file(tensors, f"{path}.tmp", metadata={"format": "pt"})
    os.replace(f"{path}.tmp", path)


def unwritable(path, is_folder):
    """Why `path` cannot be written as a file (or created as a folder), or None."""
    if os.path.isdir(path) != is_folder and os.path.exists(path):
        return "is a folder; give a file name, e.g. out/results.json" if not is_folder else "is not a folder"
    parent = os.path.abspath(path) if is_folder else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest existing folder, where makedirs starts
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a folder"
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        return "not writable"
    return None
