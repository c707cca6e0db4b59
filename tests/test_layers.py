"""rowwise: 16-bit CPU inference pads rows to few sizes (oneDNN caches its matmul primitives by shape); results and
shapes are those of the unpadded call, and every other case passes x through untouched."""
import pytest
import torch
import torch.nn as nn

from minigmr.config import Config
from minigmr.layers import GatedMLP, row_bucket, rowwise
from minigmr.model import Qwen25VL


def test_row_bucket_is_a_small_cover():
    sizes = {row_bucket(m) for m in range(1, 16385)}
    for m in range(1, 16385):
        b = row_bucket(m)
        assert b >= m and b % 32 == 0
        assert b - m < 32 or b <= m * 1.125  # at most 1/8 padding past the smallest sizes
    assert len(sizes) <= 8 + 8 * 6  # 32..256 in steps of 32, then 8 sizes per doubling up to 16384


class Recorder(nn.Module):
    """A row-wise fn that records the rows it was called with: a linear and its input doubled."""

    def __init__(self, k=24, n=40):
        super().__init__()
        self.linear, self.rows = nn.Linear(k, n), []

    def forward(self, h):
        self.rows.append(h.shape[0] if h.dim() == 2 else None)
        return self.linear(h), 2 * h


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_padded_call_equals_unpadded(dtype):
    torch.manual_seed(0)
    f = Recorder().to(dtype)
    x = torch.randn(3, 37, 24, dtype=dtype)[:, 2:]  # (3, 35, 24), not contiguous: 105 rows
    with torch.no_grad():
        y, x2 = rowwise(f, x)
        ref = f.linear(x.reshape(-1, 24)).view(3, 35, 40)
    assert f.rows[0] == row_bucket(105) == 128  # the call saw the padded rows
    assert y.shape == (3, 35, 40) and x2.shape == x.shape
    torch.testing.assert_close(x2, 2 * x, rtol=0, atol=0)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)  # kernels may differ per row count


def test_other_cases_pass_through():
    f = Recorder()
    x = torch.randn(5, 24)
    with torch.no_grad():
        rowwise(f, x)  # fp32: MKL, no per-shape cost
        rowwise(f, x.bfloat16().float())
    f16 = Recorder().bfloat16()
    rowwise(f16, x.bfloat16())  # grad enabled: training sees its rows as they are
    with torch.no_grad():
        rowwise(f16, torch.randn(64, 24).bfloat16())  # already a bucket size
    assert f.rows == [5, 5] and f16.rows == [5, 64]


def test_bf16_model_padded_equals_unpadded():
    """The whole model in bf16 with padded rows (no_grad) against the same model with its rows as they are (grad
    mode, no padding): the views and cuts are right if they agree to bf16 rounding."""
    vision = dict(hidden_size=32, intermediate_size=48, num_heads=2, depth=2, fullatt_block_indexes=[1],
                  out_hidden_size=64)
    cfg = Config.from_dict(dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, image_token_id=90,
                                vision_start_token_id=91, vision_end_token_id=92,
                                rope_scaling=dict(mrope_section=[2, 3, 3]), vision_config=vision))
    torch.manual_seed(0)
    model = Qwen25VL(cfg).bfloat16().eval()
    ids = torch.randint(0, 80, (3, 45))
    mask = torch.ones(3, 45, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask)
    b = model(input_ids=ids, attention_mask=mask).detach()
    torch.testing.assert_close(a.float()[mask.bool()], b.float()[mask.bool()], rtol=3e-2, atol=3e-2)
    pixels = torch.randn(4 * 6 * 2, 3 * 2 * 14 * 14).bfloat16()  # two 4x6-patch images: 48 patches
    grid = torch.tensor([[1, 4, 6], [1, 4, 6]])
    with torch.no_grad():
        fa = model.vision(pixels, grid)
    fb = model.vision(pixels, grid).detach()
    torch.testing.assert_close(fa.float(), fb.float(), rtol=3e-2, atol=3e-2)
