"""Qwen2/Qwen2.5 byte-level BPE tokenizer, built with the `tokenizers` library.

Qwen2.5-VL uses the same tokenizer as Qwen2: a GPT-2 style byte-level BPE (151,643 regular tokens) followed by 22
added tokens (chat markers, vision markers, tool and FIM tokens) with ids 151643..151664. The text pipeline is
NFC normalisation -> Qwen2 split regex -> byte-to-unicode mapping (no prefix space) -> BPE, and nothing is added
around the ids (no BOS, no EOS). minigmr keeps the whole pipeline in one `tokenizers.Tokenizer`, which is exactly
what HF `Qwen2Tokenizer` (transformers 5.x) builds around the same vocabulary and merges.

Two ways to get one:
  - `train_bpe_tokenizer(texts, vocab_size)`: a tiny Qwen2-style tokenizer for tests and toy models.
  - `tokenizer_from_tiktoken(path)`: the real Qwen2/2.5 tokenizer rebuilt from a `qwen.tiktoken` rank file, for
    users who hold only the vocabulary (a checkpoint normally ships tokenizer.json; load that with
    `tokenizers.Tokenizer.from_file`).
"""

import base64

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The Qwen2 pre-tokenizer regex (same string as transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX).
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                     r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# The 22 added tokens of Qwen2.5, in official order (ids 151643..151664 in the real vocabulary), as
# (token, special). The two tool_call tokens are added but *not* special, as in the official tokenizer.json.
QWEN_SPECIAL_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
]
SPECIAL_TOKENS = tuple(token for token, special in QWEN_SPECIAL_TOKENS if special)  # the control tokens


def special_token(text: str | None) -> str | None:
    """The first Qwen2.5 control token (<|im_end|>, <|image_pad|>, ...) inside `text`, or None: such text would be
    read as prompt structure, not as text."""
    return next((t for t in SPECIAL_TOKENS if t in text), None) if text else None


def _set_qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    """Attach the Qwen2 normaliser / pre-tokenizer / decoder (as transformers' Qwen2Tokenizer builds them)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_qwen_tokens(tok: Tokenizer) -> Tokenizer:
    """Append the 22 added tokens in official order, right after the BPE vocabulary."""
    # One at a time so each gets the next id; add_special_tokens would force special=True on the tool_call pair.
    for text, special in QWEN_SPECIAL_TOKENS:
        token = AddedToken(text, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok


def train_bpe_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Train a tiny Qwen2-style byte-level BPE (deterministic). `vocab_size` counts regular tokens only; the 22
    added tokens get ids vocab_size..vocab_size+21. "yes" and "no" are guaranteed to be single tokens (the
    reranker reads its score from their logits)."""
    texts = list(texts)
    if vocab_size < 256 + 4:
        raise ValueError(f"vocab_size must be at least 260 (256 byte symbols + the 'yes'/'no' merges), "
                         f"got {vocab_size}")
    # Repeat the two answer words so their merges are the most frequent pairs and are learned first, whatever
    # the size of the corpus (a fixed count loses to frequent pairs of a large corpus).
    texts += ["yes", "no"] * max(64, len(texts))
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    _set_qwen2_pipeline(tok)  # training pre-tokenizes with it
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size(with_added_tokens=False) != vocab_size:
        raise ValueError(f"BPE training produced {tok.get_vocab_size(with_added_tokens=False)} tokens, "
                         f"expected {vocab_size}: the training texts are too small for this vocab_size")
    for word in ("yes", "no"):
        if len(tok.encode(word, add_special_tokens=False).ids) != 1:
            raise ValueError(f"trained tokenizer splits {word!r} into several tokens; raise vocab_size")
    return _add_qwen_tokens(tok)


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer maps bytes to)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))  # bytes that print as themselves
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_tiktoken(path) -> Tokenizer:
    """Rebuild the Qwen2/2.5 tokenizer from a `qwen.tiktoken` rank file ("<base64 bytes> <rank>" per line).

    tiktoken's BPE always merges the adjacent pair whose concatenation has the lowest rank. The equivalent
    `tokenizers` BPE takes every token's valid two-way splits as merges, ordered by the rank of the merged token
    (mirrors transformers' TikTokenConverter, which needs the tiktoken package; this needs nothing)."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    b2u = _bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)
    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = []
    for t, r in ranks.items():
        local = [(t[:i], t[i:], r) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
        merges += sorted(local, key=lambda m: (ranks[m[0]], ranks[m[1]]))
    merges.sort(key=lambda m: m[2])  # stable: keeps the per-token order above for equal ranks
    merges = [(to_str(a), to_str(b)) for a, b, _ in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    return _add_qwen_tokens(_set_qwen2_pipeline(tok))
