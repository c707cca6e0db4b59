"""The GMR prompt: how (instruction, query, document) becomes one chat, in one place.

Mirrors the lychee-rerank-mm inference script (docs/gmr.md §1.3): the Qwen3-Reranker system prompt, then one user
turn whose content list is

    "<Instruct>: {instruction}"  "<Query>:"  [query image]  [query text]  "\\n<Document>:"  [document image]  [document text]

and the assistant generation prompt. Rendered with the Qwen2.5-VL chat template (processor.render) it reads:

    <|im_start|>system
    Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>
    <|im_start|>user
    <Instruct>: {instruction}<Query>:<|vision_start|><|image_pad|>...<|vision_end|>{query text}
    <Document>:<|vision_start|><|image_pad|>...<|vision_end|>{document text}<|im_end|>
    <|im_start|>assistant
    {yes | no}

Everything up to the end of the query is the same for every candidate document: the scorer encodes it once.
The paper's own template figure was not available (docs/gmr.md §7); train and evaluate with the same layout.
"""
import os
from dataclasses import dataclass

from PIL import Image

from .tokenizer import special_token

SYSTEM_PROMPT = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                 'Note that the answer can only be "yes" or "no".')
DEFAULT_INSTRUCTION = "Given a query, retrieve the documents that answer it."


@dataclass(frozen=True)
class Item:
    """A query or a document: text, an image (a path or a PIL image), or both."""
    text: str | None = None
    image: object = None  # str path | PIL.Image.Image | None

    def __post_init__(self):
        if self.text is None and self.image is None:
            raise ValueError("a query/document needs text, an image, or both")


def as_item(x) -> Item:
    """str -> text; os.PathLike or PIL image -> image; dict with 'text' and/or 'image'; Item as is."""
    if isinstance(x, Item):
        return x
    if isinstance(x, str):
        return Item(text=x)
    if isinstance(x, (os.PathLike, Image.Image)):
        return Item(image=os.fspath(x) if isinstance(x, os.PathLike) else x)
    if isinstance(x, dict):
        unknown = set(x) - {"text", "image", "id"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in query/document {x!r}; use 'text' and/or 'image'")
        text, image = x.get("text"), x.get("image")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"'text' must be a str, got {type(text).__name__}")
        if image is not None and not isinstance(image, (str, os.PathLike, Image.Image)):
            raise TypeError(f"'image' must be a path or a PIL image, got {type(image).__name__}")
        if text is None and image is None:
            raise ValueError(f"a query/document dict needs 'text' and/or 'image', got {x!r}")
        return Item(text=text, image=os.fspath(image) if isinstance(image, os.PathLike) else image)
    raise TypeError(f"a query/document must be a str, a path, a PIL image or a dict, not {type(x).__name__}")


def check_positive(name: str, value, none_ok: bool = False) -> None:
    """A count argument at the public boundary (batch_size, max_length): a positive int, bool refused."""
    if not (value is None and none_ok) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be {'None or ' if none_ok else ''}a positive integer, got {value!r}")


def checked_instruction(instruction) -> str:
    """None means the default instruction; anything else must be text without control tokens."""
    if instruction is None:
        return DEFAULT_INSTRUCTION
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str (or None for the default), got {type(instruction).__name__}")
    if special_token(instruction) is not None:
        raise ValueError(f"instruction: its text contains the special token {special_token(instruction)!r}, which "
                         "the tokenizer would read as a control token; remove or escape it")
    return instruction


def checked_item(x, where: str) -> Item:
    """as_item, with errors that say which query/document; text holding a control token (e.g. <|im_end|>) is
    refused, since the tokenizer would read it as structure instead of text."""
    try:
        item = as_item(x)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None
    if item.image is None and not (item.text or "").strip():
        raise ValueError(f"{where}: empty text and no image (the data loaders refuse it too)")
    token = special_token(item.text)
    if token is not None:
        raise ValueError(f"{where}: its text contains the special token {token!r}, which the tokenizer would read "
                         "as a control token; remove or escape it")
    return item


def _content(item: Item) -> list:
    out = [] if item.image is None else [{"type": "image", "image": item.image}]
    return out + ([] if item.text is None else [{"type": "text", "text": item.text}])


def query_messages(instruction: str, query) -> list:
    """The shared part: system turn and the user turn up to the end of the query (no document, no end of turn)."""
    q = as_item(query)
    user = [{"type": "text", "text": f"<Instruct>: {instruction}"}, {"type": "text", "text": "<Query>:"}] + _content(q)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def gmr_messages(instruction: str, query, document) -> list:
    """The full conversation for one (instruction, query, document) triplet, in the Hugging Face messages format."""
    messages = query_messages(instruction, query)
    messages[1]["content"] += [{"type": "text", "text": "\n<Document>:"}] + _content(as_item(document))
    return messages
