"""04_rank_grpo.py: segmentation, rewards, advantages, the loss's identities, accumulation,
smoke runs."""

import copy
import json
import math
import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

import common
from conftest import stage, TINY

rg = stage("04_rank_grpo")

# A hand-built vocabulary: id -> text. 1-4 contain newlines; 6 is EOS. Lists are written as text.
VOCAB = {0: "A", 1: "\n", 2: "\n\n", 3: "\n  ", 4: " \n", 5: "B", 6: "<eos>"}
NL = torch.tensor([VOCAB[i].count("\n") for i in range(len(VOCAB))])
EOS = 6
TOKEN = re.compile("|".join(re.escape(VOCAB[i]) for i in (6, 3, 4, 2, 1, 0, 5)))


def tokens(text):
    """'A\nB<eos>' -> [0, 1, 5, 6] in the hand-built vocabulary."""
    ids = {v: k for k, v in VOCAB.items()}
    return [ids[t] for t in TOKEN.findall(text)]


def rules(text, n, adv_rank, eps_u=-0.1, eps_o=-0.2, eps_n=0.3):
    """length_rules on one list written as text: (advantage, unit) per token, None where masked."""
    ids = torch.tensor([tokens(text)])
    mask = torch.ones_like(ids)
    adv, unit, mask = rg.length_rules(torch.tensor([adv_rank]), NL[ids], ids == EOS, mask, n,
                                      eps_u, eps_o, eps_n)
    rows = zip(adv[0].tolist(), unit[0].tolist(), mask[0].tolist())
    return [(round(a, 4), u) if m else None for a, u, m in rows]


def seg(ids, n_real=None):
    ids = torch.tensor([ids])
    mask = torch.ones_like(ids)
    if n_real is not None:
        mask[0, n_real:] = 0
    return rg.segment_ranks(NL[ids], mask)[0].tolist()


# --- 1. segmentation ------------------------------------------------------------------------------

def test_segment_newline_closes_its_item_and_eos_belongs_to_last_line():
    assert seg(tokens("AA\nB\nA<eos>")) == [0, 0, 0, 1, 1, 2, 2]


def test_segment_multi_newline_token_skips_a_rank():
    # the "\n\n" token closes item 0; line 1 is empty (no tokens); B is rank 2
    assert seg(tokens("A\n\nB<eos>")) == [0, 0, 2, 2]


def test_segment_newline_followed_by_spaces_and_space_before_newline():
    assert seg(tokens("A\n  B \nA")) == [0, 0, 1, 1, 2]


def test_segment_padding_is_minus_one():
    assert seg(tokens("A\nB<eos><eos><eos>"), n_real=4) == [0, 0, 1, 1, -1, -1]


# --- 2. the length rules: (advantage, unit) per token; eps_u -0.1, eps_o -0.2, eps_n +0.3 ---------

U, O, S = -0.1, -0.2, 0.3
# text, N, per-rank advantages, expected (advantage, unit) per token (None: out of the loss)
RULES = [
    ("A\nB<eos>", 2, [0.5, -0.5], [(0.5, 0), (0.5, 0), (-0.5, 2), (S, 3)]),  # exactly N: stop bonus
    ("A<eos>", 2, [0.5, -0.5], [(0.5, 0), (U, 1)]),  # fewer than N: premature EOS
    # N + 1
    ("A\nB\nA<eos>", 2, [0.5, -0.5], [(0.5, 0), (0.5, 0), (-0.5, 2), (O, 3), (O, 4), None]),
    # trailing newline
    ("A\nB\n<eos>", 2, [0.5, -0.5], [(0.5, 0), (0.5, 0), (-0.5, 2), (O, 3), None]),
    # "\n\n" past N
    ("A\nB\n\nA", 2, [0.5, -0.5], [(0.5, 0), (0.5, 0), (-0.5, 2), (O, 3), (O, 6)]),
    # "\n\n" holding the N-th newline
    ("A\n\nB", 2, [0.5, -0.5], [(0.5, 0), (O, 1), (O, 4)]),
    # empty line 2: 3 lines
    ("A\n\nB<eos>", 3, [0.5, 0.1, -0.5], [(0.5, 0), (0.5, 0), (-0.5, 4), (S, 5)]),
    # cut at the token cap: no decision
    ("A\nB", 2, [0.5, -0.5], [(0.5, 0), (0.5, 0), (-0.5, 2)]),
    ("AB \nA\nB<eos>", 3, [1.0, 0.0, -1.0],
     [(1.0, 0)] * 3 + [(0.0, 2), (0.0, 2), (-1.0, 4), (S, 5)]),
]


@pytest.mark.parametrize("text, n, adv_rank, expected", RULES)
def test_length_rules(text, n, adv_rank, expected):
    assert rules(text, n, adv_rank) == expected


def test_one_update_on_n_minus_1_n_and_n_plus_1_items_teaches_stopping_at_n(tiny):
    """No hits anywhere (every rank's advantage is 0): only the length decisions act. One update
    raises P(EOS after item N) and lowers P(EOS before N) and P(newline after item N)."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    n, eos, nl = 2, tok.eos_token_id, tok.encode("\n")
    assert len(nl) == 1
    prompt = tok.encode("Recommend two movies:\n")
    items = [tok.encode(t) for t in ("Heat (1995)", "Alien (1979)", "Jaws (1975)")]
    lists = [items[0] + [eos], items[0] + nl + items[1] + [eos],
             items[0] + nl + items[1] + nl + items[2] + [eos]]
    batch = rg.make_batch([prompt] * 3, lists, tok.pad_token_id)
    eos_tok = torch.zeros_like(batch.completion_mask, dtype=torch.bool)
    for i, c in enumerate(lists):
        eos_tok[i, len(c) - 1] = True
    table = rg.newline_table(tok, model.get_output_embeddings().weight.shape[0])
    adv, unit, mask = rg.length_rules(torch.zeros(3, n), table[batch.completion_ids], eos_tok,
                                      batch.completion_mask, n, eps_u=-0.1, eps_o=-0.1, eps_n=0.1)
    # by hand: the premature EOS, the stop after N, the N-th newline and the third item are the only
    # tokens with an advantage; the EOS after the overflow leaves the loss
    k = len(items[0]) + 1 + len(items[1])
    assert adv[0, len(items[0])] == -0.1 and adv[1, k] == 0.1 and adv[2, k] == -0.1
    assert (adv[2, k + 1:len(lists[2]) - 1] == -0.1).all() and mask[2, len(lists[2]) - 1] == 0
    assert adv.abs().sum() == pytest.approx(0.1 * (3 + len(items[2])))

    def probs():
        with torch.no_grad():
            return {"eos after N": rg.completion_logprobs(model, rg.make_batch(
                        [prompt], [lists[1]], tok.pad_token_id))[0, k].exp().item(),
                    "eos before N": rg.completion_logprobs(model, rg.make_batch(
                        [prompt], [lists[0]], tok.pad_token_id))[0, len(items[0])].exp().item(),
                    "newline after N": rg.completion_logprobs(model, rg.make_batch(
                        [prompt], [lists[2]], tok.pad_token_id))[0, k].exp().item()}

    before = probs()
    logp = rg.completion_logprobs(model, batch)
    loss, _ = rg.rank_grpo_loss(logp, logp.detach(), None, adv, unit, mask, eps_low=0.06,
                                eps_high=0.08, beta=0.0, n_units=3 * n, n_tokens=mask.sum())
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad  # a small step: the first-order effect of the update
    after = probs()
    assert after["eos after N"] > before["eos after N"]
    assert after["eos before N"] < before["eos before N"]
    assert after["newline after N"] < before["newline after N"]


def test_segmentation_matches_text_split_with_a_real_tokenizer(tiny):
    model, tok = tiny
    table = rg.newline_table(tok, model.get_output_embeddings().weight.shape[0])
    assert table[tok.convert_tokens_to_ids("ĊĊ")] == 2
    texts = ["Heat (1995)\nAlien (1979)\n \n\nJaws (1975)", "A\n\n\nB \nC", "no newline", "\n\nx\n"]
    for text in texts:
        ids = tok.encode(text)
        mask = torch.ones(1, len(ids), dtype=torch.long)
        rank = rg.segment_ranks(table[torch.tensor([ids])], mask)[0]
        for t in range(len(ids)):  # brute force: newlines in the text before token t
            assert rank[t] == tok.decode(ids[:t]).count("\n")
        assert int(table[ids].sum()) == text.count("\n")


# --- 3. rewards -----------------------------------------------------------------------------------

def test_rewards_hand_computed():
    rel = torch.tensor([[1.0, 0.0, 1.0]])
    assert rg.rank_rewards(rel, "exp_inf").tolist() == [[1.0, 0.0, 1.0]]
    d = [1.0, 0.0, 1 / math.log2(4)]
    assert rg.rank_rewards(rel, "log")[0].tolist() == pytest.approx([d[0] + d[2], d[2], d[2]])
    assert rg.rank_rewards(rel, "dcg")[0].tolist() == pytest.approx([1 + 1 / math.log2(4)] * 3)


@pytest.mark.parametrize("kind", ["exp_inf", "log"])
def test_rewards_are_causal(kind):
    g = torch.Generator().manual_seed(0)
    for k in range(1, 6):
        rel = (torch.rand(8, 6, generator=g) < 0.4).float()
        changed = rel.clone()
        changed[:, :k] = 1 - changed[:, :k]  # change every item before rank k
        assert torch.equal(rg.rank_rewards(rel, kind)[:, k:], rg.rank_rewards(changed, kind)[:, k:])


def test_dcg_reward_is_not_causal_but_equals_dcg_at_n():
    rel = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert rg.rank_rewards(rel, "dcg")[0, 3].item() == pytest.approx(1 / math.log2(3) + 1 / math.log2(4))


def test_rank_relevance_from_texts():
    cat = common.Catalog([{"title": "Heat", "year": 1995}, {"title": "Alien", "year": 1979}])
    row = {"id": "c#0", "seen_titles": [], "groundtruth_with_release_year": [["Alien", "1979"]]}
    rel = rg.rank_relevance(["Heat (1995)\nAlien (1979)\nAlien (1979)", "junk\n\nAlien (1979)"],
                            [row, row], cat, 3)
    assert rel.tolist() == [[0, 1, 0], [0, 0, 1]]


# --- 4. advantages --------------------------------------------------------------------------------

def pair(a, b):
    """The advantages of two samples with rewards a and b (G = 2): +-(a - b) / 2 / (std + 1e-4)."""
    z = (a - b) / 2 / (abs(a - b) / math.sqrt(2) + 1e-4)
    return z, -z


H, A, X = "Heat (1995)", "Alien (1979)", "Xanadu (1980)"  # Alien is the one relevant item
D3 = 1 / math.log2(3)
ADVANTAGES = [  # G = 2 sampled lists as text, the reward, the expected advantage per rank
    ([f"{A}\n{H}", f"{H}\n{A}"], "exp_inf", [pair(1, 0), pair(0, 1)]),
    ([f"{A}\n{H}", f"{A}\n{X}"], "exp_inf", [(0, 0), (0, 0)]),  # the group agrees at each rank
    ([f"{A}\n{A}", f"{H}\n{A}"], "exp_inf", [pair(1, 0), pair(0, 1)]),  # a repeat is no hit
    ([f"{H}\n{A}", f"{H}"], "exp_inf", [(0, 0), pair(1, 0)]),  # a missing line earns nothing
    ([f"{A}\n{H}", f"{H}\n{A}"], "log", [pair(1, D3), pair(0, D3)]),  # DCG@k:N
    ([f"{A}\n{H}", f"{H}\n{A}"], "dcg", [pair(1, D3), pair(1, D3)]),  # one reward per list
]


@pytest.mark.parametrize("texts, kind, expected", ADVANTAGES)
def test_advantages_of_sampled_lists(texts, kind, expected):
    cat = common.Catalog([{"title": t, "year": y} for t, y in
                          (("Heat", 1995), ("Alien", 1979), ("Xanadu", 1980))])
    row = {"id": "c#0", "seen_titles": [], "groundtruth_with_release_year": [["Alien", "1979"]]}
    rel = rg.rank_relevance(texts, [row] * len(texts), cat, 2)
    adv = rg.group_advantages(rg.rank_rewards(rel, kind), len(texts))  # [G, N]
    assert adv.T.tolist() == [pytest.approx(list(e), abs=1e-6) for e in expected]


def test_advantages_zero_when_the_group_agrees_and_normalised_per_rank():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0],   # prompt 1 (G = 2)
                            [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # prompt 2
    adv = rg.group_advantages(rewards, 2)
    z = 0.5 / (math.sqrt(0.5) + 1e-4)  # mean 0.5, unbiased std sqrt(0.5)
    assert adv.flatten().tolist() == pytest.approx([z, 0, 0, -z, 0, 0, 0, z, 0, 0, -z, 0], abs=1e-6)


# --- 5. the loss ----------------------------------------------------------------------------------

def hand_batch(seed=0, B=4, T=7, n=3):
    g = torch.Generator().manual_seed(seed)
    rank = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2, -1], [0, 0, 0, 1, 2, 3, -1],
                         [0, 1, 2, -1, -1, -1, -1]])[:B, :T]
    mask = (rank >= 0).long()
    adv = torch.randn(B, n, generator=g).gather(1, rank.clamp(0, n - 1)) * mask
    logp_old = -torch.rand(B, T, generator=g)
    return rank.clamp(min=0), mask, adv, logp_old


def loss(logp, logp_old, adv, unit, mask, n_units, logp_ref=None, beta=0.0, eps=(0.06, 0.08), **kw):
    return rg.rank_grpo_loss(logp, logp_old, logp_ref, adv, unit, mask,
                             eps_low=eps[0], eps_high=eps[1], beta=beta,
                             n_units=n_units, n_tokens=mask.sum(), **kw)


def test_rank_ratio_is_the_geometric_mean_of_token_ratios():
    rank, mask, _, logp_old = hand_batch()
    logp = logp_old + 0.1 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))
    log_ratio, size = rg.unit_mean(logp - logp_old, rank, mask)
    i = 0  # rank 1 of sequence 0 is tokens 2..4
    token_ratios = torch.exp(logp[i, 2:5] - logp_old[i, 2:5])
    geo_mean = (token_ratios.prod() ** (1 / 3)).item()
    assert torch.exp(log_ratio[i, 3]).item() == pytest.approx(geo_mean, rel=1e-6)
    assert size[i, 3] == 3


def test_ratio_is_exactly_one_on_policy():
    rank, mask, adv, logp_old = hand_batch()
    logp = logp_old.clone().requires_grad_(True)
    _, st = loss(logp, logp.detach(), adv, rank, mask, 12)
    assert st["ratio_sum"] == st["tokens"] and st["clip_low"] == st["clip_high"] == 0


def test_on_policy_gradient_is_the_rank_policy_gradient(tiny):
    """At theta = theta_old the gradient of Eq. 6 is
    sum_i sum_k A_ik (1/(G N |y^(k)|)) sum_t grad log pi."""
    model, tok = tiny
    prompts = [tok.encode("Heat (1995)\n"), tok.encode("x")]
    comps = [tok.encode("Alien (1979)\nJaws (1975)")[:10], tok.encode("ab\ncd\nef\ngh (1)")[:10]]
    batch = rg.make_batch(prompts, comps, tok.pad_token_id)
    n = 3
    table = rg.newline_table(tok, model.get_output_embeddings().weight.shape[0])
    mask = batch.completion_mask
    rank = rg.segment_ranks(table[batch.completion_ids], mask)
    adv = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.0, -1.0]]).gather(1, rank.clamp(0, n - 1))
    adv = torch.where(rank >= n, torch.full_like(adv, -0.1), adv)

    model.zero_grad()
    logp = rg.completion_logprobs(model, batch)
    loss(logp, logp.detach(), adv, rank, mask, 2 * n)[0].backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    logp = rg.completion_logprobs(model, batch)
    pg = 0
    for i in range(2):
        for k in range(int(rank[i].max()) + 1):
            sel = rank[i] == k
            if sel.any():
                pg = pg + adv[i][sel][0] * logp[i][sel].mean() / (2 * n)
    (-pg).backward()
    for a, b in zip(got, model.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-6)
    model.zero_grad()


def loss_and_grad(level, rank, mask, adv, logp_old, logp0, n_units, **kw):
    logp = logp0.clone().requires_grad_(True)
    unit = rg.ratio_units(rank, level)
    value, _ = loss(logp, logp_old, adv, unit, mask, n_units, eps=(0.2, 0.3), **kw)
    value.backward()
    return value.item(), logp.grad


def test_one_token_items_make_rank_level_equal_token_level():
    B, n = 3, 5
    rank = torch.arange(n).repeat(B, 1)  # every item is one token, no EOS, exactly N items
    mask = torch.ones(B, n, dtype=torch.long)
    g = torch.Generator().manual_seed(2)
    adv, logp_old = torch.randn(B, n, generator=g), -torch.rand(B, n, generator=g)
    logp0 = logp_old + 0.3 * torch.randn(B, n, generator=g)  # off-policy, some ratios clipped
    a = loss_and_grad("rank", rank, mask, adv, logp_old, logp0, B * n)
    b = loss_and_grad("token", rank, mask, adv, logp_old, logp0, B * n)
    assert a[0] == pytest.approx(b[0]) and torch.allclose(a[1], b[1])


def test_one_rank_makes_rank_level_equal_sequence_level():
    B, T = 3, 6
    rank = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    logp_old = -torch.rand(B, T, generator=g)
    logp0 = logp_old + 0.2 * torch.randn(B, T, generator=g)
    a = loss_and_grad("rank", rank, mask, adv, logp_old, logp0, B)
    b = loss_and_grad("sequence", rank, mask, adv, logp_old, logp0, B)
    assert a[0] == pytest.approx(b[0]) and torch.allclose(a[1], b[1])


def test_released_aggregation_sums_an_items_tokens_where_eq_6_averages_them():
    rank, mask, adv, logp_old = hand_batch()
    paper = loss_and_grad("rank", rank, mask, adv, logp_old, logp_old, 12)[1]
    released = loss_and_grad("rank", rank, mask, adv, logp_old, logp_old, 12, token_mean=True)[1]
    size = rg.unit_mean(torch.zeros_like(logp_old), rank, mask)[1]
    # on-policy: paper -A / (|unit| G N) per token, released -A / n_tokens
    assert torch.allclose(paper * size * 12, -adv * mask / 1.0, atol=1e-6)
    assert torch.allclose(released * mask.sum(), -adv * mask, atol=1e-6)


@pytest.mark.parametrize("shift, sign, zero", [
    (+0.3, +1.0, True),    # ratio e^0.3 > 1 + eps_high and A > 0: clipped, no gradient
    (-0.3, -1.0, True),    # ratio e^-0.3 < 1 - eps_low and A < 0: clipped, no gradient
    (+0.3, -1.0, False),   # ratio high but A < 0: the unclipped term is the minimum, gradient flows
    (-0.3, +1.0, False),   # ratio low but A > 0: gradient flows
])
def test_clipping_removes_the_rank_gradient_on_the_side_the_advantage_pushes(shift, sign, zero):
    unit = torch.tensor([[0, 0, 0, 2, 2]])
    mask = torch.ones_like(unit)
    logp_old = torch.full((1, 5), -1.0)
    logp = logp_old.clone()
    logp[0, :3] += shift  # rank 0 off-policy by exp(shift); rank 1 on-policy
    logp.requires_grad_(True)
    adv = torch.tensor([[sign, sign, sign, 1.0, 1.0]])
    value, st = loss(logp, logp_old, adv, unit, mask, 2)
    value.backward()
    assert (logp.grad[0, :3].abs().sum() == 0) == zero
    assert logp.grad[0, 3:].abs().sum() > 0
    assert (st["clip_low"] + st["clip_high"] == 3) == zero


def test_kl_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(4)
    a, b = -torch.rand(1000, generator=g) * 5, -torch.rand(1000, generator=g) * 5
    assert (rg.kl_k3(a, b) >= 0).all()
    assert torch.equal(rg.kl_k3(a, a), torch.zeros(1000))


def test_kl_enters_the_loss_with_weight_beta():
    rank, mask, adv, logp_old = hand_batch()
    logp = logp_old.clone().requires_grad_(True)
    logp_ref = logp_old - 0.5
    l0, _ = loss(logp, logp.detach(), adv, rank, mask, 12, logp_ref=logp_ref, beta=0.0)
    l1, st = loss(logp, logp.detach(), adv, rank, mask, 12, logp_ref=logp_ref, beta=0.5)
    kl = (rg.kl_k3(logp_old, logp_ref) * mask).sum() / mask.sum()
    assert (l1 - l0).item() == pytest.approx(0.5 * kl.item())
    assert st["kl_sum"].item() == pytest.approx(kl.item() * mask.sum().item(), rel=1e-5)


# --- 6. accumulation ------------------------------------------------------------------------------

def test_accumulated_micro_batches_equal_the_full_batch(tiny):
    model, tok = tiny
    texts = ["Heat (1995)\nAlien (1979)", "ab\ncd\nef", "Jaws (1975)\nx", "q\n\nr\ns\nt"]
    prompts = [tok.encode("prompt one"), tok.encode("a longer prompt two"),
               tok.encode("prompt one"), tok.encode("prompt four is here")]
    completions = [tok.encode(t) + [tok.eos_token_id] for t in texts]
    ro = rg.Rollouts(prompts, completions, [True] * 4, texts, [{}] * 4)
    n = 3
    table = rg.newline_table(tok, model.get_output_embeddings().weight.shape[0])
    adv_rank = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.1, -0.3],
                             [-1.0, 0.0, 1.0], [0.5, 0.5, -0.5]])
    g = torch.Generator().manual_seed(5)
    noise = {i: 0.05 * torch.randn(40, generator=g) for i in range(4)}

    def grads(mbs, level):
        cfg = rg.Config(micro_batch_size=mbs, eps_u=-0.1, eps_o=-0.1, eps_n=0.1)
        batches = rg.micro_batches(ro, adv_rank, table, n, level, cfg, tok.pad_token_id, "cpu")
        n_tokens = sum(int(b["mask"].sum()) for _, b in batches)
        model.zero_grad()
        start = 0
        for batch, b in batches:
            idx = range(start, start + len(batch.prompt_of))
            start += len(batch.prompt_of)
            logp = rg.completion_logprobs(model, batch)
            # off-policy
            logp_old = logp.detach() + torch.stack([noise[i][:logp.shape[1]] for i in idx])
            value, _ = rg.rank_grpo_loss(logp, logp_old, logp_old - 0.1, b["adv"], b["unit"],
                                         b["mask"], eps_low=0.06, eps_high=0.08, beta=0.01,
                                         n_units=4 * n, n_tokens=n_tokens)
            value.backward()
        return [p.grad.clone() for p in model.parameters()]

    for level in ("rank", "token", "sequence"):
        full = grads(4, level)
        for mbs in (1, 3):
            for a, b in zip(full, grads(mbs, level)):
                assert torch.allclose(a, b, atol=1e-6)
    model.zero_grad()


def test_rl_sampling_draws_from_the_whole_softmax(tiny):
    model, tok = tiny
    prompt = tok.encode("Recommend movies like Heat (1995)")
    cfg = rg.Config(group_size=3000, max_new_tokens=1, gen_batch_size=3000)
    torch.manual_seed(0)
    ro = rg.sample_rollouts(model, tok, [prompt], [{}], cfg)
    first = torch.tensor([c[0] for c in ro.completion_ids])
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
    outside = ~torch.isin(first, probs.topk(50).indices)  # a top-50 sampler would never draw these
    top50_mass = probs.topk(50).values.sum().item()
    assert outside.float().mean().item() == pytest.approx(1 - top50_mass, abs=0.04)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_draws_from_the_whole_softmax(tiny, temperature):
    """No top-k, top-p or other warper: the first sampled token follows softmax(logits / T) over the
    whole vocabulary (generate() with top_k unset would never draw more than 50 distinct tokens)."""
    model, tok = tiny
    prompt = tok.encode("Recommend movies like Heat (1995)")
    torch.manual_seed(0)
    draws = [c[0] for c in rg.sample(model, [prompt], 4000, 1, [], tok.pad_token_id,
                                     temperature)]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
    freq = torch.bincount(torch.tensor(draws), minlength=probs.numel()).float() / len(draws)
    outside = ~torch.isin(torch.tensor(draws), probs.topk(50).indices)
    assert outside.float().mean().item() == pytest.approx(1 - probs.topk(50).values.sum().item(),
                                                          abs=0.04)
    assert 0.5 * (freq - probs).abs().sum() < 0.2  # total variation: ~0.12 from 4000 draws alone



def plain_logprobs(model, prompt, completion, temperature=1.0):
    """log pi of each completion token from the plain forward pass of the sequence alone."""
    logits = model(torch.tensor([prompt + completion])).logits.float()[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits / temperature, -1).gather(
        -1, torch.tensor(completion)[:, None]).squeeze(-1)


# prompts of different lengths (left-padded in one batch), shared by several completions
PROMPTS = ["Heat (1995) is", "a much longer prompt about Alien (1979) and", "Heat (1995) is"]
COMPLETIONS = [" Ronin (1998)\nJaws", " Heat (1995)\nX", "\nToy Story (1995)"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("share", [True, False])
def test_completion_logprobs_equal_the_plain_forward_pass(tiny, temperature, share):
    model, tok = tiny
    prompts, comps = [tok.encode(p) for p in PROMPTS], [tok.encode(c) for c in COMPLETIONS]
    batch = rg.make_batch(prompts, comps, tok.pad_token_id)
    assert batch.prompt_ids.shape[0] == 2 and batch.prompt_of.tolist() == [0, 1, 0]  # shared once
    with torch.no_grad():
        lp = rg.completion_logprobs(model, batch, temperature, share, chunk=3)
        for i in range(3):
            assert torch.allclose(lp[i, :len(comps[i])],
                                  plain_logprobs(model, prompts[i], comps[i], temperature),
                                  atol=1e-5)


def test_shared_prompt_gradients_equal_the_plain_forward_pass(tiny):
    model, tok = tiny
    prompts, comps = [tok.encode(p) for p in PROMPTS], [tok.encode(c) for c in COMPLETIONS]
    batch = rg.make_batch(prompts, comps, tok.pad_token_id)
    weights = torch.rand(batch.completion_ids.shape, generator=torch.Generator().manual_seed(0))

    def grads(fn):
        model.zero_grad()
        fn().backward()
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out

    plain = grads(lambda: sum((plain_logprobs(model, p, c) * weights[i, :len(c)]).sum()
                              for i, (p, c) in enumerate(zip(prompts, comps))))
    for share in (True, False):
        got = grads(lambda: (rg.completion_logprobs(model, batch, share_prompts=share, chunk=4)
                             * weights * batch.completion_mask).sum())
        for a, b in zip(got, plain):
            assert torch.allclose(a, b, atol=1e-5)


def test_token_logprob_backward_is_the_gradient_of_the_log_softmax():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (2, 3), generator=g)
    for t in (1.0, 0.7):
        assert torch.autograd.gradcheck(lambda h, w: rg.TokenLogprob.apply(h, w, y, t), (h, w))


class HostSyncs(TorchFunctionMode):
    """Counts the tensor operations that make the host wait for the device: reading a value
    (.item, int(), bool(), .tolist, .cpu), nonzero, and indexing with a boolean mask."""

    READS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__",
             "__index__"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else ()
        masks = [i for i in (index if isinstance(index, tuple) else (index,))
                 if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        self.n += name in self.READS or bool(masks)
        return func(*args, **(kwargs or {}))


def test_sampling_syncs_the_host_once_a_token_plus_once_a_compaction(tiny, monkeypatch):
    """A GPU runs ahead of the host until the host reads a value: the loop reads one per token
    (are all done?), and one more to compact the batch, which happens only once a quarter of it
    has finished (not for every finished row)."""
    model, tok = tiny
    prompts = [tok.encode("Heat (1995) and"), tok.encode("a longer prompt about Jaws (1975) and")]
    compactions, select = [], rg.BufferCache.select
    monkeypatch.setattr(rg.BufferCache, "select",
                        lambda self, rows: compactions.append(len(rows)) or select(self, rows))

    def syncs(n_tokens, eos):
        compactions.clear()
        torch.manual_seed(0)
        with HostSyncs() as mode:
            out = rg.sample(model, prompts, 8, n_tokens, eos, tok.pad_token_id)
        return mode.n, len(compactions) - 1, out  # the first select repeats the prompts

    base, _, _ = syncs(1, [])
    n, compacted, _ = syncs(40, [])  # nothing finishes
    assert compacted == 0 and n - base <= 39
    eos = list(range(0, len(tok), 9))  # about one token in nine ends a sample
    n, compacted, out = syncs(40, eos)
    finished = sum(bool(c) and c[-1] in eos for c in out)
    assert finished >= 8 and 1 <= compacted < finished
    assert n - base <= 39 + compacted
    assert all(c[-1] in eos or len(c) == 40 for c in out)
    assert all(t not in eos for c in out for t in c[:-1])  # each ends at its first EOS


def test_the_reference_pass_runs_each_prompt_once_under_activation_checkpointing(tiny):
    """--grad-checkpointing drops the shared prompt from the training pass only: the reference
    log-probs still run each distinct prompt once, and equal those of the sequences run whole."""
    model, tok = tiny
    policy, ref = copy.deepcopy(model), copy.deepcopy(model).eval().requires_grad_(False)
    common.enable_activation_checkpointing(policy)
    cfg = rg.resolve(rg.Config(group_size=4, max_new_tokens=6, micro_batch_size=8, lr=1e-4,
                               grad_checkpointing=True, bf16=False), 2)
    prompts = [tok.encode("Heat (1995) and a longer"), tok.encode("Alien")]
    fed, seen = [], {}
    hook = ref.model.embed_tokens.register_forward_hook(lambda m, a, out: fed.append(a[0].shape))
    loss = rg.rank_grpo_loss

    def recording(*args, **kwargs):  # keeps the reference log-probs the loss is given
        seen.setdefault("ref", args[2])
        return loss(*args, **kwargs)
    rg.rank_grpo_loss = recording
    try:
        torch.manual_seed(0)
        _, ro, _ = rg.rl_step(cfg, policy, ref, torch.optim.AdamW(policy.parameters()), tok,
                              common.Catalog([{"title": "Heat", "year": 1995}]), prompts,
                              [{"id": f"c{i}#0", "seen_titles": [],
                                "groundtruth_with_release_year": [["Heat", "1995"]]}
                               for i in range(2)], rg.newline_table(tok, len(tok)))
    finally:
        hook.remove()
        rg.rank_grpo_loss = loss
    batch = rg.make_batch(ro.prompt_ids, ro.completion_ids, tok.pad_token_id)
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    assert fed == [(2, P), (8, T)]  # 2 distinct prompts, then 8 completions on their cache
    with torch.no_grad():
        whole = rg.completion_logprobs(ref, batch, share_prompts=False)
    assert torch.allclose(seen["ref"], whole, atol=1e-5)


def test_the_loss_example_of_docs_loss_md_is_rl_steps(tiny, monkeypatch):
    """docs/loss.md's example runs as written, and on a real batch of 2 prompts x 4 samples gives
    the loss rl_step computes (so its normaliser, among the rest, cannot drift)."""
    from conftest import ROOT
    _, toy, example = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "loss.md").read_text(),
                                 re.S)
    ns: dict = {}
    exec(toy + example, ns)
    assert torch.isfinite(ns["loss"]) and ns["logp"].grad is not None
    model, tok = tiny
    texts = ["Heat (1995)\nAlien (1979)", "x\nHeat (1995)", "Alien (1979)", "a\nb\nc",
             "Heat (1995)\nJaws (1975)", "Alien (1979)\nHeat (1995)", "q", "Heat (1995)\nr"]
    prompts = [tok.encode("Heat (1995) and"), tok.encode("Alien")]
    rows = [{"id": f"c{i}#0", "seen_titles": [],
             "groundtruth_with_release_year": [["Heat", "1995"], ["Alien", "1979"]]}
            for i in range(2)]
    ro = rg.Rollouts([p for p in prompts for _ in range(4)],
                     [tok.encode(t) + [tok.eos_token_id] for t in texts], [True] * 8, texts,
                     [r for r in rows for _ in range(4)])
    monkeypatch.setattr(rg, "sample_rollouts", lambda *a, **k: ro)
    seen, loss_fn = {}, rg.rank_grpo_loss

    def recording(*args, **kwargs):
        loss, stats = loss_fn(*args, **kwargs)
        seen.update(args=args, kwargs=kwargs)
        return loss, stats
    monkeypatch.setattr(rg, "rank_grpo_loss", recording)
    cfg = rg.resolve(rg.Config(group_size=4, micro_batch_size=8, bf16=False, lr=1e-4), 2)
    catalog = common.Catalog([{"title": t, "year": y} for t, y in
                              (("Heat", 1995), ("Alien", 1979), ("Jaws", 1975))])
    rg.rl_step(cfg, copy.deepcopy(model), copy.deepcopy(model), torch.optim.SGD(
        model.parameters(), lr=0.0), tok, catalog, prompts, rows, rg.newline_table(tok, len(tok)))
    monkeypatch.undo()  # the example calls the real loss
    batch = rg.make_batch(ro.prompt_ids, ro.completion_ids, tok.pad_token_id)
    lengths = batch.completion_mask.sum(1)
    ns = {"rg": rg, "G": 4, "N": 2, "B": 8, "mask": batch.completion_mask,
          "eos_tok": torch.arange(batch.completion_ids.shape[1]) == lengths[:, None] - 1,
          "nl_tok": rg.newline_table(tok, len(tok))[batch.completion_ids],
          "rel": rg.rank_relevance(ro.texts, ro.rows, catalog, 2),
          "logp": seen["args"][0].detach().requires_grad_(), "logp_ref": seen["args"][2]}
    assert ns["rel"].sum() > 0  # some ranks are hits: advantages of both signs
    exec(example, ns)
    # rl_step's loss on its own inputs; the gradient tells the scale of the policy term apart
    # (the value hardly does: on-policy, the normalised advantages of a rank sum to zero)
    logp = seen["args"][0].detach().requires_grad_()
    loss, _ = loss_fn(logp, *seen["args"][1:], **seen["kwargs"])
    loss.backward()
    assert torch.allclose(ns["loss"].detach(), loss.detach())
    assert logp.grad.abs().sum() > 0 and torch.allclose(ns["logp"].grad, logp.grad)


# --- 7. smoke runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, demo_data):
    """The tiny model after a few seconds of fitting one list after the demo prompts, so that its
    samples have several lines: items beyond N = 1 (overflow, eps_o) give every step a gradient."""
    model, tok = common.load_model(TINY)
    listing = tok.encode("Heat (1995)\nAlien (1979)\nJaws (1975)\nRocky (1976)\nGravity (2013)")
    rows = common.read_rows(demo_data / "train.jsonl", "")[:4]
    prompts = common.encode_prompts(tok, [r["prompt"] for r in rows], 2048)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        ids = torch.tensor([prompts[step % 4] + listing])
        labels = ids.clone()
        labels[0, :len(prompts[step % 4])] = -100
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("sft")
    common.save_model(model, tok, out)
    return out


def args(demo_data, sft_dir, out, *extra):
    return ["--data-dir", str(demo_data), "--model", str(sft_dir), "--out", str(out),
            "--steps", "2", "--prompts-per-step", "2", "--group-size", "3",
            "--micro-batch-size", "4", "--max-new-tokens", "20", "--val-limit", "2",
            "--val-every", "0", "--sample-every", "1", "--save-every", "1", "--lr", "1e-3",
            "--n-items", "1", *extra]


def weights(d):
    return common.load_model(str(d))[0].state_dict()


@pytest.mark.parametrize("algo", ["rank_grpo", "grpo", "gspo"])
def test_smoke_each_algo_changes_weights_and_logs(algo, demo_data, sft_dir, tmp_path, capsys):
    options = ["--temperature", "0.8", "--aggregation", "released"] if algo == "rank_grpo" else []
    rg.main(args(demo_data, sft_dir, tmp_path, "--algo", algo,
                 "--mu", "2" if algo == "gspo" else "1",
                 "--val-every", "2" if algo == "rank_grpo" else "0", *options))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward@1", "ndcg", "in_catalog", "valid", "kl", "clip_low", "clip_high",
                "ratio", "grad_norm", "lr", "len", "t_sample", "t_score", "t_ref", "t_train"):
        assert key in steps[0]
    assert any("val_ndcg@1" in r for r in log) == (algo == "rank_grpo")
    assert all(r["grad_norm"] > 0 for r in steps)
    before, after = weights(sft_dir), weights(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "| ground truth:" in capsys.readouterr().out
    config = json.loads((tmp_path / "run_config.json").read_text())
    aggregation = "released" if algo == "rank_grpo" else "paper"
    assert config["algo"] == algo and config["aggregation"] == aggregation


def test_resume_continues_exactly(demo_data, sft_dir, tmp_path):
    rg.main(args(demo_data, sft_dir, tmp_path / "straight", "--steps", "3"))
    rg.main(args(demo_data, sft_dir, tmp_path / "resumed", "--steps", "2"))
    rg.main(args(demo_data, sft_dir, tmp_path / "resumed", "--steps", "3", "--resume"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = weights(sft_dir)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    lines = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if "reward" in json.loads(x)]
    assert steps == [1, 2, 3]


def test_missing_sft_run_is_a_clear_error(demo_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.DataError, match="run 03_sft.py first"):
        rg.main(["--data-dir", str(demo_data)])


def test_the_benchmark_stops_samples_early_and_changes_prompt_widths(monkeypatch, capsys):
    """The GPU benchmark's workload is realistic: completions end at EOS before the cap (so
    finished rows leave the batch) and every step draws new prompt widths."""
    widths = []
    real_step = rg.rl_step

    def spy(cfg, policy, ref, optimizer, tok, catalog, prompts, rows, nl_table):
        widths.append(sorted(len(p) for p in prompts))
        return real_step(cfg, policy, ref, optimizer, tok, catalog, prompts, rows, nl_table)

    monkeypatch.setattr(rg, "rl_step", spy)
    rg.main(["--benchmark", "tiny", "--prompts-per-step", "4", "--group-size", "4",
             "--max-new-tokens", "24", "--benchmark-prompt-tokens", "40", "--benchmark-steps", "2",
             "--micro-batch-size", "8", "--cpu"])
    out = capsys.readouterr().out
    lengths = [float(m) for m in re.findall(r"\| (\d+) new tokens per sample", out)]
    assert len(lengths) == 3 and all(0 < x < 24 for x in lengths)
    assert len(set(map(tuple, widths))) > 1 and all(30 <= w <= 40 for ws in widths for w in ws)
