"""The files that make a minigmr checkpoint folder load as a sentence-transformers CrossEncoder.

sentence-transformers (6.x) loads a generative yes/no reranker as two modules (sentence_transformers
cross_encoder/modules/logit_score.py and base/modules/transformer.py):

  0. `Transformer` with transformer_task "any-to-any": the checkpoint through AutoModelForMultimodalLM and its
     processor through AutoProcessor; a (query, document) pair becomes the chat [{"role": "query"}, {"role":
     "document"}] (a `prompt=` becomes a leading system message), rendered by the folder's chat template,
     left-padded, and only the last position's logits are kept;
  1. `LogitScore(true_token_id, false_token_id)`: z_yes - z_no at that position (the log-odds), or z_yes alone.

`CrossEncoder.predict` then applies the folder's activation: Sigmoid, so predict() returns sigmoid(z_yes - z_no)
= p(yes), exactly `Reranker.score` (score "sft"); a checkpoint read with the yes logit (score "cl") gets
LogitScore(yes, None) and Identity. The chat template below renders the GMR prompt of minigmr/prompt.py character
for character (the system message, when present, is the instruction), and the official Qwen2.5-VL chat for any
other conversation. Nothing here imports sentence-transformers: it only writes JSON and Jinja. One difference
remains by design: sentence-transformers truncates a prompt longer than the tokenizer's model_max_length (keeping
the assistant suffix), where minigmr refuses it.

The processor: transformers' Qwen2_5_VLProcessor always builds a video processor, which needs torchvision
(transformers models/auto/video_processing_auto.py), and PyPI's torchvision does not import beside a CPU torch.
The folder therefore names PaddleOCRVLProcessor, a stock image + tokenizer processor whose image-token expansion
is Qwen2_5_VLProcessor's (grid t*h*w / merge_size**2 copies of the tokenizer's image_token) and which returns
mm_token_type_ids as it does; minigmr has no video input, so nothing is lost. With torchvision installed,
transformers picks its torchvision image processor, whose resize differs slightly from the PIL one minigmr mirrors:
pass processor_kwargs={"backend": "pil"} for the same pixels.
"""
import json
import os

from .processor import Processor
from .prompt import DEFAULT_INSTRUCTION, SYSTEM_PROMPT
from .scoring import SCORE_FILE, checkpoint_score

IMAGE_ONLY_PROCESSOR = "PaddleOCRVLProcessor"
LEGACY_TEMPLATE = "chat_template.json"  # transformers prefers it over chat_template.jinja: it must go

# The official Qwen2.5-VL chat template (the checkpoints' chat_template.json), for every non-pair conversation.
QWEN25VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# The GMR prompt (minigmr/prompt.py gmr_messages rendered by Processor.render): an item's image before its text,
# as prompt._content orders them, whatever order the message lists them in.
GMR_TEMPLATE = (  # no whitespace between tags, so no "-" trimming is needed (transformers sets trim_blocks)
    "{% macro item(content) %}{% if content is string %}{{ content }}{% else %}"
    "{% for c in content if c['type'] == 'image' or 'image' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% endfor %}{% for c in content if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}{% endmacro %}"
    "{% set gmr = namespace(instruction=none, query=none, document=none) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set gmr.instruction = m['content'] %}"
    "{% elif m['role'] == 'query' %}{% set gmr.query = m['content'] %}"
    "{% elif m['role'] == 'document' %}{% set gmr.document = m['content'] %}{% endif %}{% endfor %}"
    "{% if gmr.query is not none and gmr.document is not none %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n<Instruct>: "
    "{% if gmr.instruction is none %}{{ " + json.dumps(DEFAULT_INSTRUCTION) + " }}"
    "{% else %}{{ item(gmr.instruction) }}{% endif %}"
    "<Query>:{{ item(gmr.query) }}\n<Document>:{{ item(gmr.document) }}<|im_end|>\n<|im_start|>assistant\n"
    "{% else %}" + QWEN25VL_TEMPLATE + "{% endif %}"
)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_sentence_transformers_files(folder: str, score: str | None = None) -> list:
    """Add to a checkpoint folder (official layout, with tokenizer.json and preprocessor_config.json) what
    `sentence_transformers.CrossEncoder(folder)` needs; returns the files written. score: "sft" (predict() gives
    p(yes)) or "cl" (the yes logit); default: the folder's minigmr_reranker.json, else "sft"."""
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder}: no {name}; give a checkpoint folder in the official layout")
    score = score or checkpoint_score(folder)
    if score not in ("sft", "cl"):
        raise ValueError(f"score must be 'sft' or 'cl', got {score!r}")
    processor = Processor.from_pretrained(folder)
    yes, no = processor.token_id("yes"), processor.token_id("no")  # as Reranker resolves them, never hard-coded
    path = lambda name: os.path.join(folder, name)
    written = []

    def write(name, obj):
        _write_json(path(name), obj)
        written.append(name)

    # the processor: image + tokenizer only (no torchvision), Qwen2.5-VL's image tokens named on the tokenizer
    tok = _read_json(path("tokenizer_config.json")) if os.path.exists(path("tokenizer_config.json")) else {}
    special = tok.get("extra_special_tokens") if isinstance(tok.get("extra_special_tokens"), dict) else {}
    tok.update(tokenizer_class=tok.get("tokenizer_class", "Qwen2Tokenizer"), processor_class=IMAGE_ONLY_PROCESSOR,
               eos_token=tok.get("eos_token", "<|im_end|>"), pad_token=tok.get("pad_token", "<|endoftext|>"),
               extra_special_tokens={**special, "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                     "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    tok.pop("chat_template", None)  # the processor's chat_template.jinja is the one template
    write("tokenizer_config.json", tok)
    pre = _read_json(path("preprocessor_config.json"))
    write("preprocessor_config.json", {**pre, "processor_class": IMAGE_ONLY_PROCESSOR})
    write("processor_config.json", {"processor_class": IMAGE_ONLY_PROCESSOR})
    with open(path("chat_template.jinja.tmp"), "w", encoding="utf-8") as f:
        f.write(GMR_TEMPLATE)
    os.replace(path("chat_template.jinja.tmp"), path("chat_template.jinja"))
    written.append("chat_template.jinja")
    if os.path.exists(path(LEGACY_TEMPLATE)):
        os.remove(path(LEGACY_TEMPLATE))

    # the two sentence-transformers modules and the CrossEncoder settings
    write("modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LogitScore",
         "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"}])
    calls = {"method": "forward", "method_output_name": "logits"}
    write("sentence_bert_config.json", {
        "transformer_task": "any-to-any", "module_output_name": "causal_logits",
        "modality_config": {"text": calls, "image": calls, "message": {**calls, "format": "structured"}}})
    os.makedirs(path("1_LogitScore"), exist_ok=True)
    write(os.path.join("1_LogitScore", "config.json"), {
        "true_token_id": yes, "false_token_id": no if score == "sft" else None, "module_input_name": "causal_logits"})
    activation = "torch.nn.modules.activation.Sigmoid" if score == "sft" else "torch.nn.modules.linear.Identity"
    write("config_sentence_transformers.json", {"model_type": "CrossEncoder", "activation_fn": activation,
                                                "prompts": {}, "default_prompt_name": None})
    write(SCORE_FILE, {"score": score})
    return written
