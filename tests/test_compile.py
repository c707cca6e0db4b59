"""torch.compile sees the per-layer code of the scoring loop as one graph each: no graph break in a decoder layer (with
and without a prefix cache) or a vision block. Counted with torch._dynamo.explain, which traces without compiling."""
import torch
import torch._dynamo as dynamo

from minigmr.config import TextConfig, VisionConfig
from minigmr.decoder import DecoderLayer, attention_mask_4d, mrope_cos_sin
from minigmr.layers import segments_by_length
from minigmr.vision import VisionBlock

TEXT = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[1, 1, 2])
VISION = VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)


def breaks(module, *args) -> tuple:
    dynamo.reset()
    e = dynamo.explain(module)(*args)
    return e.graph_count, e.graph_break_count, [str(r.reason) for r in e.break_reasons]


def test_decoder_layer_is_one_graph():
    torch.manual_seed(0)
    layer = DecoderLayer(TEXT).eval()
    B, S, P = 3, 7, 5
    x = torch.randn(B, S, TEXT.hidden_size)
    cos, sin = mrope_cos_sin(torch.arange(S).expand(3, B, S), TEXT, x.dtype)
    with torch.no_grad():
        assert breaks(layer, x, cos, sin, attention_mask_4d(torch.ones(B, S), S)) == (1, 0, [])
        past = layer.attn.key_values(layer.attn_norm(torch.randn(1, P, TEXT.hidden_size)), *(
            t[:1, ..., :P, :] for t in mrope_cos_sin(torch.arange(P).expand(3, 1, P), TEXT, x.dtype)))
        mask = attention_mask_4d(torch.ones(B, S), S, torch.ones(1, P))  # (B, 1, S, P+S): the fused loop's call
        assert breaks(layer, x, cos, sin, mask, [t.expand(B, -1, -1, -1) for t in past]) == (1, 0, [])


def test_vision_block_is_one_graph():
    torch.manual_seed(0)
    block = VisionBlock(VISION).eval()
    n, dh = 24, VISION.hidden_size // VISION.num_heads
    angles = torch.randn(n, 1, dh)
    segments = segments_by_length(torch.tensor([0, 8, 16, 24], dtype=torch.int32))  # three equal windows
    with torch.no_grad():
        assert breaks(block, torch.randn(n, VISION.hidden_size), angles.cos(), angles.sin(), segments) == (1, 0, [])
