"""Stage 04: Rank-GRPO, with the vanilla GRPO and GSPO baselines, in plain PyTorch.

Paper: section 2.3 (Eq. 6-9, 16) and App. C. The policy starts from the SFT model of 03_sft.py, which
is also the frozen KL reference. Each step: sample G lists per prompt, split every list into its N
ranks (one item per line), reward each rank causally, normalise the rewards per rank across the G
samples, and update the policy with a rank-level importance ratio: the geometric mean of the item's
token ratios, clipped, so that the unit of action is one item of the list.

  python 04_rank_grpo.py                                   # CPU demo, from runs/sft (~10 min)
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
  4. The instruction-following penalties (eps_u, eps_o) apply to every --algo, so the baselines differ
     from Rank-GRPO only in ratio level, reward and clip range.
  5. CPU demo defaults (tiny batches, lr 1e-5, N = 10) replace the paper's 48 x 8 prompts, lr 1e-6, N = 20.
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
TRAJECTORY = ("model", "ref_model", "algo", "reward", "aggregation", "n", "prompts_per_step", "group_size", "mu",
              "lr", "lr_drop_step", "lr_drop", "adam_beta2", "beta", "eps_low", "eps_high", "seed")


@dataclass
class Config:
    data_dir: str = arg("data", "catalog.jsonl, train.jsonl, val.jsonl from 01_catalog.py")
    model: str = arg("runs/sft", "policy to start from (03_sft.py output), a load_model name or HF dir")
    ref_model: str = arg("", "frozen KL reference pi_ref; empty: the same as --model")
    out: str = arg("runs/rank_grpo", "output directory")
    algo: str = arg("rank_grpo", "rank_grpo | grpo (token ratio, DCG@N reward) | gspo (sequence ratio)")
    reward: str = arg("", "override the algo's reward: exp_inf (Eq. 9, Gamma->inf) | log (Eq. 8) | dcg")
    aggregation: str = arg("paper", "paper: Eq. 6 (token-mean inside a rank) | released: mean over tokens")
    n: int = arg(0, "N, items per list; 0: from data/catalog_summary.json")
    steps: int = arg(24, "optimizer steps (x mu updates per batch of rollouts)")
    prompts_per_step: int = arg(2, "prompts per batch of rollouts (paper: 48)")
    group_size: int = arg(8, "G, samples per prompt (paper: 8)")
    mu: int = arg(1, "policy updates per batch of rollouts (1: on-policy, every ratio is 1)")
    micro_batch_size: int = arg(8, "sequences per forward/backward; gradients accumulate over the step")
    lr: float = arg(1e-5, "learning rate, constant (paper: 1e-6 with 48 x 8 rollouts per step)")
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
    temperature: float = arg(1.0, "sampling temperature")
    top_p: float = arg(1.0, "sampling top-p")
    max_new_tokens: int = arg(0, "completion cap; 0: 16 tokens per item + 16")
    max_prompt_tokens: int = arg(2048, "prompts are left-truncated to this many tokens")
    gen_batch_size: int = arg(64, "sequences per generate() call")
    val_every: int = arg(12, "greedy validation every this many steps (and before the first)")
    val_limit: int = arg(40, "validation conversations")
    sample_every: int = arg(6, "print one real sample every this many steps")
    save_every: int = arg(12, "checkpoint every this many steps")
    resume: bool = arg(False, "continue from <out>/checkpoint")
    grad_checkpointing: bool = arg(False, "recompute activations in backward (saves memory)")
    seed: int = arg(0, "seed for prompt order and sampling")
    cpu: bool = arg(False, "use the CPU even when CUDA is present")


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


def token_advantages(adv_rank: torch.Tensor, rank_of_tok: torch.Tensor, eos_tok: torch.Tensor,
                     n: int, eps_u: float, eps_o: float) -> torch.Tensor:
    """adv_tok [B, T]: each token carries its rank's advantage, except (App. C, not normalised)
    - tokens of items beyond rank N get eps_o;
    - an EOS that ends the list before N items gets eps_u."""
    adv_tok = adv_rank.gather(1, rank_of_tok.clamp(0, n - 1))
    adv_tok = torch.where(rank_of_tok >= n, torch.full_like(adv_tok, eps_o), adv_tok)
    premature = eos_tok & (rank_of_tok < n - 1)
    adv_tok = torch.where(premature, torch.full_like(adv_tok, eps_u), adv_tok)
    return torch.where(rank_of_tok >= 0, adv_tok, torch.zeros_like(adv_tok))


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
def sample_rollouts(model, tok, rows: list[dict], cfg: Config, n: int, eos_ids: list[int]) -> Rollouts:
    """G samples per row from the current policy (= pi_old), in generate() calls of gen_batch_size."""
    device = next(model.parameters()).device
    prompts = common.encode_prompts(tok, [r["prompt"] for r in rows], cfg.max_prompt_tokens)
    prompt_ids = [p for p in prompts for _ in range(cfg.group_size)]
    out = Rollouts(prompt_ids, [], [], [], [r for r in rows for _ in range(cfg.group_size)])
    model.eval()
    for s in range(0, len(prompt_ids), cfg.gen_batch_size):
        ids, attn = common.left_pad(prompt_ids[s:s + cfg.gen_batch_size], tok.pad_token_id)
        with common.autocast(device):
            seq = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                                 temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                 eos_token_id=eos_ids, pad_token_id=tok.pad_token_id)
        comp = seq[:, ids.shape[1]:].cpu()
        mask, has_eos = common.completion_mask(comp, eos_ids)
        for c, m, e in zip(comp, mask, has_eos):
            kept = c[m].tolist()
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
# 5. Training
# ------------------------------------------------------------------------------------------------

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


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, __doc__.split("\n")[0])
    level, reward_kind, eps_low, eps_high = ALGOS[cfg.algo]
    reward_kind = cfg.reward or reward_kind
    eps_low, eps_high = cfg.eps_low or eps_low, cfg.eps_high or eps_high
    n = common.data_n(cfg.data_dir, cfg.n)
    cfg.max_new_tokens = cfg.max_new_tokens or 16 * n + 16
    out = Path(cfg.out)
    common.seed_everything(cfg.seed)
    device = common.pick_device(cfg.cpu)

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
    eos_ids = common.eos_token_ids(tok, policy)
    nl_table = newline_table(tok, policy.get_output_embeddings().weight.shape[0])
    print(f"policy {cfg.model} on {device} ({sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M params), "
          f"ref {cfg.ref_model or cfg.model if ref is not None else 'none'}; algo {cfg.algo}: {level}-level ratio, "
          f"{reward_kind} reward, clip [{1 - eps_low:g}, {1 + eps_high:g}], N={n}, G={cfg.group_size}")
    print(f"read {len(train)} train rows, {len(val)} val rows, {len(catalog)} catalog items")

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    drop = cfg.lr_drop / cfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: drop if cfg.lr_drop_step and s >= cfg.lr_drop_step else 1.0)
    order = torch.Generator().manual_seed(cfg.seed)
    perm, pos, start = torch.randperm(len(train), generator=order).tolist(), 0, 0
    common.start_run(out, cfg, cfg.resume, TRAJECTORY)
    if cfg.resume:
        state = common.load_checkpoint(out / "checkpoint", policy, optimizer, scheduler)
        start, pos, perm = state["step"], state["pos"], state["perm"]
        order.set_state(state["order"])
        print(f"resumed from {out}/checkpoint at step {start}")
    log = common.StepLog(out / "log.jsonl", cfg.steps, resume_step=start if cfg.resume else None)
    if start == 0 and cfg.val_every:
        log.log(0, validate(policy, tok, val, catalog, n, cfg))

    for step in range(start + 1, cfg.steps + 1):
        # 2. The prompts of this step: the next rows of a shuffled pass over train.
        if pos + cfg.prompts_per_step > len(perm):
            perm, pos = torch.randperm(len(train), generator=order).tolist(), 0
        rows = [train[i] for i in perm[pos:pos + cfg.prompts_per_step]]
        pos += cfg.prompts_per_step

        # 3. Sample G lists per prompt from pi_old (= the current policy).
        t0 = time.time()
        ro = sample_rollouts(policy, tok, rows, cfg, n, eos_ids)
        t_sample = time.time() - t0

        # 4. Rewards per rank (Eq. 8/9) and advantages normalised per rank across the G samples.
        t0 = time.time()
        rel = rank_relevance(ro.texts, ro.rows, catalog, n)  # [B, N]
        rewards = rank_rewards(rel, reward_kind)  # [B, N]
        adv_rank = group_advantages(rewards, cfg.group_size)  # [B, N]
        B = len(ro.texts)
        chunks = [list(range(s, min(s + cfg.micro_batch_size, B))) for s in range(0, B, cfg.micro_batch_size)]
        n_toks = sum(len(c) for c in ro.completion_ids)  # the step's normalisers, fixed before any backward
        batches = [micro_batch(ro, idx, tok.pad_token_id, device) for idx in chunks]
        for b, idx in zip(batches, chunks):
            b["rank"] = segment_ranks(b["comp"], b["mask"], nl_table)
            b["adv"] = token_advantages(adv_rank[idx].to(device), b["rank"], b["eos_tok"], n, cfg.eps_u, cfg.eps_o)

        # 5. Old and reference log-probs, without gradients. On-policy (mu = 1) pi_old is the policy
        # itself, so its log-probs are the detached ones of the update below (every ratio is 1).
        with torch.no_grad():
            for b in batches:
                T = b["comp"].shape[1]
                with common.autocast(device):
                    if cfg.mu > 1:
                        b["logp_old"] = common.completion_logprobs(policy, b["ids"], b["attn"], T)
                    b["logp_ref"] = common.completion_logprobs(ref, b["ids"], b["attn"], T) if ref else None
        t_score = time.time() - t0

        # 6. mu policy updates on this batch of rollouts, each with manual gradient accumulation.
        t0 = time.time()
        sums = {"clip_low": 0, "clip_high": 0, "kl_sum": 0.0, "ratio_sum": 0.0, "tokens": 0}
        for _ in range(cfg.mu):
            for b in batches:
                with common.autocast(device):
                    logp = common.completion_logprobs(policy, b["ids"], b["attn"], b["comp"].shape[1])
                loss, st = rank_grpo_loss(
                    logp, b["logp_old"] if cfg.mu > 1 else logp.detach(), b["logp_ref"], b["adv"], b["rank"],
                    b["mask"], eps_low=eps_low, eps_high=eps_high, beta=cfg.beta, n_ranks=n, level=level,
                    aggregation=cfg.aggregation, n_seqs=B, n_toks=n_toks)
                loss.backward()
                for k in sums:
                    sums[k] += st[k]
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        t_train = time.time() - t0

        # 7. One line per step (same keys every step), a real sample now and then, validation.
        tokens = max(1, sums["tokens"])
        ndcg = [common.ndcg_at_k(r.tolist(), max(1, len(row["groundtruth_with_release_year"])), n)
                for r, row in zip(rel, ro.rows)]
        judged = [common.score_completion(t, r, catalog, n, ks=()) for t, r in zip(ro.texts, ro.rows)]
        record = {"reward": rewards.mean().item()}
        record.update({f"reward@{k}": rewards[:, k - 1].mean().item() for k in sorted({1, 5, 10, n}) if k <= n})
        record.update({
            "ndcg": sum(ndcg) / B, "in_catalog": sum(j["in_catalog_rate"] for j in judged) / B,
            "valid": sum(j["valid_rate"] for j in judged) / B, "items": sum(j["n_lines"] for j in judged) / B,
            "kl": sums["kl_sum"] / tokens, "clip_low": sums["clip_low"] / tokens,
            "clip_high": sums["clip_high"] / tokens, "ratio": sums["ratio_sum"] / tokens,
            "grad_norm": grad_norm, "lr": lr, "len": n_toks / B,
            "t_sample": t_sample, "t_score": t_score, "t_train": t_train})
        log.log(step, record)
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            log.log(step, validate(policy, tok, val, catalog, n, cfg))
        if cfg.sample_every and step % cfg.sample_every == 0:
            print(common.render_list(ro.texts[0], ro.rows[0], catalog, n, rewards[0].tolist()))
        if step % cfg.save_every == 0 or step == cfg.steps:
            common.save_checkpoint(out / "checkpoint", policy, tok, optimizer, scheduler,
                                   {"step": step, "pos": pos, "perm": perm, "order": order.get_state()})

    # 8. The final policy, loadable with from_pretrained / common.load_model.
    common.save_model(policy, tok, out)
    print(f"wrote {out}/ (model, run_config.json, log.jsonl, checkpoint/)")


if __name__ == "__main__":
    common.run(main)
