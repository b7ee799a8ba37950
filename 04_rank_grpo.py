"""Stage 04: Rank-GRPO, with the vanilla GRPO and GSPO baselines, in plain PyTorch.

Paper: section 2.3 (Eq. 6-9, 16) and App. C. The policy starts from the SFT model of 03_sft.py, which
is also the frozen KL reference. Each step: sample G lists per prompt, split every list into its N
ranks (one item per line), reward each rank causally, normalise the rewards per rank across the G
samples, and update the policy with a rank-level importance ratio: the geometric mean of the item's
token ratios, clipped, so that the unit of action is one item of the list.

  python 04_rank_grpo.py                                   # CPU demo, from runs/sft (~8 min)
  python 04_rank_grpo.py --algo grpo --out runs/grpo       # the vanilla GRPO baseline, same budget
  python 04_rank_grpo.py --algo gspo --out runs/gspo       # GSPO (sequence-level ratio)
  python 04_rank_grpo.py --model runs/sft_qwen --prompts-per-step 48 --group-size 8 \
      --lr 1e-6 --steps 1600 --max-new-tokens 1024 --micro-batch-size 16   # paper, one GPU

Writes <out>/ (the policy as an HF directory), run_config.json, log.jsonl, checkpoint/.

Notation (shape comments): B sequences in a batch (prompts x G), G samples per prompt, T completion
tokens, N ranks (items asked for), R ranks present (N plus overflow), V vocabulary, L prompt+completion.

Deviations from the paper and the released code:
  1. Aggregation is Eq. 6 as written: mean over ranks (1/(G N)), token-mean inside a rank. The released
     code broadcasts the rank ratio to tokens and averages over all tokens (per-item gradient = token
     sum); that is `--aggregation released`.
  2. Rank k is line k of text.split("\\n"), and a token's rank is the number of newlines before it,
     from a vocabulary-wide newline table. The released code indexes rewards by successfully parsed
     items, so one malformed line shifts all later credit onto the wrong tokens.
  3. Sampling uses the policy as is (temperature 1, top-p 1, no top-k, no repetition penalty): the
     checkpoint's generation defaults are dropped, because the importance ratio assumes samples from pi.
     With --temperature T the ratios and the KL use log-probs of logits / T, the distribution sampled.
  4. The instruction-following penalties (eps_u, eps_o) apply to every --algo, so the baselines differ
     from Rank-GRPO only in ratio level, reward and clip range. The newline that opens item N+1 gets
     eps_o with the overflow; the EOS that ends an overlong list leaves the loss (drop_late_eos).
     Option, off by default (--decision-units): the two tokens that decide a list's length become
     ratio units of their own, the newline after item N joining item N+1 and a premature EOS the
     missing item. In App. C they share their item's ratio, which spreads their penalty over the
     title's ~10 tokens. On the CPU demo it slowed the growth of the sampled lists (README).
  5. CPU demo defaults (6 steps of 2 prompts x 8 samples, lr 5e-6, N = 10) replace the paper's 48 x 8
     prompts per step, lr 1e-6, N = 20: at 16 rollouts per step and a handful of steps, 1e-6 moves nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import common
from common import arg

# (ratio level, reward, eps_low, eps_high) of each algorithm, from the paper (section 4 of PAPER.md)
ALGOS = {
    "rank_grpo": ("rank", "exp_inf", 0.06, 0.08),
    "grpo": ("token", "dcg", 0.2, 0.26),
    "gspo": ("sequence", "dcg", 3e-4, 4e-4),
}


# Settings that define the training trajectory: --resume refuses to change them.
TRAJECTORY = ("model", "ref_model", "algo", "reward", "aggregation", "n_items", "prompts_per_step", "group_size", "mu",
              "lr", "lr_drop_step", "lr_drop", "adam_beta2", "beta", "eps_low", "eps_high", "decision_units", "seed")


@dataclass
class Config:
    data_dir: str = arg("data", "catalog.jsonl, train.jsonl, val.jsonl from 01_catalog.py")
    model: str = arg("runs/sft", "policy to start from (03_sft.py output), a load_model name or HF dir")
    ref_model: str = arg("", "frozen KL reference pi_ref; empty: the same as --model")
    out: str = arg("runs/rank_grpo", "output directory")
    algo: str = arg("rank_grpo", "rank_grpo | grpo (token ratio, DCG@N reward) | gspo (sequence ratio)")
    reward: str = arg("", "override the algo's reward: exp_inf (Eq. 9, Gamma->inf) | log (Eq. 8) | dcg")
    aggregation: str = arg("paper", "paper: Eq. 6 (token-mean inside a rank) | released: mean over tokens")
    n_items: int = arg(0, "N, items per list; 0: from data/catalog_summary.json")
    steps: int = arg(6, "optimizer steps (x mu updates per batch of rollouts)")
    prompts_per_step: int = arg(2, "prompts per batch of rollouts (paper: 48)")
    group_size: int = arg(8, "G, samples per prompt (paper: 8)")
    mu: int = arg(1, "policy updates per batch of rollouts (1: on-policy, every ratio is 1)")
    micro_batch_size: int = arg(8, "sequences per forward/backward; gradients accumulate over the step")
    lr: float = arg(5e-6, "learning rate, constant (paper: 1e-6 with 48 x 8 rollouts per step)")
    lr_drop_step: int = arg(0, "from this step on use --lr-drop (0: never; paper 1B/3B: epoch 2)")
    lr_drop: float = arg(1e-7, "learning rate after --lr-drop-step")
    adam_beta2: float = arg(0.99, "AdamW beta2 (paper: 0.99)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    beta: float = arg(1e-3, "KL weight beta (k3 estimator against pi_ref); 0 skips the reference model")
    eps_low: float = arg(0.0, "clip range below 1; 0: the algo's (rank 0.06, token 0.2, sequence 3e-4)")
    eps_high: float = arg(0.0, "clip range above 1; 0: the algo's (rank 0.08, token 0.26, sequence 4e-4)")
    eps_u: float = arg(-0.1, "advantage of a premature EOS (fewer than N items)")
    eps_o: float = arg(-0.1, "advantage of every token of an item beyond rank N")
    decision_units: bool = arg(False, "the newline after item N and a premature EOS become ratio units of their "
                               "own (not in the paper; off: they share their item's ratio, as in App. C)")
    temperature: float = arg(1.0, "sampling temperature; the ratios and the KL use log-probs at the same temperature")
    top_p: float = arg(1.0, "sampling top-p")
    max_new_tokens: int = arg(0, "completion cap; 0: 16 tokens per item + 16")
    max_prompt_tokens: int = arg(2048, "prompts are left-truncated to this many tokens")
    gen_batch_size: int = arg(64, "sequences per generate() call")
    val_every: int = arg(6, "greedy validation every this many steps (and before the first)")
    val_limit: int = arg(16, "validation conversations")
    sample_every: int = arg(3, "print one real sample every this many steps")
    save_every: int = arg(3, "checkpoint every this many steps")
    resume: bool = arg(False, "continue from <out>/checkpoint")
    grad_checkpointing: bool = arg(False, "recompute activations in backward (saves memory)")
    seed: int = arg(0, "seed for prompt order and sampling")
    cpu: bool = arg(False, "use the CPU even when CUDA is present")
    compile: bool = arg(False, "sampling with a static KV cache; on CUDA generate() then compiles the decoding step")
    benchmark: str = arg("", "time full steps on a random model of this architecture (qwen2.5-0.5b, smollm2-135m, tiny)")
    benchmark_steps: int = arg(3, "timed benchmark steps (after one warm-up step)")
    benchmark_prompt_tokens: int = arg(384, "prompt length in the benchmark")


# ------------------------------------------------------------------------------------------------
# 1. Ranks: which item every token belongs to (section 2.3.1)
# ------------------------------------------------------------------------------------------------

def newline_table(tok, vocab_size: int) -> torch.Tensor:
    """[V] how many '\\n' each token's text contains. Built once: segmentation is then a cumsum."""
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    table = torch.zeros(vocab_size, dtype=torch.long)
    table[:len(texts)] = torch.tensor([t.count("\n") for t in texts])
    return table


def segment_ranks(completion_ids: torch.Tensor, mask: torch.Tensor, nl_table: torch.Tensor) -> torch.Tensor:
    """rank_of_tok [B, T]: the number of newlines before each token (rank 0 = first item), -1 outside
    the mask. A token holding a newline closes the item it ends, so it belongs to that item; a token
    with two newlines ("\\n\\n") also skips a rank, which then has no tokens. EOS belongs to the line it
    ends. Ranks >= N are overflow."""
    nl_tok = nl_table.to(completion_ids.device)[completion_ids] * mask  # [B, T]
    rank_of_tok = nl_tok.cumsum(dim=1) - nl_tok
    return torch.where(mask.bool(), rank_of_tok, torch.full_like(rank_of_tok, -1))


# ------------------------------------------------------------------------------------------------
# 2. Rewards per rank (Eq. 8-9) and advantages per rank (Eq. 6)
# ------------------------------------------------------------------------------------------------

def rank_relevance(texts: list[str], rows: list[dict], catalog: common.Catalog, n: int) -> torch.Tensor:
    """rel [B, N]: rel_{i,k} of PAPER.md section 2 for the first N lines of each completion."""
    rel = torch.zeros(len(texts), n)
    for i, (text, row) in enumerate(zip(texts, rows)):
        items = common.parse_completion(text)[:n]
        hits = common.judge_lines(items, common.row_groundtruth(row), row["seen_titles"], catalog)["rel"]
        rel[i, :len(hits)] = torch.tensor(hits, dtype=torch.float)
    return rel


def rank_rewards(rel: torch.Tensor, kind: str) -> torch.Tensor:
    """r [B, N] from rel [B, N]. Causal for exp_inf and log: r_k never depends on ranks before k.
    exp_inf (Eq. 9, Gamma -> inf): r_k = rel_k
    log     (Eq. 8):               r_k = DCG@k:N = sum_{j >= k} rel_j / log2(j + 1)
    dcg     (vanilla GRPO/GSPO):   r_k = DCG@N for every k (one reward for the whole list)"""
    discounted = rel / torch.log2(torch.arange(rel.shape[1], device=rel.device) + 2.0)
    if kind == "exp_inf":
        return rel
    if kind == "log":
        return discounted.flip(1).cumsum(1).flip(1)
    if kind == "dcg":
        return discounted.sum(1, keepdim=True).expand_as(rel).clone()
    raise ValueError(f"unknown reward {kind!r}")


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_{i,k} = (r_{i,k} - mean_i r_{i,k}) / (std_i r_{i,k} + 1e-4), over the G samples of a prompt,
    separately at each rank. rewards [B, N] with the G samples of a prompt adjacent -> [B, N]."""
    r = rewards.view(-1, group_size, rewards.shape[1])  # [B/G, G, N]
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv.view_as(rewards)


def length_decisions(rank_of_tok: torch.Tensor, eos_tok: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tokens that decide a list's length, as masks [B, T]: the newline after item N when the
    list goes on (it opens item N+1), and an EOS after fewer than N items."""
    next_rank = torch.cat([rank_of_tok[:, 1:], torch.full_like(rank_of_tok[:, :1], -1)], dim=1)
    opens_overflow = (rank_of_tok == n - 1) & (next_rank >= n)
    premature = eos_tok & (rank_of_tok >= 0) & (rank_of_tok < n - 1)
    return opens_overflow, premature


def token_advantages(adv_rank: torch.Tensor, rank_of_tok: torch.Tensor, eos_tok: torch.Tensor,
                     n: int, eps_u: float, eps_o: float) -> torch.Tensor:
    """adv_tok [B, T]: each token carries its rank's advantage, except (App. C, not normalised)
    - tokens of items beyond rank N get eps_o, and so does the newline after item N when the list
      goes on: it is the choice to write item N+1 instead of EOS, so it must carry the penalty (with
      item N's advantage instead, nothing would ever teach the model to stop at N);
    - an EOS that ends the list before N items gets eps_u."""
    adv_tok = adv_rank.gather(1, rank_of_tok.clamp(0, n - 1))
    opens_overflow, premature = length_decisions(rank_of_tok, eos_tok, n)
    adv_tok = torch.where((rank_of_tok >= n) | opens_overflow, torch.full_like(adv_tok, eps_o), adv_tok)
    adv_tok = torch.where(premature, torch.full_like(adv_tok, eps_u), adv_tok)
    return torch.where(rank_of_tok >= 0, adv_tok, torch.zeros_like(adv_tok))


def drop_late_eos(rank_of_tok: torch.Tensor, mask: torch.Tensor, eos_tok: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Take the EOS that ends a list of more than N items out of the loss (rank -1, mask 0).

    Once the list has overflowed, stopping is the right move. Left in the overflow item it closes,
    the EOS would share that item's penalty eps_o (and its ratio), so every overlong sample would
    teach the model to stop *later*, and lists grow step after step. The choice that caused the
    overflow, the newline after item N, keeps its penalty (token_advantages)."""
    late = eos_tok & (rank_of_tok >= n)
    return rank_of_tok.masked_fill(late, -1), mask.masked_fill(late, 0)


def decision_units(rank_of_tok: torch.Tensor, eos_tok: torch.Tensor, n: int) -> torch.Tensor:
    """Move the two tokens that decide a list's length into the item they decide about, so that
    their penalty (set by token_advantages, which runs first) is the advantage of a ratio unit of
    its own instead of one token's share of a title's unit:
    - the newline after item N (the list goes on) joins item N+1, the first overflow rank;
    - an EOS after k < N items (the list stops) becomes rank k+1, the missing item, a unit alone.
    In a title's unit the penalty moves each of the unit's tokens by eps/|y^(k)|^2 (the unit's mean
    advantage over its size), about a tenth of what the overflow item's own tokens get: stopping
    after N items is taught more weakly than stopping after N+1. Not in the paper (--decision-units).
    rank_of_tok [B, T] after drop_late_eos -> [B, T]."""
    opens_overflow, premature = length_decisions(rank_of_tok, eos_tok, n)
    rank_of_tok = torch.where(opens_overflow, torch.full_like(rank_of_tok, n), rank_of_tok)
    return torch.where(premature, rank_of_tok + 1, rank_of_tok)


# ------------------------------------------------------------------------------------------------
# 3. The loss (Eq. 6, 7, 16): copy this function into another project
# ------------------------------------------------------------------------------------------------

def unit_of_token(rank_of_tok: torch.Tensor, level: str) -> torch.Tensor:
    """Which ratio unit each token belongs to: its rank, its whole sequence, or itself."""
    if level == "rank":
        return rank_of_tok.clamp(min=0)
    if level == "sequence":
        return torch.zeros_like(rank_of_tok)
    if level == "token":
        return torch.arange(rank_of_tok.shape[1], device=rank_of_tok.device).expand_as(rank_of_tok)
    raise ValueError(f"unknown ratio level {level!r}")


def unit_mean(values: torch.Tensor, unit: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `values` over the tokens of each unit, handed back to every token of the unit, and the
    unit's token count per token. values, unit, mask [B, T] -> ([B, T], [B, T])."""
    n_units = int(unit.max()) + 1 if unit.numel() else 1
    m = mask.to(values.dtype)
    sums = torch.zeros(unit.shape[0], n_units, dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums = sums.scatter_add(1, unit, values * m)
    counts = counts.scatter_add(1, unit, m)
    mean_tok = (sums / counts.clamp(min=1)).gather(1, unit)
    return mean_tok, counts.gather(1, unit)


def rank_grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None,
                   adv_tok: torch.Tensor, rank_of_tok: torch.Tensor, mask: torch.Tensor, *,
                   eps_low: float, eps_high: float, beta: float, n_ranks: int, level: str = "rank",
                   aggregation: str = "paper", n_seqs: int | None = None, n_toks: int | None = None):
    """The clipped surrogate of Eq. 6 minus beta * KL, to minimise, and detached diagnostics.

    logp, logp_old, logp_ref [B, T]: log-probs of the sampled tokens under pi_theta (with grad),
        pi_old and pi_ref (logp_ref None when beta = 0)
    adv_tok [B, T]: each token's advantage (its rank's A_{i,k}, or a penalty)
    rank_of_tok [B, T]: the rank of each token (0 = first item; >= n_ranks: overflow), -1 = padding
    mask [B, T]: 1 on completion tokens
    level: 'rank' (Rank-GRPO), 'token' (GRPO) or 'sequence' (GSPO): the unit whose ratio is the
        geometric mean of its token ratios, w = exp(mean_t (logp - logp_old))
    n_seqs, n_toks: sequences / tokens of the whole optimizer step (default: this batch), so that
        micro-batches of one step add up to the full-batch loss
    """
    n_seqs = mask.shape[0] if n_seqs is None else n_seqs
    n_toks = int(mask.sum()) if n_toks is None else n_toks
    m = mask.to(logp.dtype)
    unit = unit_of_token(rank_of_tok, level)
    # log w of the token's unit; for a rank: (1/|y^(k)|) sum_{t in k} log pi_theta/pi_old (Eq. 6)
    log_ratio_tok, unit_size = unit_mean(logp - logp_old, unit, mask)
    ratio_tok = torch.exp(log_ratio_tok)
    clipped = torch.clamp(ratio_tok, 1 - eps_low, 1 + eps_high)
    surrogate_tok = torch.minimum(ratio_tok * adv_tok, clipped * adv_tok)
    # Weight of each token so that the sum is Eq. 6's average: token-mean inside the unit, then
    # 1/(G N) over ranks (rank), 1/G over sequences (sequence), or 1/(all tokens) (token level).
    if level == "token" or aggregation == "released":
        weight_tok = m / n_toks
    elif level == "rank":
        weight_tok = m / (unit_size.clamp(min=1) * n_seqs * n_ranks)
    else:
        weight_tok = m / (unit_size.clamp(min=1) * n_seqs)
    objective = (surrogate_tok * weight_tok).sum()
    kl = torch.zeros((), device=logp.device)
    if logp_ref is not None and beta > 0:
        kl = (kl_k3(logp, logp_ref) * m).sum() / n_toks
    loss = -(objective - beta * kl)
    with torch.no_grad():  # diagnostics: where clipping removes the gradient, per token
        active = mask.bool()
        clip_low = ((ratio_tok < 1 - eps_low) & (adv_tok < 0) & active).sum()
        clip_high = ((ratio_tok > 1 + eps_high) & (adv_tok > 0) & active).sum()
        stats = {"clip_low": clip_low.item(), "clip_high": clip_high.item(), "kl_sum": (kl * n_toks).item(),
                 "ratio_sum": (ratio_tok * m).sum().item(), "tokens": int(m.sum())}
    return loss, stats


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(lref - l) - (lref - l) - 1 >= 0."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


# ------------------------------------------------------------------------------------------------
# 4. Rollouts: sampling G lists per prompt and turning them into training tensors
# ------------------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """A batch of sampled completions, G adjacent per prompt."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # up to and including the first EOS (if any)
    has_eos: list[bool]
    texts: list[str]
    rows: list[dict]


@torch.no_grad()
def sample_rollouts(model, tok, prompts: list[list[int]], rows: list[dict], cfg: Config, eos_ids: list[int],
                    min_new_tokens: int = 0) -> Rollouts:
    """G samples per prompt from the current policy (= pi_old), in generate() calls of gen_batch_size.
    With --compile the KV cache is static and prompts are padded to a multiple of 128 tokens, so the
    compiled decoding step (CUDA graphs) is reused across calls instead of recompiled per shape."""
    device = next(model.parameters()).device
    prompt_ids = [p for p in prompts for _ in range(cfg.group_size)]
    out = Rollouts(prompt_ids, [], [], [], [r for r in rows for _ in range(cfg.group_size)])
    extra = {"cache_implementation": "static"} if cfg.compile else {}
    model.eval()
    for s in range(0, len(prompt_ids), cfg.gen_batch_size):
        ids, attn = common.left_pad(prompt_ids[s:s + cfg.gen_batch_size], tok.pad_token_id)
        if cfg.compile:
            more = -ids.shape[1] % 128
            ids = torch.nn.functional.pad(ids, (more, 0), value=tok.pad_token_id)
            attn = torch.nn.functional.pad(attn, (more, 0), value=0)
        with common.autocast(device):
            seq = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                                 temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                 min_new_tokens=min_new_tokens, eos_token_id=eos_ids,
                                 pad_token_id=tok.pad_token_id, **extra)
        comp = seq[:, ids.shape[1]:].cpu()
        mask, has_eos = common.completion_mask(comp, eos_ids)
        for c, m, e in zip(comp, mask, has_eos):
            kept = c[m.bool()].tolist()
            out.completion_ids.append(kept)
            out.has_eos.append(bool(e))
            out.texts.append(tok.decode(kept[:-1] if e else kept))
    model.train()
    return out


def micro_batch(ro: Rollouts, idx: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Tensors for sequences `idx`: left-padded prompt + right-padded completion, masks from lengths."""
    ids_p, attn_p = common.left_pad([ro.prompt_ids[i] for i in idx], pad_id)
    T = max(1, max(len(ro.completion_ids[i]) for i in idx))
    comp = torch.full((len(idx), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    eos_tok = torch.zeros((len(idx), T), dtype=torch.bool)
    for j, i in enumerate(idx):
        c = ro.completion_ids[i]
        comp[j, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[j, :len(c)] = 1
        if ro.has_eos[i]:
            eos_tok[j, len(c) - 1] = True
    batch = {"ids": torch.cat([ids_p, comp], 1), "attn": torch.cat([attn_p, mask], 1),
             "comp": comp, "mask": mask, "eos_tok": eos_tok}
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# 5. One step: sample, reward, score, update
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every step needs, fixed for the run."""
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    tok: object
    optimizer: torch.optim.Optimizer
    catalog: common.Catalog
    n: int
    level: str
    reward_kind: str
    eps_low: float
    eps_high: float
    eos_ids: list[int]
    nl_table: torch.Tensor
    device: torch.device
    world: int = 1


def rl_step(run: Run, prompts: list[list[int]], rows: list[dict], cfg: Config,
            min_new_tokens: int = 0) -> tuple[dict, Rollouts, torch.Tensor]:
    """One batch of rollouts and mu policy updates on it. `prompts`/`rows` are this process's share
    of the step's prompts (whole groups: the G samples of a prompt stay in one process). Returns the
    step's record (summed over processes), the rollouts and their rewards."""
    # 1. Sample G lists per prompt from pi_old (= the current policy).
    t0 = time.time()
    ro = sample_rollouts(run.policy, run.tok, prompts, rows, cfg, run.eos_ids, min_new_tokens)
    t_sample = time.time() - t0
    record, rewards = learn_from(run, ro, cfg)
    timers = {"t_sample": t_sample, **{k: v for k, v in record.items() if k.startswith("t_")}}
    return {**{k: v for k, v in record.items() if not k.startswith("t_")}, **timers}, ro, rewards


def learn_from(run: Run, ro: Rollouts, cfg: Config) -> tuple[dict, torch.Tensor]:
    """Rewards, advantages, log-probs and mu policy updates for sampled rollouts (steps 2-5)."""
    n, device = run.n, run.device

    # 2. Rewards per rank (Eq. 8/9) and advantages normalised per rank across the G samples.
    t0 = time.time()
    rel = rank_relevance(ro.texts, ro.rows, run.catalog, n)  # [B, N]
    rewards = rank_rewards(rel, run.reward_kind)  # [B, N]
    adv_rank = group_advantages(rewards, cfg.group_size)  # [B, N]
    B = len(ro.texts)
    chunks = [list(range(s, min(s + cfg.micro_batch_size, B))) for s in range(0, B, cfg.micro_batch_size)]
    batches = [micro_batch(ro, idx, run.tok.pad_token_id, device) for idx in chunks]
    for b, idx in zip(batches, chunks):
        b["rank"] = segment_ranks(b["comp"], b["mask"], run.nl_table)  # [b, T]
        b["rank"], b["mask"] = drop_late_eos(b["rank"], b["mask"], b["eos_tok"], n)
        b["adv"] = token_advantages(adv_rank[idx].to(device), b["rank"], b["eos_tok"], n, cfg.eps_u, cfg.eps_o)
        if cfg.decision_units:
            b["rank"] = decision_units(b["rank"], b["eos_tok"], n)  # ratio units of the loss
    # The normalisers of the whole step (every process), fixed before the first backward.
    n_seqs = B * run.world
    n_toks = int(common.all_sum([sum(len(c) for c in ro.completion_ids)], device)[0])
    t_score = time.time() - t0

    # 3. Old and reference log-probs, without gradients. On-policy (mu = 1) pi_old is the policy
    # itself, so its log-probs are the detached ones of the update below (every ratio is exactly 1).
    t0 = time.time()
    with torch.no_grad():
        for b in batches:
            T = b["comp"].shape[1]
            with common.autocast(device):
                if cfg.mu > 1:
                    b["logp_old"] = common.completion_logprobs(run.policy, b["ids"], b["attn"], T, temperature=cfg.temperature)
                if run.ref is not None:
                    b["logp_ref"] = common.completion_logprobs(run.ref, b["ids"], b["attn"], T, temperature=cfg.temperature)
    t_ref = time.time() - t0

    # 4. mu policy updates on this batch of rollouts, each with manual gradient accumulation and one
    # all-reduce of the gradients over the processes.
    t0 = time.time()
    sums = {"clip_low": 0, "clip_high": 0, "kl_sum": 0.0, "ratio_sum": 0.0, "tokens": 0}
    for _ in range(cfg.mu):
        for b in batches:
            with common.autocast(device):
                logp = common.completion_logprobs(run.policy, b["ids"], b["attn"], b["comp"].shape[1],
                                                 temperature=cfg.temperature)
            loss, st = rank_grpo_loss(
                logp, b["logp_old"] if cfg.mu > 1 else logp.detach(), b.get("logp_ref"), b["adv"], b["rank"],
                b["mask"], eps_low=run.eps_low, eps_high=run.eps_high, beta=cfg.beta, n_ranks=n, level=run.level,
                aggregation=cfg.aggregation, n_seqs=n_seqs, n_toks=n_toks)
            loss.backward()
            for k in sums:
                sums[k] += st[k]
        common.all_reduce_grads(run.policy)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.max_grad_norm).item()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    t_train = time.time() - t0

    # 5. The step's record: sums over this process's samples, added up over the processes.
    ndcg = [common.ndcg_at_k(r.tolist(), max(1, len(row["groundtruth_with_release_year"])), n)
            for r, row in zip(rel, ro.rows)]
    judged = [common.score_completion(t, r, run.catalog, n, ks=()) for t, r in zip(ro.texts, ro.rows)]
    ranks_shown = [k for k in sorted({1, 5, 10, n}) if k <= n]
    local = {"reward": rewards.mean(1).sum().item(),
             **{f"reward@{k}": rewards[:, k - 1].sum().item() for k in ranks_shown},
             "ndcg": sum(ndcg), "in_catalog": sum(j["in_catalog_rate"] for j in judged),
             "valid": sum(j["valid_rate"] for j in judged), "items": sum(j["n_lines"] for j in judged)}
    total = dict(zip(list(local) + list(sums), common.all_sum(list(local.values()) + list(sums.values()), device)))
    tokens = max(1.0, total["tokens"])
    record = {k: total[k] / n_seqs for k in local}
    record.update({"kl": total["kl_sum"] / tokens, "clip_low": total["clip_low"] / tokens,
                   "clip_high": total["clip_high"] / tokens, "ratio": total["ratio_sum"] / tokens,
                   "grad_norm": grad_norm, "len": n_toks / n_seqs,
                   "t_score": t_score, "t_ref": t_ref, "t_train": t_train})
    return record, rewards


def validate(model, tok, rows, catalog, n, cfg: Config) -> dict[str, float]:
    """Greedy Recall/NDCG@{5,10,N} (filtered protocol) on the first --val-limit val conversations."""
    texts = common.generate_for_rows(model, tok, rows, cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                                     max_prompt_tokens=cfg.max_prompt_tokens, progress="validation")
    ks = [k for k in common.cutoffs(n) if k in (5, 10, n)]
    _, s = common.score_texts(texts, rows, catalog, n, ks)
    out = {}
    for k in ks:
        out[f"val_recall@{k}"], out[f"val_ndcg@{k}"] = s[f"recall@{k}_filtered"], s[f"ndcg@{k}_filtered"]
    return out


# ------------------------------------------------------------------------------------------------
# 6. Training
# ------------------------------------------------------------------------------------------------

def make_run(cfg: Config, policy, ref, tok, catalog, n: int, device, world: int) -> Run:
    level, reward_kind, eps_low, eps_high = ALGOS[cfg.algo]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    return Run(policy, ref, tok, optimizer, catalog, n, level, cfg.reward or reward_kind, cfg.eps_low or eps_low,
               cfg.eps_high or eps_high, common.eos_token_ids(tok, policy),
               newline_table(tok, policy.get_output_embeddings().weight.shape[0]), device, world)


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, __doc__.split("\n")[0])
    if cfg.benchmark:
        return benchmark(cfg)
    n = common.data_n(cfg.data_dir, cfg.n_items)
    cfg.max_new_tokens = cfg.max_new_tokens or 16 * n + 16
    rank, world, device = common.setup_distributed(cfg.cpu)
    if cfg.prompts_per_step % world:
        raise common.DataError(f"--prompts-per-step {cfg.prompts_per_step} is not divisible by {world} processes")
    common.seed_everything(cfg.seed + rank)  # each process samples its own completions
    out, main_process = Path(cfg.out), rank == 0

    # 1. Data and models. The policy keeps fp32 master weights (bf16 autocast on CUDA: lr 1e-6 on
    # bf16 weights would round away); the frozen reference only needs bf16 on CUDA.
    catalog = common.Catalog.load(Path(cfg.data_dir) / "catalog.jsonl")
    train = common.read_rows(Path(cfg.data_dir) / "train.jsonl", "run 01_catalog.py first")
    val = common.first_conversations(common.read_rows(Path(cfg.data_dir) / "val.jsonl", "run 01_catalog.py first"),
                                     cfg.val_limit)
    if not Path(cfg.model).is_dir() and cfg.model.startswith("runs/"):
        raise common.DataError(f"{cfg.model} not found: run 03_sft.py first")
    policy, tok = common.load_model(cfg.model, device=device)
    ref = None
    if cfg.beta > 0:
        ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ref, _ = common.load_model(cfg.ref_model or cfg.model, dtype=ref_dtype, device=device)
        ref.eval().requires_grad_(False)
    if cfg.grad_checkpointing:
        common.enable_activation_checkpointing(policy)
    run = make_run(cfg, policy, ref, tok, catalog, n, device, world)
    if main_process:
        print(f"policy {cfg.model} on {device} x {world} process(es), {sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M "
              f"params; ref {cfg.ref_model or cfg.model if ref is not None else 'none'}; algo {cfg.algo}: {run.level}-level "
              f"ratio, {run.reward_kind} reward, clip [{1 - run.eps_low:g}, {1 + run.eps_high:g}], N={n}, G={cfg.group_size}")
        print(f"read {len(train)} train rows, {len(val)} val rows, {len(catalog)} catalog items")

    drop = cfg.lr_drop / cfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda s: drop if cfg.lr_drop_step and s >= cfg.lr_drop_step else 1.0)
    order = torch.Generator().manual_seed(cfg.seed)  # the same prompt order in every process
    perm, pos, start = torch.randperm(len(train), generator=order).tolist(), 0, 0
    if main_process:
        common.start_run(out, cfg, cfg.resume, TRAJECTORY)
    common.barrier()
    if cfg.resume:
        state = common.load_checkpoint(out / "checkpoint", policy, run.optimizer, scheduler)
        start, pos, perm = state["step"], state["pos"], state["perm"]
        order.set_state(state["order"])
        if main_process:
            print(f"resumed from {out}/checkpoint at step {start}")
    log = common.StepLog(out / "log.jsonl", cfg.steps, resume_step=start if cfg.resume else None) \
        if main_process else None
    if start == 0 and cfg.val_every and main_process:
        log.log(0, validate(policy, tok, val, catalog, n, cfg))

    for step in range(start + 1, cfg.steps + 1):
        # 2. The prompts of this step: the next rows of a shuffled pass over train; this process takes
        # every world-th of them.
        if pos + cfg.prompts_per_step > len(perm):
            perm, pos = torch.randperm(len(train), generator=order).tolist(), 0
        rows = [train[i] for i in perm[pos:pos + cfg.prompts_per_step]][rank::world]
        pos += cfg.prompts_per_step
        prompts = common.encode_prompts(tok, [r["prompt"] for r in rows], cfg.max_prompt_tokens)

        # 3. Sample, reward, score and update (section 5 above).
        lr = scheduler.get_last_lr()[0]
        record, ro, rewards = rl_step(run, prompts, rows, cfg)
        scheduler.step()

        # 4. One line per step (same keys every step), a real sample now and then, validation.
        if main_process:
            log.log(step, {**record, "lr": lr})
            if cfg.sample_every and step % cfg.sample_every == 0:
                print(common.render_list(ro.texts[0], ro.rows[0], catalog, n, rewards[0].tolist()))
            if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                log.log(step, validate(policy, tok, val, catalog, n, cfg))
        if step % cfg.save_every == 0 or step == cfg.steps:
            common.save_checkpoint(out / "checkpoint", policy, tok, run.optimizer, scheduler,
                                   {"step": step, "pos": pos, "perm": perm, "order": order.get_state()})
        common.barrier()

    # 5. The final policy, loadable with from_pretrained / common.load_model.
    if main_process:
        common.save_model(policy, tok, out)
        print(f"wrote {out}/ (model, run_config.json, log.jsonl, checkpoint/)")
    common.barrier()


# ------------------------------------------------------------------------------------------------
# 7. Benchmark: a full step at a given scale, on a randomly initialised model of a real architecture
# ------------------------------------------------------------------------------------------------

ARCHS = {  # shapes of the released configs (weights are random: only speed and memory are measured)
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         rope_theta=1e6, tie_word_embeddings=True)),
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         rope_theta=1e5, tie_word_embeddings=True)),
    "tiny": ("LlamaConfig", dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


class SyntheticTokenizer:
    """Stands in for a tokenizer of any vocabulary size: token v reads 'w{v}', every 16th token is a
    newline, so sampled lists have ranks. Enough for sampling, segmentation and rewards."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.pad_token_id, self.eos_token_id = vocab_size, 0, 1

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids) -> str:
        return "".join("\n" if v % 16 == 15 else f" w{v}" for v in ids)

    def batch_decode(self, seqs) -> list[str]:
        return [self.decode(s) for s in seqs]


def benchmark(cfg: Config) -> None:
    """Seconds per step split into sampling / scoring / old+ref log-probs / training, tokens per
    second and peak memory, for --prompts-per-step x --group-size rollouts of exactly --max-new-tokens
    tokens after prompts of --benchmark-prompt-tokens tokens."""
    import resource
    import transformers
    rank, world, device = common.setup_distributed(cfg.cpu)
    common.seed_everything(cfg.seed + rank)
    cls_name, shape = ARCHS[cfg.benchmark]
    config = getattr(transformers, cls_name)(**shape, max_position_embeddings=32768, bos_token_id=0, eos_token_id=1,
                                             pad_token_id=0)
    policy = transformers.AutoModelForCausalLM.from_config(config).to(device)
    ref = None
    if cfg.beta > 0:
        ref = transformers.AutoModelForCausalLM.from_config(config).to(device, torch.bfloat16 if device.type == "cuda"
                                                                          else torch.float32)
        ref.load_state_dict(policy.state_dict())
        ref.eval().requires_grad_(False)
    if cfg.grad_checkpointing:
        common.enable_activation_checkpointing(policy)
    tok = SyntheticTokenizer(config.vocab_size)
    policy.generation_config = transformers.GenerationConfig(pad_token_id=0, eos_token_id=1)
    cfg.max_new_tokens = cfg.max_new_tokens or 300
    catalog = common.Catalog([{"title": "Heat", "year": 1995}])
    run = make_run(cfg, policy, ref, tok, catalog, cfg.n_items or common.N_ITEMS, device, world)
    local_prompts = cfg.prompts_per_step // world
    g = torch.Generator().manual_seed(cfg.seed + rank)
    rows = [{"id": f"bench#{i}", "seen_titles": [], "groundtruth_with_release_year": [["Heat", "1995"]]}
            for i in range(local_prompts)]
    print(f"benchmark {cfg.benchmark} ({sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M params) on {device} "
          f"x {world}: {cfg.prompts_per_step} prompts x {cfg.group_size} samples, {cfg.benchmark_prompt_tokens} prompt "
          f"+ {cfg.max_new_tokens} new tokens, micro-batch {cfg.micro_batch_size}, compile {cfg.compile}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(cfg.benchmark_steps + 1):  # step 0 warms up (allocator, compilation) and is not counted
        prompts = torch.randint(2, config.vocab_size, (local_prompts, cfg.benchmark_prompt_tokens), generator=g).tolist()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.time()
        record, _, _ = rl_step(run, prompts, rows, cfg, min_new_tokens=cfg.max_new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record["t_step"] = time.time() - t0
        if step > 0:
            times.append(record)
        if rank == 0:
            print(f"step {step} ({'warm-up' if step == 0 else 'timed'}): " + " | ".join(
                f"{k} {record[k]:.2f}s" for k in ("t_step", "t_sample", "t_score", "t_ref", "t_train")))
    if rank == 0:
        mean = {k: sum(t[k] for t in times) / len(times) for k in ("t_step", "t_sample", "t_score", "t_ref", "t_train")}
        new_tokens = cfg.prompts_per_step * cfg.group_size * cfg.max_new_tokens
        peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        print(f"mean over {len(times)} steps: {mean['t_step']:.2f} s/step = sampling {mean['t_sample']:.2f} + scoring "
              f"{mean['t_score']:.2f} + old/ref log-probs {mean['t_ref']:.2f} + training {mean['t_train']:.2f}; "
              f"{new_tokens / mean['t_sample']:.0f} sampled tokens/s, {new_tokens / mean['t_step']:.0f} tokens/s "
              f"per step; peak memory {peak:.1f} GiB ({'GPU allocated' if device.type == 'cuda' else 'CPU max RSS'})")


if __name__ == "__main__":
    common.run(main)
