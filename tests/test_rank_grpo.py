"""04_rank_grpo.py: segmentation, rewards, advantages, the loss's identities, accumulation, smoke runs."""

import json
import math

import pytest
import torch

import common
from conftest import stage

rg = stage("04_rank_grpo")

# A hand-built vocabulary: id -> text. 1-4 contain newlines; 6 is EOS.
VOCAB = {0: "A", 1: "\n", 2: "\n\n", 3: "\n  ", 4: " \n", 5: "B", 6: "<eos>"}
NL = torch.tensor([VOCAB[i].count("\n") for i in range(len(VOCAB))])
EOS = 6


def seg(ids, n_real=None):
    ids = torch.tensor([ids])
    mask = torch.ones_like(ids)
    if n_real is not None:
        mask[0, n_real:] = 0
    return rg.segment_ranks(ids, mask, NL)[0].tolist()


# --- 1. segmentation ------------------------------------------------------------------------------

def test_segment_newline_closes_its_item_and_eos_belongs_to_last_line():
    # "A A\nB\nA<eos>": the newline belongs to the item it ends; EOS to the last line
    assert seg([0, 0, 1, 5, 1, 0, EOS]) == [0, 0, 0, 1, 1, 2, 2]


def test_segment_multi_newline_token_skips_a_rank():
    # "A\n\nB": the "\n\n" token closes item 0; line 1 is empty (no tokens); B is rank 2
    assert seg([0, 2, 5, EOS]) == [0, 0, 2, 2]


def test_segment_newline_followed_by_spaces_and_space_before_newline():
    assert seg([0, 3, 5, 4, 0]) == [0, 0, 1, 1, 2]


def test_segment_padding_is_minus_one():
    assert seg([0, 1, 5, EOS, EOS, EOS], n_real=4) == [0, 0, 1, 1, -1, -1]


def test_overflow_and_premature_eos_advantages():
    n = 2
    adv_rank = torch.tensor([[0.5, -0.5]])
    # three items (one overflow) ending with EOS: the newline after item N opens the overflow
    ids = torch.tensor([[0, 1, 5, 1, 0, EOS]])
    mask = torch.ones_like(ids)
    rank = rg.segment_ranks(ids, mask, NL)
    eos = ids == EOS
    adv = rg.token_advantages(adv_rank, rank, eos, n, eps_u=-0.1, eps_o=-0.2)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, -0.5, -0.2, -0.2, -0.2])
    # exactly N items, then EOS: the EOS ends item N and carries its advantage, no penalty
    ids = torch.tensor([[0, 1, 5, EOS]])
    rank = rg.segment_ranks(ids, torch.ones_like(ids), NL)
    adv = rg.token_advantages(adv_rank, rank, ids == EOS, n, eps_u=-0.1, eps_o=-0.2)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, -0.5, -0.5])
    # a "\n\n" token after item N also opens the overflow
    ids = torch.tensor([[0, 1, 5, 2, 0]])
    rank = rg.segment_ranks(ids, torch.ones_like(ids), NL)
    adv = rg.token_advantages(adv_rank, rank, torch.zeros_like(ids, dtype=torch.bool), n, -0.1, -0.2)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, -0.5, -0.2, -0.2])
    # one item, then EOS: premature (fewer than N); the EOS token alone gets eps_u
    ids = torch.tensor([[0, 5, EOS]])
    rank = rg.segment_ranks(ids, torch.ones_like(ids), NL)
    adv = rg.token_advantages(adv_rank, rank, ids == EOS, n, eps_u=-0.1, eps_o=-0.2)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, -0.1])
    # no EOS at all (cut at max_new_tokens) with fewer than N items: no penalty
    ids = torch.tensor([[0, 5, 0]])
    rank = rg.segment_ranks(ids, torch.ones_like(ids), NL)
    adv = rg.token_advantages(adv_rank, rank, torch.zeros_like(ids, dtype=torch.bool), n, -0.1, -0.2)
    assert adv.tolist() == [[0.5, 0.5, 0.5]]


def test_the_eos_that_ends_an_overlong_list_leaves_the_loss():
    n = 2
    ids = torch.tensor([[0, 1, 5, 1, 0, EOS], [0, 1, 5, EOS, 0, 0]])  # 3 items (overflow); exactly N
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    eos = (ids == EOS) & mask.bool()
    rank, kept = rg.drop_late_eos(rg.segment_ranks(ids, mask, NL), mask, eos, n)
    assert rank.tolist() == [[0, 0, 1, 1, 2, -1], [0, 0, 1, 1, -1, -1]]
    assert kept.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    adv = rg.token_advantages(torch.tensor([[0.5, -0.5], [0.5, -0.5]]), rank, eos, n, eps_u=-0.1, eps_o=-0.2)
    logp = torch.full((2, 6), -1.0, requires_grad=True)
    loss, _ = rg.rank_grpo_loss(logp, logp.detach(), None, adv, rank, kept, eps_low=0.2, eps_high=0.2,
                                beta=0.0, n_ranks=n)
    loss.backward()
    assert logp.grad[0, 5] == 0  # the late EOS: neither pushed down nor up
    assert logp.grad[0, 3] > 0 and logp.grad[0, 4] > 0  # the overflow (and the newline opening it): down
    assert logp.grad[1, 3] > 0  # an EOS after exactly N items keeps item N's (negative) advantage


def test_decision_tokens_join_the_item_they_decide_about():
    n = 2

    def units(ids):
        ids = torch.tensor([ids])
        mask, eos = torch.ones_like(ids), ids == EOS
        rank, mask = rg.drop_late_eos(rg.segment_ranks(ids, mask, NL), mask, eos, n)
        return rg.decision_units(rank, eos, n)[0].tolist()

    assert units([0, 1, 5, 1, 0, EOS]) == [0, 0, 1, 2, 2, -1]  # newline after item N opens item N+1
    assert units([0, 5, EOS]) == [0, 0, 1]  # EOS after 1 < N items: the missing item 2, alone
    assert units([0, 1, 5, EOS]) == [0, 0, 1, 1]  # exactly N: the EOS stays with item N
    assert units([0, 1, 5, 2, 0]) == [0, 0, 1, 2, 3]  # "\n\n" after item N: the (empty) rank N+1


def test_a_decision_token_gets_a_whole_rank_of_penalty():
    # Two samples, N = 2, no hits (item advantages 0): only the penalties act.
    n, eps_u, eps_o = 2, -0.1, -0.2
    ids = torch.tensor([[0, 0, 1, 5, 5, 1, 0, 0, EOS], [0, 0, 0, EOS, 6, 6, 6, 6, 6]])
    mask = torch.tensor([[1] * 9, [1, 1, 1, 1, 0, 0, 0, 0, 0]])
    eos = (ids == EOS) & mask.bool()
    rank, mask = rg.drop_late_eos(rg.segment_ranks(ids, mask, NL), mask, eos, n)
    adv = rg.token_advantages(torch.zeros(2, n), rank, eos, n, eps_u, eps_o)
    grads = {}
    for own in (False, True):
        r = rg.decision_units(rank, eos, n) if own else rank
        logp = torch.full((2, 9), -1.0, requires_grad=True)
        loss, _ = rg.rank_grpo_loss(logp, logp.detach(), None, adv, r, mask, eps_low=0.2, eps_high=0.2,
                                    beta=0.0, n_ranks=n)
        loss.backward()
        grads[own] = logp.grad
    # the overflow newline (index 5) moves like the overflow item it opens, 1/(|unit|) of -eps_o each
    unit_w = 1 / (2 * n)  # 1/(G N): the weight of one rank
    assert grads[True][0, 5] == pytest.approx(-eps_o * unit_w / 3)
    assert grads[True][0, 6] == pytest.approx(-eps_o * unit_w / 3)
    # ... where in item N's unit (3 tokens) it moved its tokens by eps_o / 9 only
    assert grads[False][0, 5] == pytest.approx(-eps_o * unit_w / 9)
    # the premature EOS is a unit alone: a whole rank of eps_u, instead of 1/16 of one
    assert grads[True][1, 3] == pytest.approx(-eps_u * unit_w)
    assert grads[False][1, 3] == pytest.approx(-eps_u * unit_w / 16)
    assert grads[True][1, 0] == 0 and grads[True][0, 3] == 0  # items with advantage 0 are untouched


def test_segmentation_matches_text_split_with_a_real_tokenizer(tiny):
    model, tok = tiny
    table = rg.newline_table(tok, model.get_output_embeddings().weight.shape[0])
    assert table[tok.convert_tokens_to_ids("ĊĊ")] == 2
    for text in ["Heat (1995)\nAlien (1979)\n \n\nJaws (1975)", "A\n\n\nB \nC", "no newline", "\n\nx\n"]:
        ids = tok.encode(text)
        rank = rg.segment_ranks(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), table)[0]
        for t in range(len(ids)):  # brute force: newlines in the text before token t
            assert rank[t] == tok.decode(ids[:t]).count("\n")
        assert int(table[ids].sum()) == text.count("\n")


# --- 2. rewards ------------------------------------------------------------------------------------

def test_rewards_hand_computed():
    rel = torch.tensor([[1.0, 0.0, 1.0]])
    assert rg.rank_rewards(rel, "exp_inf").tolist() == [[1.0, 0.0, 1.0]]
    d = [1.0, 0.0, 1 / math.log2(4)]
    assert rg.rank_rewards(rel, "log")[0].tolist() == pytest.approx([d[0] + d[2], d[2], d[2]])
    assert rg.rank_rewards(rel, "dcg")[0].tolist() == pytest.approx([common.dcg([1, 0, 1], 3)] * 3)


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
    assert rg.rank_rewards(rel, "dcg")[0, 3].item() == pytest.approx(common.dcg([0, 1, 1, 0], 4))


def test_rank_relevance_from_texts():
    cat = common.Catalog([{"title": "Heat", "year": 1995}, {"title": "Alien", "year": 1979}])
    row = {"id": "c#0", "seen_titles": [], "groundtruth_with_release_year": [["Alien", "1979"]]}
    rel = rg.rank_relevance(["Heat (1995)\nAlien (1979)\nAlien (1979)", "junk\n\nAlien (1979)"],
                            [row, row], cat, 3)
    assert rel.tolist() == [[0, 1, 0], [0, 0, 1]]


# --- 3. advantages ----------------------------------------------------------------------------------

def test_advantages_zero_when_the_group_agrees_and_normalised_per_rank():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0],   # prompt 1 (G = 2)
                            [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # prompt 2
    adv = rg.group_advantages(rewards, 2)
    z = 0.5 / (math.sqrt(0.5) + 1e-4)  # mean 0.5, unbiased std sqrt(0.5)
    assert adv.flatten().tolist() == pytest.approx([z, 0, 0, -z, 0, 0, 0, z, 0, 0, -z, 0], abs=1e-6)


# --- 4. the loss ------------------------------------------------------------------------------------

def hand_batch(seed=0, B=4, T=7, n=3):
    g = torch.Generator().manual_seed(seed)
    rank = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2, -1], [0, 0, 0, 1, 2, 3, -1],
                         [0, 1, 2, -1, -1, -1, -1]])[:B, :T]
    mask = (rank >= 0).long()
    adv = torch.randn(B, n, generator=g).gather(1, rank.clamp(0, n - 1)) * mask
    logp_old = -torch.rand(B, T, generator=g)
    return rank, mask, adv, logp_old


def test_rank_ratio_is_the_geometric_mean_of_token_ratios():
    rank, mask, _, logp_old = hand_batch()
    logp = logp_old + 0.1 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))
    log_ratio, size = rg.unit_mean(logp - logp_old, rank.clamp(min=0), mask)
    i, k = 0, 1  # rank 1 of sequence 0 is tokens 2..4
    token_ratios = torch.exp(logp[i, 2:5] - logp_old[i, 2:5])
    assert torch.exp(log_ratio[i, 3]).item() == pytest.approx((token_ratios.prod() ** (1 / 3)).item(), rel=1e-6)
    assert size[i, 3] == 3


def test_ratio_is_exactly_one_on_policy():
    rank, mask, adv, logp_old = hand_batch()
    logp = logp_old.clone().requires_grad_(True)
    _, st = rg.rank_grpo_loss(logp, logp.detach(), None, adv, rank, mask, eps_low=0.06, eps_high=0.08,
                              beta=0.0, n_ranks=3)
    assert st["ratio_sum"] == st["tokens"] and st["clip_low"] == st["clip_high"] == 0


def test_on_policy_gradient_is_the_rank_policy_gradient(tiny):
    """At theta = theta_old the gradient of Eq. 6 is sum_i sum_k A_ik (1/(G N |y^(k)|)) sum_t grad log pi."""
    model, tok = tiny
    ids = torch.tensor([tok.encode("Heat (1995)\nAlien (1979)\nJaws (1975)")[:13], tok.encode("ab\ncd\nef\ngh (1)")])
    attn = torch.ones_like(ids)
    T, n = 10, 3
    table = rg.newline_table(tok, model.get_output_embeddings().weight.shape[0])
    mask = torch.ones(2, T, dtype=torch.long)
    rank = rg.segment_ranks(ids[:, -T:], mask, table)
    adv = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.0, -1.0]]).gather(1, rank.clamp(0, n - 1))
    adv = torch.where(rank >= n, torch.full_like(adv, -0.1), adv)

    model.zero_grad()
    logp = common.completion_logprobs(model, ids, attn, T)
    loss, _ = rg.rank_grpo_loss(logp, logp.detach(), None, adv, rank, mask, eps_low=0.06, eps_high=0.08,
                                beta=0.0, n_ranks=n)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    logp = common.completion_logprobs(model, ids, attn, T)
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


def loss_and_grad(level, rank, mask, adv, logp_old, logp0, n):
    logp = logp0.clone().requires_grad_(True)
    loss, _ = rg.rank_grpo_loss(logp, logp_old, None, adv, rank, mask, eps_low=0.2, eps_high=0.3, beta=0.0,
                                n_ranks=n, level=level)
    loss.backward()
    return loss.item(), logp.grad


def test_one_token_items_make_rank_level_equal_token_level():
    B, n = 3, 5
    rank = torch.arange(n).repeat(B, 1)  # every item is one token, no EOS, exactly N items
    mask = torch.ones(B, n, dtype=torch.long)
    g = torch.Generator().manual_seed(2)
    adv, logp_old = torch.randn(B, n, generator=g), -torch.rand(B, n, generator=g)
    logp0 = logp_old + 0.3 * torch.randn(B, n, generator=g)  # off-policy, some ratios clipped
    a = loss_and_grad("rank", rank, mask, adv, logp_old, logp0, n)
    b = loss_and_grad("token", rank, mask, adv, logp_old, logp0, n)
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
    a = loss_and_grad("rank", rank, mask, adv, logp_old, logp0, 1)
    b = loss_and_grad("sequence", rank, mask, adv, logp_old, logp0, 1)
    assert a[0] == pytest.approx(b[0]) and torch.allclose(a[1], b[1])


@pytest.mark.parametrize("shift, sign, zero", [
    (+0.3, +1.0, True),    # ratio e^0.3 > 1 + eps_high and A > 0: clipped, no gradient
    (-0.3, -1.0, True),    # ratio e^-0.3 < 1 - eps_low and A < 0: clipped, no gradient
    (+0.3, -1.0, False),   # ratio high but A < 0: the unclipped term is the minimum, gradient flows
    (-0.3, +1.0, False),   # ratio low but A > 0: gradient flows
])
def test_clipping_removes_the_rank_gradient_on_the_side_the_advantage_pushes(shift, sign, zero):
    rank = torch.tensor([[0, 0, 0, 1, 1]])
    mask = torch.ones_like(rank)
    logp_old = torch.full((1, 5), -1.0)
    logp = logp_old.clone()
    logp[0, :3] += shift  # rank 0 off-policy by exp(shift); rank 1 on-policy
    logp.requires_grad_(True)
    adv = torch.tensor([[sign, sign, sign, 1.0, 1.0]])
    loss, st = rg.rank_grpo_loss(logp, logp_old, None, adv, rank, mask, eps_low=0.06, eps_high=0.08,
                                 beta=0.0, n_ranks=2)
    loss.backward()
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
    l0, _ = rg.rank_grpo_loss(logp, logp.detach(), logp_ref, adv, rank, mask, eps_low=0.1, eps_high=0.1,
                              beta=0.0, n_ranks=3)
    l1, st = rg.rank_grpo_loss(logp, logp.detach(), logp_ref, adv, rank, mask, eps_low=0.1, eps_high=0.1,
                               beta=0.5, n_ranks=3)
    kl = (rg.kl_k3(logp_old, logp_ref) * mask).sum() / mask.sum()
    assert (l1 - l0).item() == pytest.approx(0.5 * kl.item())


# --- 5. accumulation ---------------------------------------------------------------------------------

def test_accumulated_micro_batches_equal_the_full_batch(tiny):
    model, tok = tiny
    texts = ["Heat (1995)\nAlien (1979)", "ab\ncd\nef", "Jaws (1975)\nx", "q\n\nr\ns\nt"]
    ro = rg.Rollouts([tok.encode("prompt one"), tok.encode("a longer prompt two"), tok.encode("p3"),
                      tok.encode("prompt four is here")],
                     [tok.encode(t) + [tok.eos_token_id] for t in texts], [True] * 4, texts, [{}] * 4)
    n = 3
    table = rg.newline_table(tok, model.get_output_embeddings().weight.shape[0])
    adv_rank = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.1, -0.3], [-1.0, 0.0, 1.0], [0.5, 0.5, -0.5]])
    n_toks = sum(len(c) for c in ro.completion_ids)
    g = torch.Generator().manual_seed(5)
    noise = {i: 0.05 * torch.randn(40, generator=g) for i in range(4)}

    def grads(chunks, level):
        model.zero_grad()
        for idx in chunks:
            b = rg.micro_batch(ro, idx, tok.pad_token_id, "cpu")
            rank = rg.segment_ranks(b["comp"], b["mask"], table)
            adv = rg.token_advantages(adv_rank[idx], rank, b["eos_tok"], n, -0.1, -0.1)
            logp = common.completion_logprobs(model, b["ids"], b["attn"], b["comp"].shape[1])
            logp_old = logp.detach() + torch.stack([noise[i][:logp.shape[1]] for i in idx])  # off-policy
            loss, _ = rg.rank_grpo_loss(logp, logp_old, logp_old - 0.1, adv, rank, b["mask"], eps_low=0.06,
                                        eps_high=0.08, beta=0.01, n_ranks=n, level=level, n_seqs=4,
                                        n_toks=n_toks)
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for level in ("rank", "token", "sequence"):
        full = grads([[0, 1, 2, 3]], level)
        accumulated = grads([[0], [1, 2], [3]], level)
        for a, b in zip(full, accumulated):
            assert torch.allclose(a, b, atol=1e-6)
    model.zero_grad()


# --- 6. smoke runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, demo_data):
    """The tiny model after a few seconds of fitting one list after the demo prompts, so that its
    samples have several lines: items beyond N = 1 (overflow, eps_o) give every step a gradient."""
    model, tok = common.load_model("tiny")
    listing = tok.encode("Heat (1995)\nAlien (1979)\nJaws (1975)\nRocky (1976)\nGravity (2013)")
    prompts = common.encode_prompts(tok, [r["prompt"] for r in common.read_rows(demo_data / "train.jsonl", "")[:4]],
                                    2048)
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
    return ["--data-dir", str(demo_data), "--model", str(sft_dir), "--out", str(out), "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "3", "--micro-batch-size", "4", "--max-new-tokens", "20",
            "--val-limit", "2", "--val-every", "0", "--sample-every", "1", "--save-every", "1", "--lr", "1e-3",
            "--n-items", "1", *extra]


def weights(d):
    return common.load_model(str(d))[0].state_dict()


@pytest.mark.parametrize("algo", ["rank_grpo", "grpo", "gspo"])
def test_smoke_each_algo_changes_weights_and_logs(algo, demo_data, sft_dir, tmp_path, capsys):
    options = ["--decision-units", "--temperature", "0.8"] if algo == "rank_grpo" else []  # the options run too
    rg.main(args(demo_data, sft_dir, tmp_path, "--algo", algo, "--mu", "2" if algo == "gspo" else "1",
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
    assert config["algo"] == algo and config["decision_units"] == (algo == "rank_grpo")


def test_resume_continues_exactly(demo_data, sft_dir, tmp_path):
    rg.main(args(demo_data, sft_dir, tmp_path / "straight", "--steps", "3"))
    rg.main(args(demo_data, sft_dir, tmp_path / "resumed", "--steps", "2"))
    rg.main(args(demo_data, sft_dir, tmp_path / "resumed", "--steps", "3", "--resume"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = weights(sft_dir)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
             if "reward" in json.loads(x)]
    assert steps == [1, 2, 3]


def test_missing_sft_run_is_a_clear_error(demo_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.DataError, match="run 03_sft.py first"):
        rg.main(["--data-dir", str(demo_data)])
