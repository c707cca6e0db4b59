"""Tests for minigmr/losses.py: loss values against formulas written out here, and the weight/direction
decomposition against autograd (fp64, tolerance 1e-10). Expected gradients are built from the paper's
closed forms ((R1)-(R4) of losses.py, docs/gmr.md §2.2; the DPO derivative) directly, not from minigmr.
Sequence-level DPO, the reference the reranking DPO is checked against, is written out here too."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigmr import losses as L

G, N, DH = 3, 4, 8  # groups, negatives per group, hidden size
TIGHT = dict(rtol=1e-10, atol=1e-10)


def _setup(seed=0, scale=2.0):
    """Random fp64 hidden states (G*(1+N), DH) and head (2, DH); returns h, head, grouped logits (G, 1+N, 2)."""
    g = torch.Generator().manual_seed(seed)
    h = (scale * torch.randn(G * (1 + N), DH, generator=g, dtype=torch.float64)).requires_grad_()
    head = torch.randn(2, DH, generator=g, dtype=torch.float64) / math.sqrt(DH)
    return h, head, L.yes_no_logits(h, head).view(G, 1 + N, 2)


def _grad(loss, h):
    return torch.autograd.grad(loss, h, retain_graph=True)[0]  # several losses share one graph


def _expected_grad(w, d):
    """dL/dh = -(1/G) W D, flattened back to (G*(1+N), DH)."""
    return (-(w[..., None] * d) / G).reshape(G * (1 + N), DH)


def dpo_loss_from_logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0):
    """DPO on whole responses (Rafailov et al. 2023, arXiv 2305.18290, eq. 7; torchtune DPOLoss), inputs (P,):
    mean over pairs of -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)."""
    m = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (P,)
    return (-(1 - label_smoothing) * F.logsigmoid(beta * m) - label_smoothing * F.logsigmoid(-beta * m)).mean()


def sequence_logps(logits, labels, ignore_index=-100):
    """log pi(y|x) = sum_t log p(y_t | x, y_<t), (B, S, V) logits and (B, S) HF-style labels -> (B,) in fp32:
    position t predicts token t+1 (TRL get_batch_logps, torchtune get_batch_log_probs)."""
    logits, labels = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), labels[:, 1:]
    mask = labels != ignore_index
    tok = logits.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)  # (B, S-1)
    return ((tok - logits.logsumexp(dim=-1)) * mask).sum(dim=-1)


def _paper_wd(kind, z, head, temperature=1.0, ref=None, beta=0.1, eps=0.0):
    """W (G, 1+N) and D (G, 1+N, DH) from the closed forms, written independently of minigmr."""
    zy, zn = z[..., 0].detach(), z[..., 1].detach()
    my, mn = head[0], head[1]
    d = torch.empty(G, 1 + N, DH, dtype=z.dtype)
    if kind == "cl":
        e = torch.exp(zy / temperature)
        zsum = e.sum(1, keepdim=True)
        w = torch.cat([e[:, 1:].sum(1, keepdim=True) / zsum, e[:, 1:] / zsum], 1) / temperature  # (R1), (R2)
        d[:, 0], d[:, 1:] = my, -my
        return w, d
    d[:, 0], d[:, 1:] = my - mn, mn - my
    if kind == "sft":  # (R3), (R4)
        pyes = torch.exp(zy) / (torch.exp(zy) + torch.exp(zn))
        return torch.cat([1 - pyes[:, :1], pyes[:, 1:]], 1), d
    # DPO: m = s * [(z_y - z_n) - (z_y - z_n)_ref], dl/dm = -beta (1 - eps - sigmoid(beta m))
    s = torch.tensor([1.0] + [-1.0] * N, dtype=z.dtype)
    m = s * ((zy - zn) - (ref[..., 0] - ref[..., 1]))
    return beta * (1 - eps - 1 / (1 + torch.exp(-beta * m))), d


def test_logits_and_scores():
    h, head, z = _setup()
    torch.testing.assert_close(z.reshape(-1, 2), h @ head.T, **TIGHT)
    zy, zn = z[..., 0], z[..., 1]
    torch.testing.assert_close(L.sft_score(z), torch.exp(zy) / (torch.exp(zy) + torch.exp(zn)), **TIGHT)
    torch.testing.assert_close(L.cl_score(z), zy, **TIGHT)
    assert z.dtype == torch.float64  # fp64 in -> fp64 math, not truncated to fp32
    hb, headb = h.detach().bfloat16(), head.bfloat16()
    zb = L.yes_no_logits(hb, headb)
    assert zb.dtype == torch.float32 and L.sft_score(zb.bfloat16()).dtype == torch.float32
    assert L.cl_score(zb.bfloat16()).dtype == torch.float32
    # the matmul itself runs in fp32: same as upcasting the bf16 operands by hand
    torch.testing.assert_close(zb, hb.float() @ headb.float().T, rtol=1e-6, atol=1e-6)


def test_sft_and_infonce_values():
    _, _, z = _setup(1)
    target = torch.ones(G, 1 + N, dtype=torch.long)
    target[:, 0] = 0  # class 0 = "yes" for the positive, 1 = "no" for negatives
    ref_sft = F.cross_entropy(z.reshape(-1, 2), target.reshape(-1), reduction="sum") / G
    torch.testing.assert_close(L.sft_loss(z), ref_sft, **TIGHT)
    torch.testing.assert_close(L.sft_loss(z.reshape(-1, 2), group_size=1 + N), ref_sft, **TIGHT)
    for t in (1.0, 0.05):
        ref_cl = F.cross_entropy(z[..., 0] / t, torch.zeros(G, dtype=torch.long))
        torch.testing.assert_close(L.infonce_loss(z, temperature=t), ref_cl, **TIGHT)


@pytest.mark.parametrize("case", ["sft", "cl", "cl_T0.3", "dpo", "dpo_ls0.2"])
def test_gradient_equals_minus_weight_times_direction(case):
    h, head, z = _setup(2)
    ref = z.detach() + torch.randn(G, 1 + N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if case.startswith("sft"):
        loss, (w, c), (pw, pd) = L.sft_loss(z), L.sft_weight_direction(z), _paper_wd("sft", z, head)
    elif case.startswith("cl"):
        t = 0.3 if "T" in case else 1.0
        loss, (w, c) = L.infonce_loss(z, temperature=t), L.cl_weight_direction(z, temperature=t)
        pw, pd = _paper_wd("cl", z, head, temperature=t)
    else:
        eps = 0.2 if "ls" in case else 0.0
        loss = L.dpo_loss(z, ref, beta=0.5, label_smoothing=eps)
        w, c = L.dpo_weight_direction(z, ref, beta=0.5, label_smoothing=eps)
        pw, pd = _paper_wd("dpo", z, head, ref=ref, beta=0.5, eps=eps)
    grad = _grad(loss, h)
    torch.testing.assert_close(grad, _expected_grad(pw, pd), **TIGHT)  # paper closed form vs autograd
    torch.testing.assert_close(w, pw, **TIGHT)
    torch.testing.assert_close(L.direction_vectors(c, head), pd, **TIGHT)
    if case in ("sft", "cl", "dpo"):
        assert (w >= 0).all()


def test_url_cells():
    h, head, z = _setup(4)
    ref = z.detach() * 0.5
    g_sft = _grad(L.sft_loss(z), h)
    g_cl = _grad(L.infonce_loss(z, temperature=0.5), h)
    g_dpo = _grad(L.dpo_loss(z, ref, beta=0.3), h)
    torch.testing.assert_close(_grad(L.url_loss(z, "sft", "sft"), h), g_sft, **TIGHT)
    torch.testing.assert_close(_grad(L.url_loss(z, "cl", "cl", temperature=0.5), h), g_cl, **TIGHT)
    w_dpo = L.dpo_weight_direction(z, ref, beta=0.3)[0]
    torch.testing.assert_close(_grad(L.url_loss(z, w_dpo, "sft"), h), g_dpo, **TIGHT)
    # mixed cells: weight of one objective, direction of the other
    w_sft, d_sft = _paper_wd("sft", z, head)
    w_cl, d_cl = _paper_wd("cl", z, head)
    ones = torch.ones(G, 1 + N, dtype=torch.float64)
    cells = [("sft", "cl", w_sft, d_cl), ("cl", "sft", w_cl, d_sft), ("ones", "sft", ones, d_sft)]
    for weight, direction, w, d in cells:
        torch.testing.assert_close(_grad(L.url_loss(z, weight, direction), h), _expected_grad(w, d), **TIGHT)
    stats = L.weight_stats(L.url_weights(z, "sft"))
    assert stats["w_pos"] == pytest.approx(w_sft[:, 0].mean().item())
    assert stats["w_neg"] == pytest.approx(w_sft[:, 1:].mean().item())


def test_tau_mask():
    # SFT score p(yes) = sigmoid(z_y - z_n): set z_n = 0 and z_y = logit(p)
    p = torch.tensor([[0.99, 0.50, 0.01, 0.30], [0.50, 0.97, 0.03, 0.04]], dtype=torch.float64)
    z = torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)], -1).requires_grad_()  # (2, 4, 2)
    w = L.url_weights(z, "ones", tau=0.05)
    # positive masked when p > 0.95; negative masked when p < 0.05
    expect = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(w, expect, rtol=0, atol=0)
    grad = torch.autograd.grad(L.url_loss(z, "ones", "sft", tau=0.05), z)[0]  # (2, 4, 2)
    assert (grad[expect == 0] == 0).all() and (grad[expect == 1] != 0).all()
    # tau also multiplies a non-trivial weight
    torch.testing.assert_close(L.url_weights(z, "sft", tau=0.05), L.url_weights(z, "sft") * expect, **TIGHT)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_formula(eps):
    _, _, z = _setup(5)
    ref = torch.randn(G, 1 + N, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    beta = 0.1
    lp, lr = torch.log_softmax(z, -1), torch.log_softmax(ref, -1)
    total = 0.0
    for gi in range(G):
        for j in range(1 + N):
            c, r = (0, 1) if j == 0 else (1, 0)  # chosen / rejected answer index
            m = (lp[gi, j, c] - lp[gi, j, r]) - (lr[gi, j, c] - lr[gi, j, r])
            total = total - (1 - eps) * F.logsigmoid(beta * m) - eps * F.logsigmoid(-beta * m)
    torch.testing.assert_close(L.dpo_loss(z, ref, beta=beta, label_smoothing=eps), total / G, **TIGHT)
    # policy == reference: every pair sits at sigmoid(0), loss log 2 per pair, summed over 1+N pairs
    log2 = torch.tensor(math.log(2), dtype=torch.float64)
    torch.testing.assert_close(L.dpo_loss(z, z, label_smoothing=eps), (1 + N) * log2, **TIGHT)
    x = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(dpo_loss_from_logps(x, x.flip(0), x, x.flip(0), 0.1, eps), log2, **TIGHT)


def test_rerank_dpo_is_sequence_dpo_with_one_token_responses():
    vocab, yes_id, no_id, b = 11, 3, 7, G * (1 + N)
    gen = torch.Generator().manual_seed(7)
    pol_full, ref_full = (torch.randn(b, 2, vocab, generator=gen, dtype=torch.float64) for _ in range(2))  # (B, S=2, V)
    is_pos = torch.tensor(([True] + [False] * N) * G)
    chosen = torch.where(is_pos, yes_id, no_id)
    rejected = torch.where(is_pos, no_id, yes_id)
    lab = lambda tok: torch.stack([torch.full_like(tok, -100), tok], 1)  # (B, 2): prompt masked, one answer token
    logps = [sequence_logps(full, lab(tok)) for full in (pol_full, ref_full) for tok in (chosen, rejected)]
    seq = dpo_loss_from_logps(*logps, beta=0.2, label_smoothing=0.1)  # (policy c, policy r, ref c, ref r)
    yn = [yes_id, no_id]
    rerank = L.dpo_loss(pol_full[:, 0, yn], ref_full[:, 0, yn], 0.2, 0.1, group_size=1 + N)
    torch.testing.assert_close(rerank, (1 + N) * seq, **TIGHT)  # sum over 1+N pairs vs mean over pairs


def test_sequence_logps_hand_loop():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 6, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (3, 6), generator=gen)
    labels[0, :3] = -100
    labels[1, 4:] = -100
    labels[2, 0] = -100
    expect = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for t in range(1, 6):
            if labels[b, t] != -100:
                row = logits[b, t - 1]
                expect[b] += row[labels[b, t]] - math.log(sum(math.exp(v) for v in row.tolist()))
    torch.testing.assert_close(sequence_logps(logits, labels), expect, **TIGHT)
    assert sequence_logps(logits.bfloat16(), labels).dtype == torch.float32


def test_bad_input_raises():
    z = torch.randn(10, 2)
    with pytest.raises(ValueError, match="group_size"):
        L.sft_loss(z, group_size=3)  # 10 documents do not split into groups of 3
    with pytest.raises(ValueError, match="group_size"):
        L.sft_loss(z)  # flat logits without a group size
    with pytest.raises(ValueError, match=r"\(G, 1\+N, 2\)"):
        L.sft_loss(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="group_size=4"):
        L.infonce_loss(torch.randn(2, 5, 2), group_size=4)
    with pytest.raises(ValueError, match="at least 1 group of 2"):
        L.infonce_loss(torch.randn(4, 1, 2))  # no negatives: InfoNCE would be silently zero
    with pytest.raises(ValueError, match="head"):
        L.yes_no_logits(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="differ"):
        L.dpo_loss(torch.randn(2, 5, 2), torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(torch.randn(2, 5, 2), torch.randn(2, 5, 2), label_smoothing=0.7)
    with pytest.raises(ValueError, match="weight"):
        L.url_loss(torch.randn(2, 5, 2), weight="dpo")


@pytest.mark.parametrize("with_exclude", [False, True])
def test_embedding_gradient_equals_minus_weight_times_direction(with_exclude):
    """Bi-encoder InfoNCE over the batch: autograd's gradients on the query and document unit vectors equal
    -(1/B) sum W sign (the other side's vector), W from the closed form p / T written out here (fp64)."""
    B, M, T = 4, 12, 0.07
    g = torch.Generator().manual_seed(7)
    q = F.normalize(torch.randn(B, DH, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    d = F.normalize(torch.randn(M, DH, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    positive = torch.tensor([0, 4, 8, 9])
    exclude = torch.zeros(B, M, dtype=torch.bool)
    if with_exclude:
        exclude[0, 5] = exclude[2, 9] = exclude[1, 4] = True  # [1, 4] is query 1's positive: never excluded
    s = (q @ d.T / T).detach().masked_fill(exclude & (torch.arange(M) != positive[:, None]), float("-inf"))
    p = torch.softmax(s, dim=1)
    loss = L.embedding_infonce_loss(q, d, positive, T, exclude if with_exclude else None)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, -torch.log(p[torch.arange(B), positive]).mean(), **TIGHT)
    is_pos = torch.zeros(B, M, dtype=torch.bool)
    is_pos[torch.arange(B), positive] = True
    w_want = torch.where(is_pos, (1 - p[torch.arange(B), positive])[:, None].expand(B, M), p) / T
    w, signs = L.embedding_weight_direction(q, d, positive, T, exclude if with_exclude else None)
    torch.testing.assert_close(w, w_want, **TIGHT)
    torch.testing.assert_close(signs, torch.where(is_pos, 1.0, -1.0).double(), **TIGHT)
    gq, gd = torch.autograd.grad(loss, (q, d))
    torch.testing.assert_close(gd, -(w * signs).T @ q.detach() / B, **TIGHT)  # sum_i W_ij s_ij q_i
    torch.testing.assert_close(gq, -(w * signs) @ d.detach() / B, **TIGHT)  # sum_j W_ij s_ij d_j
    if with_exclude:
        assert w[0, 5] == 0 and w[2, 9] == 0  # an excluded document is no negative: no push at all
    with pytest.raises(ValueError, match="temperature"):
        L.embedding_infonce_loss(q, d, positive, 0.0)


def test_next_token_loss_is_mean_cross_entropy():
    logits = torch.randn(5, 11, dtype=torch.bfloat16)
    labels = torch.tensor([1, 0, 10, 3, 3])
    got = L.next_token_loss(logits, labels)
    want = -torch.log_softmax(logits.float(), -1)[torch.arange(5), labels].mean()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
