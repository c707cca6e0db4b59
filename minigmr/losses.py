"""Reranking losses side by side: SFT, InfoNCE (CL) and DPO, and their weight/direction view.

Setting (GMR, arXiv 2510.14824; docs/gmr.md §1.2, §2). A pointwise reranker reads the hidden state
h (D,) at the last prompt position of (instruction, query, document) and scores it with two LM-head rows,
M_y ("yes") and M_n ("no"):  z_y = M_y . h,  z_n = M_n . h.  Training never builds the (B, S, vocab)
logits: `yes_no_logits` computes only these two columns, as h @ [M_y; M_n]^T.

Layout. A training instance is a group of 1+N documents sharing one (instruction, query): document 0 is
the positive d+, documents 1..N are the negatives d-_i. Grouped logits are (G, 1+N, 2) with the last axis
[z_y, z_n]; every function here also accepts the flat (G*(1+N), 2) tensor plus `group_size=1+N`.

Objectives. Each one sums over the documents of a group and takes the MEAN OVER THE G GROUPS.
  SFT      yes/no cross-entropy per document               docs/gmr.md §2.1 L_SFT
  InfoNCE  -log softmax of the group's z_y at the positive  docs/gmr.md §2.1 L_CL
  DPO      chosen "yes" / rejected "no" (swapped for negatives) against a frozen reference model
           (Rafailov et al. 2023, arXiv 2305.18290; the sigmoid loss PIVOT arXiv 2510.16333 trains with;
           docs/gmr.md §6)

Weight/direction view (docs/gmr.md §2.2; equations (R1)-(R4) are labelled in the table below). For each
objective the gradient with respect to one document's hidden state is a scalar weight times a fixed LM-head
direction:

    dL/dh_{g,j} = -(1/G) * W_{g,j} * D_{g,j},        D_{g,j} = c_y * M_y + c_n * M_n

so gradient descent moves h along +W.D. The 1/G is the mean over groups; W is the per-group quantity the
paper writes. W says how hard the objective still pushes this document (a per-document step size), D says
where. The `*_weight_direction` functions return W (G, 1+N) and the coefficients c (G, 1+N, 2) of D on
[M_y, M_n]; `direction_vectors(c, head)` turns c into (G, 1+N, D) vectors.

            W+ (positive d+)                 D+          W-_i (negative d-_i)          D-
  SFT       p(no | d+)               (R3)    M_y - M_n   p(yes | d-_i)         (R4)    M_n - M_y
  CL        sum_i e^{z_y(d-_i)} / Z  (R1)    M_y         e^{z_y(d-_i)} / Z     (R2)    -M_y
  DPO       beta (1 - eps - sigmoid(beta m)) M_y - M_n   same formula, own m           M_n - M_y
  (Z = sum over the group of e^{z_y}; CL with temperature T: z_y -> z_y / T and W gets a factor 1/T.)

The Unified Reranking Loss (`url_loss`, docs/gmr.md §2.3) recombines any weight with any direction; its
four cells and the all-ones / tau-mask weights are the paper's probes (arXiv 2510.14824 Tables 1 and 2,
docs/gmr.md §2.4).

The embedder (embedding.py, docs/gmr.md §8) trains with the same softmax over a group, now over cosine
similarities of unit vectors and with the whole batch as the group (`embedding_infonce_loss`): its W is the CL
weight and its direction is the query's embedding instead of M_y (`embedding_weight_direction`). `next_token_loss`
is VladVA's generative term, which keeps the model a language model while its last state becomes a vector.

Precision: everything is computed in at least fp32 whatever the model dtype (bf16/fp16 are upcast; fp64
stays fp64, which lets the tests check gradients to 1e-10). docs/gmr.md §2.4: W_CL can be tiny and
vanishes in bf16.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

YES, NO = 0, 1  # positions of z_y and z_n on the last axis of every logits tensor in this file


def _fp32(x: Tensor) -> Tensor:
    """Upcast to at least fp32: bf16/fp16 -> fp32, fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _grouped(logits: Tensor, group_size: int | None = None, name: str = "logits", min_docs: int = 1) -> Tensor:
    """Return fp32 logits (G, 1+N, 2) from (G, 1+N, 2) or from flat (G*(1+N), 2) with group_size=1+N."""
    shape = tuple(logits.shape)
    if logits.ndim not in (2, 3) or shape[-1] != 2:
        raise ValueError(f"{name}: expected (G, 1+N, 2) or (G*(1+N), 2) [z_yes, z_no] logits, got {shape}")
    if logits.ndim == 2:
        if group_size is None or group_size < 1 or shape[0] % group_size != 0:
            raise ValueError(f"{name}: flat logits {shape} need group_size=1+N dividing {shape[0]}, got {group_size}")
        logits = logits.reshape(-1, group_size, 2)  # (G*(1+N), 2) -> (G, 1+N, 2)
    elif group_size is not None and shape[1] != group_size:
        raise ValueError(f"{name}: got groups of {shape[1]} documents {shape} but group_size={group_size}")
    if logits.shape[0] < 1 or logits.shape[1] < min_docs:
        raise ValueError(f"{name}: need at least 1 group of {min_docs} documents (positive first), got {shape}")
    return _fp32(logits)


def _signs(z: Tensor) -> Tensor:
    """(G, 1+N) +1 for the positive (document 0), -1 for the negatives; z is (G, 1+N, ...)."""
    s = torch.ones(z.shape[:2], dtype=z.dtype, device=z.device)
    s[:, 1:] = -1
    return s


def _check_pair(logits: Tensor) -> Tensor:
    if logits.shape[-1] != 2:
        raise ValueError(f"expected [..., 2] = [z_yes, z_no] logits, got {tuple(logits.shape)}")
    return _fp32(logits)


# ----------------------------------------------------------------------------- scores (docs/gmr.md §1.2)

def yes_no_logits(h: Tensor, head: Tensor) -> Tensor:
    """[z_yes, z_no] = h @ head^T in fp32, with head = stack([M_yes, M_no]) (2, D) and h (..., D) -> (..., 2).

    Both operands are upcast (bf16 -> fp32, fp64 kept), so no logit is ever rounded to the model dtype.
    """
    if head.ndim != 2 or head.shape[0] != 2 or head.shape[1] != h.shape[-1]:
        raise ValueError(f"head must be stack([M_yes, M_no]) of shape (2, {h.shape[-1]}), got {tuple(head.shape)}")
    dt = torch.promote_types(torch.promote_types(h.dtype, head.dtype), torch.float32)
    return h.to(dt) @ head.to(dt).T  # (..., D) @ (D, 2) -> (..., 2)


def sft_score(logits: Tensor) -> Tensor:
    """s_SFT = e^{z_y} / (e^{z_y} + e^{z_n}) = p(yes), a softmax over the two label tokens only. (..., 2) -> (...)

    This is the score the released lychee-rerank-mm checkpoint is read with (docs/gmr.md §1.2).
    """
    return torch.softmax(_check_pair(logits), dim=-1)[..., YES]


def cl_score(logits: Tensor) -> Tensor:
    """s_CL = z_y, the raw "yes" logit (the score InfoNCE ranks with, docs/gmr.md §1.2). (..., 2) -> (...)"""
    return _check_pair(logits)[..., YES]


# ----------------------------------------------------------------------------- the three objectives

def sft_loss(logits: Tensor, group_size: int | None = None) -> Tensor:
    """SFT: yes/no next-token cross-entropy for every document (docs/gmr.md §2.1), "yes" for d+, "no" for d-.

        L_SFT = mean_g [ -log p(yes | d+) - sum_{i=1..N} log p(no | d-_i) ],   p = softmax over [z_y, z_n]

    In words: each (ins, q, d) triplet is an independent two-way classification. Reduction: SUMMED over the
    1+N documents of a group (as the paper writes L_SFT), then averaged over groups. A token-level mean
    (HF's default) would be this divided by 1+N, i.e. the same gradient at a 1+N times smaller learning rate.
    """
    z = _grouped(logits, group_size)  # (G, 1+N, 2)
    logp = torch.log_softmax(z, dim=-1)  # (G, 1+N, 2), normalised over the two label tokens only
    return -(logp[:, 0, YES] + logp[:, 1:, NO].sum(dim=1)).mean()


def _cl_logits(logits: Tensor, temperature: float, group_size: int | None) -> Tensor:
    """z_y / T (G, 1+N), what InfoNCE's softmax runs over; a group needs a negative, else its loss is zero."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _grouped(logits, group_size, min_docs=2)[..., YES] / temperature  # (G, 1+N, 2) -> (G, 1+N)


def infonce_loss(logits: Tensor, temperature: float = 1.0, group_size: int | None = None) -> Tensor:
    """InfoNCE / CL: pick the positive out of its group by the "yes" logit (docs/gmr.md §2.1).

        L_CL = mean_g [ -log( e^{z_y(d+)/T} / (e^{z_y(d+)/T} + sum_i e^{z_y(d-_i)/T}) ) ]

    In words: a (1+N)-way softmax over the group's CL scores, cross-entropy at the positive, mean over groups.
    The paper reports no temperature (docs/gmr.md §7), so T = 1 is the faithful default.
    """
    return -torch.log_softmax(_cl_logits(logits, temperature, group_size), dim=1)[:, 0].mean()


def _dpo_margin(policy_logits: Tensor, ref_logits: Tensor, beta: float, label_smoothing: float,
                group_size: int | None) -> Tensor:
    """m_j = s_j [(z_y - z_n)(d_j) - (z_y - z_n)_ref(d_j)] (G, 1+N), s_j = +1 for d+, -1 for d-: the chosen
    minus rejected log-prob over {yes, no} (log p(yes) - log p(no) = z_y - z_n), policy minus reference."""
    if beta <= 0 or not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"need beta > 0 and 0 <= label_smoothing <= 0.5, got {beta=}, {label_smoothing=}")
    pol = _grouped(policy_logits, group_size, "policy_logits")
    ref = _grouped(ref_logits, group_size, "ref_logits").detach()
    if pol.shape != ref.shape:
        raise ValueError(f"policy_logits {tuple(pol.shape)} and ref_logits {tuple(ref.shape)} differ")
    return _signs(pol) * ((pol[..., YES] - pol[..., NO]) - (ref[..., YES] - ref[..., NO]))


def dpo_loss(policy_logits: Tensor, ref_logits: Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             group_size: int | None = None) -> Tensor:
    """DPO for reranking: the answer to "(ins, q, d) relevant?" is one token, chosen "yes" and rejected "no"
    for the positive, swapped for the negatives (the reranking reading of docs/gmr.md §6).

        m_j = s_j [ (z_y - z_n)(d_j) - (z_y - z_n)_ref(d_j) ],   s_0 = +1, s_i = -1 for negatives
        L = mean_g sum_j [ -(1 - eps) log sigmoid(beta m_j) - eps log sigmoid(-beta m_j) ]

    The sigmoid loss with conservative label smoothing eps of torchtune rlhf/loss/dpo.py DPOLoss (TRL
    "sigmoid"); PIVOT trains with beta = 0.1, eps = 0. The softmax normaliser cancels in chosen minus
    rejected, so this is sequence-level DPO (Rafailov et al. eq. 7) with one-token responses, whether the
    log-probs are over {yes, no} or the full vocabulary (tested). Reduction: summed over the 1+N documents
    (pairs) of a group, mean over groups, like `sft_loss`. ref_logits come from the frozen reference (e.g. the
    model with LoRA disabled) and are detached.
    """
    m = _dpo_margin(policy_logits, ref_logits, beta, label_smoothing, group_size)  # (G, 1+N)
    pair = -(1 - label_smoothing) * F.logsigmoid(beta * m) - label_smoothing * F.logsigmoid(-beta * m)
    return pair.sum(dim=1).mean()


# ----------------------------------------------------------------------------- weight / direction (docs/gmr.md §2.2)

def _coef(kind: str, z: Tensor) -> Tensor:
    """(G, 1+N, 2) coefficients of D on [M_y, M_n]: D+ = (1, -1) for SFT/DPO, (1, 0) for CL; D- = -D+."""
    dplus = z.new_tensor([1.0, -1.0] if kind == "sft" else [1.0, 0.0])  # (2,)
    return _signs(z)[..., None] * dplus  # (G, 1+N, 1) * (2,) -> (G, 1+N, 2)


def direction_vectors(coef: Tensor, head: Tensor) -> Tensor:
    """Turn coefficients (G, 1+N, 2) on [M_y, M_n] into direction vectors D (G, 1+N, D) = coef @ head."""
    dt = torch.promote_types(torch.promote_types(coef.dtype, head.dtype), torch.float32)
    return coef.to(dt) @ head.to(dt)  # (G, 1+N, 2) @ (2, D) -> (G, 1+N, D)


def sft_weight_direction(logits: Tensor, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """W, c for `sft_loss`, with dL/dh_{g,j} = -(1/G) W_{g,j} (c_{g,j} @ head) exactly. All W in [0, 1].

        W+ = e^{z_n(d+)} / (e^{z_y(d+)} + e^{z_n(d+)}) = p(no | d+),    D+ = M_y - M_n     (R3)
        W-_i = p(yes | d-_i),                                          D- = M_n - M_y     (R4)

    In words: each document is pushed by how wrong it still is, normalised per document only.
    """
    p = torch.softmax(_grouped(logits, group_size).detach(), dim=-1)  # (G, 1+N, 2) per-document [p(yes), p(no)]
    return torch.cat([p[:, :1, NO], p[:, 1:, YES]], dim=1), _coef("sft", p)  # W (G, 1+N), c (G, 1+N, 2)


def cl_weight_direction(logits: Tensor, temperature: float = 1.0,
                        group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """W, c for `infonce_loss`, with dL/dh_{g,j} = -(1/G) W_{g,j} (c_{g,j} @ head) exactly.

        W+ = sum_i e^{z_y(d-_i)/T} / Z,   D+ = M_y        (R1)
        W-_i = e^{z_y(d-_i)/T} / Z,      D- = -M_y       (R2),   Z = e^{z_y(d+)/T} + sum_i e^{z_y(d-_i)/T}

    times 1/T (chain rule through z/T; T = 1 gives the paper's table). In words: the weights share one softmax
    over the whole group, so one confident positive shrinks every document's step (docs/gmr.md §2.2).
    """
    p = torch.softmax(_cl_logits(logits, temperature, group_size).detach(), dim=1)  # (G, 1+N) = e^{z_y/T} / Z
    # W+ as the sum over negatives (R1), not 1 - p_0, which cancels catastrophically when p_0 -> 1
    w = torch.cat([p[:, 1:].sum(dim=1, keepdim=True), p[:, 1:]], dim=1) / temperature  # (G, 1+N)
    return w, _coef("cl", p)


def dpo_weight_direction(policy_logits: Tensor, ref_logits: Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
                         group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """W, c for `dpo_loss`, with dL/dh_{g,j} = -(1/G) W_{g,j} (c_{g,j} @ head) exactly.

        dl/dm = -beta [(1 - eps)(1 - sigmoid(beta m)) - eps sigmoid(beta m)] = -beta (1 - eps - sigmoid(beta m))
        W_j = beta (1 - eps - sigmoid(beta m_j)),   D+ = M_y - M_n,  D- = M_n - M_y   (dm_j/dh_j = D_j)

    In words: DPO is SFT's direction with a reference-anchored weight. With eps = 0, W is in (0, beta); with
    eps > 0, W turns negative once sigmoid(beta m) > 1 - eps: conservative DPO pulls over-confident margins back.
    """
    m = _dpo_margin(policy_logits, ref_logits, beta, label_smoothing, group_size).detach()  # (G, 1+N)
    return beta * (1 - label_smoothing - torch.sigmoid(beta * m)), _coef("sft", m)


# ----------------------------------------------------------------------------- URL (docs/gmr.md §2.3, §2.4)

def url_weights(logits: Tensor, weight: str | Tensor = "sft", tau: float | None = None, temperature: float = 1.0,
                group_size: int | None = None) -> Tensor:
    """The detached weights W (G, 1+N) `url_loss` uses.

    weight: "sft" (R3, R4), "cl" (R1, R2, with temperature), "ones" (W_base = 1, paper Table 2), or a tensor
    (G, 1+N), e.g. the W of `dpo_weight_direction`. tau (optional) then zeroes the weight of documents already
    learned: a positive with s_SFT(d+) > 1 - tau, a negative with s_SFT(d-) < tau. s is the SFT score p(yes)
    because tau is a probability threshold. The paper uses the mask with "ones"; it does not state its tau.
    """
    z = _grouped(logits, group_size).detach()  # (G, 1+N, 2)
    if isinstance(weight, Tensor):
        if weight.shape != z.shape[:2]:
            raise ValueError(f"weight tensor must be (G, 1+N) = {tuple(z.shape[:2])}, got {tuple(weight.shape)}")
        w = _fp32(weight.detach())
    elif weight == "sft":
        w = sft_weight_direction(z)[0]
    elif weight == "cl":
        w = cl_weight_direction(z, temperature)[0]
    elif weight == "ones":
        w = torch.ones_like(z[..., YES])
    else:
        raise ValueError(f"weight must be 'sft', 'cl', 'ones' or a (G, 1+N) tensor, got {weight!r}")
    if tau is not None:
        if not 0 <= tau <= 1:
            raise ValueError(f"tau is a probability threshold in [0, 1], got {tau}")
        s = sft_score(z)  # (G, 1+N)
        keep = torch.cat([s[:, :1] <= 1 - tau, s[:, 1:] >= tau], dim=1)  # (G, 1+N)
        w = w * keep
    return w


def url_loss(logits: Tensor, weight: str | Tensor = "sft", direction: str = "sft", tau: float | None = None,
             temperature: float = 1.0, group_size: int | None = None) -> Tensor:
    """Unified Reranking Loss: any weight W (see `url_weights`) with any direction (docs/gmr.md §2.3 recipe).

        L_URL = mean_g [ -sg(W+) u(h+) + sum_i sg(W-_i) u(h-_i) ],   u_SFT = z_y - z_n,  u_CL = z_y

    sg = stop-gradient, so dL/dh_{g,j} = -(1/G) W_{g,j} D_{g,j} with D = +-du/dh: (sft, sft) has exactly the
    gradient of `sft_loss`, (cl, cl) that of `infonce_loss` (same temperature), (W_dpo, sft) that of
    `dpo_loss`; the mixed cells are the paper's probes (Table 1). Only the GRADIENT is meaningful: the
    value of L_URL is not the value of any of those losses, so log those separately. Mean over groups.
    """
    z = _grouped(logits, group_size)  # (G, 1+N, 2)
    if direction == "sft":
        u = z[..., YES] - z[..., NO]  # (G, 1+N) log-odds, du/dh = M_y - M_n
    elif direction == "cl":
        u = z[..., YES]  # (G, 1+N), du/dh = M_y
    else:
        raise ValueError(f"direction must be 'sft' or 'cl', got {direction!r}")
    w = url_weights(z, weight, tau, temperature)
    return (-_signs(z) * w * u).sum(dim=1).mean()


def weight_stats(w: Tensor) -> dict[str, float]:
    """The training log's view of a weight tensor W (G, 1+N): {"w_pos": mean W+, "w_neg": mean W-}."""
    return {"w_pos": w[:, 0].mean().item(), "w_neg": w[:, 1:].mean().item() if w.shape[1] > 1 else float("nan")}


# ----------------------------------------------------------------------------- the embedder (embedding.py)

def embedding_scores(q: Tensor, d: Tensor, positive: Tensor, temperature: float, exclude: Tensor | None) -> Tensor:
    """(B, M) fp32 s_ij = cos(q_i, d_j) / T, -inf where `exclude` says d_j is no negative of query i (e.g. another
    copy of its positive). q (B, D) and d (M, D) are unit vectors; positive (B,) the index in d of q_i's positive."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1] or positive.shape != (q.shape[0],):
        raise ValueError(f"need q (B, D), d (M, D), positive (B,); got {tuple(q.shape)}, {tuple(d.shape)}, "
                         f"{tuple(positive.shape)}")
    s = (_fp32(q) @ _fp32(d).T) / temperature  # (B, D) @ (D, M) -> (B, M)
    if exclude is not None:
        keep = ~exclude  # a new tensor: the caller's mask is not written to
        keep[torch.arange(len(q)), positive] = True  # the positive itself always counts
        s = s.masked_fill(~keep, float("-inf"))
    return s


def embedding_infonce_loss(q: Tensor, d: Tensor, positive: Tensor, temperature: float = 0.05,
                           exclude: Tensor | None = None) -> Tensor:
    """InfoNCE of a bi-encoder (VladVA, GME; docs/gmr.md §8): each query picks its positive out of every document
    of the batch, its own hard negatives and the other queries' documents (in-batch negatives).

        L = mean_i [ -log( e^{s_i+} / sum_j e^{s_ij} ) ],   s_ij = cos(q_i, d_j) / T

    The same softmax over a group as `infonce_loss`, now over cosine similarities instead of yes logits, and the
    group is the whole batch. Query -> document only (VladVA's loss is symmetric image <-> text)."""
    s = embedding_scores(q, d, positive, temperature, exclude)  # (B, M)
    return -torch.log_softmax(s, dim=1)[torch.arange(len(q)), positive].mean()


def embedding_weight_direction(q: Tensor, d: Tensor, positive: Tensor, temperature: float = 0.05,
                               exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """W (B, M) and signs (B, M) of `embedding_infonce_loss`: with p = softmax_j(s_ij),

        W_i+ = sum_{j != +} p_ij / T,  D = +q_i      (R1 with M_y -> q_i)
        W_ij = p_ij / T,              D = -q_i      (R2)

    so dL/dd_j = -(1/B) sum_i W_ij sign_ij q_i and dL/dq_i = -(1/B) sum_j W_ij sign_ij d_j exactly (gradients with
    respect to the unit vectors; the normalisation then keeps their tangential part). The CL table with the query's
    embedding in place of the "yes" row: one softmax over the batch, so once the positives dominate, every weight
    collapses together, which is what a contrastive first stage wants (and a reranker does not, docs/gmr.md §2.2)."""
    s = embedding_scores(q.detach(), d.detach(), positive, temperature, exclude)
    w = torch.softmax(s, dim=1) / temperature  # (B, M) p_ij / T
    rows = torch.arange(len(q))
    w[rows, positive] = 0.0
    w[rows, positive] = w.sum(dim=1)  # the sum over negatives, not 1 - p+, which cancels when p+ -> 1
    signs = -torch.ones_like(w)
    signs[rows, positive] = 1.0
    return w, signs


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy, fp32: logits (n, V) at the answer positions, labels (n,) the next tokens
    (VladVA's generative term on long captions, written after the embedding prompt; pretrain.py's caption loss)."""
    return F.cross_entropy(_fp32(logits), labels)
