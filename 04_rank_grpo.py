"""Stage 04: Rank-GRPO, with the vanilla GRPO and GSPO baselines, in plain PyTorch.

Paper: section 2.3 (Eq. 6-9, 16) and App. C. The policy starts from the SFT model of 03_sft.py,
which is also the frozen KL reference. The unit of action is one item of the list: each rank gets
its own reward, its own advantage (normalised across the G samples of a prompt) and its own
importance ratio (the geometric mean of the item's token ratios, clipped).

  python 04_rank_grpo.py                                   # CPU demo, from runs/sft
  python 04_rank_grpo.py --algo grpo --out runs/grpo       # the vanilla GRPO baseline, same budget
  python 04_rank_grpo.py --algo gspo --out runs/gspo       # GSPO (sequence-level ratio)
  torchrun --nproc_per_node=4 04_rank_grpo.py --prompts-per-step 48 --group-size 8 --lr 1e-6 \\
      --steps 1600 --max-new-tokens 1024 --micro-batch-size 16 --gen-batch-size 96 \\
      --grad-checkpointing                           # the paper's setting on 4 GPUs (add --fsdp
                                                     # for a model too large for one GPU)

Writes <out>/ (the policy as an HF directory), run_config.json, log.jsonl, ckpt.pt.

One step (`rl_step`), as in the paper's algorithm box:
  1. sample G lists per prompt from pi_old (the current policy), from the full softmax
  2. reward every rank (Eq. 8 or 9) and normalise each rank's rewards across the G samples (Eq. 6)
  3. give every token its rank, its advantage and its ratio unit; the length rules (App. C)
  4. log-probs of pi_old (only when mu > 1) and of pi_ref, without gradients
  5. mu policy updates: micro-batches accumulate the gradient of Eq. 6 minus beta KL, then one step

Notation in shape comments: B sequences (prompts x G), G samples per prompt, T completion tokens,
N ranks asked for, V vocabulary. Where this differs from the paper and the released code:
docs/method.md, "Where this code differs" (items 8, 9, 11-14).
"""

from __future__ import annotations

import math
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import transformers
from torch.nn.utils.rnn import pad_sequence
from transformers import Cache, DynamicCache, DynamicLayer

import common
from common import arg

# (ratio level, reward, eps_low, eps_high) of each algorithm, as the paper runs them
ALGOS = {
    "rank_grpo": ("rank", "exp_inf", 0.06, 0.08),
    "grpo": ("token", "dcg", 0.2, 0.26),
    "gspo": ("sequence", "dcg", 3e-4, 4e-4),
}

# Settings that define the training trajectory: --resume refuses to change them.
TRAJECTORY = ("model", "ref_model", "algo", "reward", "aggregation", "n_items",
              "prompts_per_step", "group_size", "mu", "lr", "lr_drop_step", "lr_drop", "adam_beta2",
              "beta", "eps_low", "eps_high", "eps_u", "eps_o", "eps_n", "temperature", "seed")


@dataclass
class Config:
    data_dir: str = arg("data", "catalog.jsonl, train.jsonl, val.jsonl from 01_catalog.py")
    model: str = arg("runs/sft", "policy to start from (03_sft.py output), a load_model name or "
                     "HF dir")
    ref_model: str = arg("", "frozen KL reference pi_ref; empty: the same as --model")
    out: str = arg("runs/rank_grpo", "output directory")
    algo: str = arg("rank_grpo", "rank_grpo | grpo (token ratio, DCG@N reward) | gspo (sequence "
                    "ratio)", choices=list(ALGOS))
    reward: str = arg("", "override the algo's reward: exp_inf (Eq. 9, Gamma->inf) | log (Eq. 8) "
                      "| dcg", choices=["", "exp_inf", "log", "dcg"])
    aggregation: str = arg("paper", "paper: Eq. 6, token-mean inside a unit | released: mean over "
                           "tokens", choices=["paper", "released"])
    n_items: int = arg(0, "N, items per list; 0: from data/catalog_summary.json", within="[0, inf)")
    steps: int = arg(12, "optimizer steps (x mu updates per batch of rollouts)", within="[1, inf)")
    prompts_per_step: int = arg(4, "prompts per batch of rollouts (paper: 48)", within="[1, inf)")
    group_size: int = arg(8, "G, samples per prompt (paper: 8)", within="[2, inf)")
    mu: int = arg(1, "policy updates per batch of rollouts (1: on-policy, every ratio is 1)",
                  within="[1, inf)")
    micro_batch_size: int = arg(8, "sequences per forward/backward; gradients accumulate over the "
                                "step", within="[1, inf)")
    lr: float = arg(1e-5, "learning rate, constant (paper: 1e-6 with 48 x 8 rollouts per step)",
                    within="(0, inf)")
    lr_drop_step: int = arg(0, "from this step on use --lr-drop (0: never; paper 1B/3B: epoch 2)",
                            within="[0, inf)")
    lr_drop: float = arg(1e-7, "learning rate after --lr-drop-step", within="(0, inf)")
    adam_beta2: float = arg(0.99, "AdamW beta2 (paper: 0.99)", within="(0, 1)")
    weight_decay: float = arg(0.0, "AdamW weight decay", within="[0, inf)")
    max_grad_norm: float = arg(1.0, "gradient clipping", within="(0, inf)")
    beta: float = arg(1e-3, "KL weight beta (k3 estimator against pi_ref); 0 skips the reference "
                      "model", within="[0, inf)")
    eps_low: float = arg(0.0, "clip range below 1; 0: the algo's (rank 0.06, token 0.2, sequence "
                         "3e-4)", within="[0, 1)")
    eps_high: float = arg(0.0, "clip range above 1; 0: the algo's (rank 0.08, token 0.26, "
                          "sequence 4e-4)", within="[0, inf)")
    eps_u: float = arg(-0.1, "advantage of an EOS after fewer than N items (App. C)")
    eps_o: float = arg(-0.1, "advantage of the token that starts line N+1, and of items beyond N "
                       "(App. C)")
    eps_n: float = arg(0.1, "advantage of the EOS right after item N (the released trainer's "
                       "bonus)")
    temperature: float = arg(1.0, "sampling temperature; ratios and KL use log-probs at this "
                             "temperature", within="(0, inf)")
    max_new_tokens: int = arg(0, "completion cap; 0: 16 tokens per item + 16", within="[0, inf)")
    max_prompt_tokens: int = arg(2048, "prompts are left-truncated to this many tokens",
                                 within="[1, inf)")
    gen_batch_size: int = arg(64, "sequences per decoding batch", within="[1, inf)")
    val_every: int = arg(6, "greedy validation every this many steps, and before the first (0: "
                         "never)", within="[0, inf)")
    val_limit: int = arg(16, "validation conversations", within="[1, inf)")
    sample_every: int = arg(6, "print one real sample every this many steps (0: never)",
                            within="[0, inf)")
    save_every: int = arg(6, "checkpoint every this many steps (and at the end)", within="[1, inf)")
    resume: bool = arg(False, "continue from <out>/ckpt.pt")
    overwrite: bool = arg(False, "replace an earlier run in --out (without it, a finished run is "
                          "kept)")
    grad_checkpointing: bool = arg(False, "recompute activations in backward (saves memory; the "
                                   "training pass then shares no prompt)")
    fsdp: bool = arg(False, "under torchrun: split the policy's parameters, gradients and "
                     "optimizer state over the processes (FSDP2)")
    bf16: bool = arg(True, "bf16 autocast (fp32 master weights) for the log-prob and training "
                           "passes, where bf16 is native (CUDA; CPUs with AVX512-BF16 or AMX)")
    seed: int = arg(0, "seed for prompt order and sampling")
    cpu: bool = arg(False, "use the CPU even when CUDA is present")
    benchmark: str = arg("", "time full steps on a random model of this architecture (appendix)",
                         choices=["", "qwen2.5-0.5b", "smollm2-135m", "tiny"])
    benchmark_steps: int = arg(3, "timed benchmark steps (after one warm-up step)",
                               within="[1, inf)")
    benchmark_prompt_tokens: int = arg(384, "prompt length in the benchmark", within="[1, inf)")


# --- 1. Ranks: which item every token belongs to (section 2.3.1) ----------------------------------

def newline_table(tok, vocab_size: int) -> torch.Tensor:
    """[V] how many '\\n' each token's text contains. Built once: segmentation is then a cumsum."""
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    table = torch.zeros(vocab_size, dtype=torch.long)
    table[:len(texts)] = torch.tensor([t.count("\n") for t in texts])
    return table


def segment_ranks(nl_tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rank_of_tok [B, T]: the newlines before each token (0 = the first item), -1 outside the mask.
    nl_tok [B, T] is the newline count of each token (newline_table[ids]). A token holding a newline
    closes the item it ends, so it belongs to that item; EOS belongs to the line it ends."""
    nl_tok = nl_tok * mask
    rank_of_tok = nl_tok.cumsum(dim=1) - nl_tok
    return torch.where(mask.bool(), rank_of_tok, torch.full_like(rank_of_tok, -1))


# --- 2. Rewards per rank (Eq. 8-9) and advantages per rank (Eq. 6) --------------------------------

def rank_relevance(texts: list[str], rows: list[dict], catalog: common.Catalog,
                   n: int) -> torch.Tensor:
    """rel [B, N]: rel_{i,k} of the first N lines of each completion (common.judge_lines)."""
    rel = torch.zeros(len(texts), n)
    for i, (text, row) in enumerate(zip(texts, rows)):
        items = common.parse_completion(text)[:n]
        truth = common.row_groundtruth(row)
        hits = common.judge_lines(items, truth, row["seen_titles"], catalog)["rel"]
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
    """A_{i,k} = (r_{i,k} - mean_i r_{i,k}) / (std_i r_{i,k} + 1e-4), over the G samples of a
    prompt, separately at each rank. rewards [B, N] (a prompt's G samples adjacent) -> [B, N]."""
    r = rewards.view(-1, group_size, rewards.shape[1])  # [B/G, G, N]
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv.view_as(rewards)


# --- 3. The length rules (App. C, amended): every token's advantage and ratio unit ----------------

def length_rules(adv_rank: torch.Tensor, nl_tok: torch.Tensor, eos_tok: torch.Tensor,
                 mask: torch.Tensor, n: int, eps_u: float, eps_o: float, eps_n: float):
    """(adv_tok, unit_of_tok, mask) [B, T] for the tokens of sampled lists, all length rules here.

    An item token carries its rank's advantage A_{i,k}; the tokens of rank k form ratio unit k.
    The three tokens that decide a list's length are ratio units of their own (not one token's share
    of a title's unit, where their signal would be diluted ~|item| times), with a fixed advantage:
      - the token holding the N-th newline (it starts line N+1; also "\\n\\n" past N)  eps_o
      - an EOS after fewer than N lines (the list stops early)                       eps_u
      - the EOS right after line N (exactly N lines)                                 eps_n (> 0)
    Tokens of lines beyond N get eps_o (App. C), unit = their line. The EOS that ends a longer list
    leaves the loss (mask 0): stopping is right by then, the mistake was the N-th newline.
    Unit ids: 2 * rank for the tokens of a line, 2 * rank + 1 for a decision token in it.
    """
    rank = segment_ranks(nl_tok, mask)  # [B, T]
    live = mask.bool()
    opens_overflow = live & ~eos_tok & (rank < n) & (rank + nl_tok >= n)
    premature, stop_at_n, late = (eos_tok & live & c
                                  for c in (rank < n - 1, rank == n - 1, rank >= n))
    adv_tok = adv_rank.gather(1, rank.clamp(0, n - 1))  # [B, T]
    adv_tok = torch.where(rank >= n, torch.full_like(adv_tok, eps_o), adv_tok)
    for decision, eps in ((opens_overflow, eps_o), (premature, eps_u), (stop_at_n, eps_n)):
        adv_tok = torch.where(decision, torch.full_like(adv_tok, eps), adv_tok)
    mask = mask.masked_fill(late, 0)
    unit = 2 * rank.clamp(min=0) + (opens_overflow | premature | stop_at_n).long()
    return adv_tok.masked_fill(mask == 0, 0.0), unit.masked_fill(mask == 0, 0), mask


def ratio_units(unit_of_tok: torch.Tensor, level: str) -> torch.Tensor:
    """The importance-ratio unit of every token: its rank unit (Rank-GRPO), its whole sequence
    (GSPO) or itself (GRPO)."""
    if level == "rank":
        return unit_of_tok
    if level == "sequence":
        return torch.zeros_like(unit_of_tok)
    return torch.arange(unit_of_tok.shape[1], device=unit_of_tok.device).expand_as(unit_of_tok)


# --- 4. The loss (Eq. 6, 7, 16): tensors in, tensors out; copy these three functions --------------

def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(lref - l) - (lref - l) - 1 >= 0."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def unit_mean(values: torch.Tensor, unit: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `values` over the masked tokens of each unit, handed back to every token of the unit,
    and the unit's token count. values, unit, mask [B, T] -> ([B, T], [B, T])."""
    n_units = int(unit.max()) + 1 if unit.numel() else 1
    m = mask.to(values.dtype)
    zeros = torch.zeros(unit.shape[0], n_units, dtype=values.dtype, device=values.device)
    sums, counts = zeros.scatter_add(1, unit, values * m), zeros.scatter_add(1, unit, m)
    return (sums / counts.clamp(min=1)).gather(1, unit), counts.gather(1, unit)


def rank_grpo_loss(logp, logp_old, logp_ref, adv, unit, mask, *, eps_low: float, eps_high: float,
                   beta: float, n_units: float, n_tokens: float, token_mean: bool = False):
    """-(Eq. 6) + beta * KL, and detached statistics. All inputs [B, T]:

    logp       log pi_theta of the sampled tokens (with gradient)
    logp_old   log pi_old (logp.detach() on-policy), logp_ref log pi_ref (None when beta = 0)
    adv        each token's advantage
    unit       its ratio unit (a rank, a decision, the sequence, itself)
    mask       1 on the tokens that enter the loss
    Each unit's ratio is the geometric mean of its token ratios, w = exp(mean_t log(pi / pi_old)),
    clipped to [1 - eps_low, 1 + eps_high]; the unit's tokens are averaged and the units summed,
    then divided by `n_units`: for Rank-GRPO, the step's sequences (all its prompts x G) times N,
    Eq. 6's 1/(G N) averaged over the prompts. token_mean: every token weighs 1 / n_tokens instead
    (the released code). The KL is a mean over `n_tokens`. Pass the whole optimizer step's n_units
    and n_tokens, and micro-batches add up to the full-batch loss. A worked example, run by the
    tests against rl_step: docs/loss.md.
    """
    m = mask.to(logp.dtype)
    log_ratio_tok, unit_size = unit_mean(logp - logp_old, unit, mask)  # log w of the token's unit
    ratio = torch.exp(log_ratio_tok)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    weight = m / n_tokens if token_mean else m / (unit_size.clamp(min=1) * n_units)
    kl_tok = kl_k3(logp, logp_ref) * m if logp_ref is not None and beta > 0 else torch.zeros_like(m)
    loss = -(surrogate * weight).sum() + beta * kl_tok.sum() / n_tokens
    live = mask.bool()
    stats = {"clip_low": ((ratio < 1 - eps_low) & (adv < 0) & live).sum(),
             "clip_high": ((ratio > 1 + eps_high) & (adv > 0) & live).sum(),
             "kl_sum": kl_tok.sum(), "ratio_sum": (ratio * m).sum(), "tokens": m.sum()}
    return loss, {k: v.detach() for k, v in stats.items()}


# --- 5. Rollouts: G lists per prompt sampled from pi_old, token by token, from the full softmax ---

class BufferCache(Cache):
    """The KV cache of sampling: each layer writes into buffers allocated once for the whole
    completion and hands attention a view of the filled part (transformers' DynamicCache
    concatenates, copying the whole cache at every token). select(rows) keeps, or repeats, rows."""

    class Layer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def update(self, k, v, *args, **kwargs):
            if not self.is_initialized:  # [B, heads, capacity, head_dim]
                self.is_initialized = True
                self.k_buf = k.new_empty(k.shape[0], k.shape[1], self.capacity, k.shape[3])
                self.v_buf = v.new_empty(v.shape[0], v.shape[1], self.capacity, v.shape[3])
            self.k_buf[:, :, self.length:self.length + k.shape[2]] = k
            self.v_buf[:, :, self.length:self.length + k.shape[2]] = v
            self.length += k.shape[2]
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    def __init__(self, model, capacity: int):
        n_layers = model.config.num_hidden_layers
        super().__init__(layers=[self.Layer(capacity) for _ in range(n_layers)])

    def select(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.k_buf, layer.v_buf = layer.k_buf[rows], layer.v_buf[rows]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [B, L] of left-padded id lists."""
    ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True,
                       padding_value=pad_id, padding_side="left")
    return ids, pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs],
                             batch_first=True, padding_side="left")


def sample_token(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One token per row of [B, V] logits from softmax(logits / T), by inverting the CDF (summed in
    float64) with one uniform number per row; torch.multinomial draws V of them on a CPU."""
    probs = torch.softmax(logits / temperature if temperature != 1 else logits, dim=-1)
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


@torch.inference_mode()
def sample(model, prompts: list[list[int]], group_size: int, max_new_tokens: int,
           eos_ids: list[int], pad_id: int, temperature: float = 1.0) -> list[list[int]]:
    """G completions per prompt (adjacent), each up to and including its first EOS, drawn token by
    token from softmax(logits / temperature) over the whole vocabulary: nothing is truncated, so
    samples come from pi itself. Each prompt runs once and its keys/values are repeated for its G
    samples. One host sync per token (are all done?); finished samples leave the batch, and the
    cache, once a quarter of the batch has finished (each such copy costs about one step)."""
    device = next(model.parameters()).device
    ids, attn = (t.to(device) for t in left_pad(prompts, pad_id))
    P, T = ids.shape[1], max_new_tokens
    cache = BufferCache(model, P + T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only (left padding)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    rows = torch.arange(len(prompts), device=device).repeat_interleave(group_size)  # [B]
    logits, pos = out.logits[:, -1].float()[rows], pos[rows, -1]
    cache.select(rows)
    # The decode steps' attention mask, [b, 1, 1, P + T] (True: attend), handed to the model ready
    # made: transformers would otherwise inspect a 2-D mask on the host at every step.
    mask = torch.cat([attn[rows], attn.new_zeros(len(rows), T)], dim=1).bool()[:, None, None]
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long, device=device)  # [B, T]
    alive = torch.arange(len(rows), device=device)  # the rows of `tokens` the batch still holds
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)  # [b]: EOS written
    for t in range(T):
        nxt = torch.where(done, pad_id, sample_token(logits, temperature))  # [b]
        tokens[alive, t] = nxt
        done |= torch.isin(nxt, eos)
        n_done = int(done.sum()) if t < T - 1 else len(done)  # the one host sync of a step
        if n_done == len(done):
            break
        if 4 * n_done >= len(done):
            keep = (~done).nonzero().squeeze(1)
            alive, done, nxt, pos, mask = alive[keep], done[keep], nxt[keep], pos[keep], mask[keep]
            cache.select(keep)
        pos, mask[:, :, :, P + t] = pos + 1, True
        logits = model(input_ids=nxt[:, None], attention_mask=mask[..., :P + t + 1],
                       position_ids=pos[:, None], past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
    ends = torch.isin(tokens, eos)  # the length: up to the first EOS, or all T tokens
    length = torch.where(ends.any(1), ends.int().argmax(1) + 1, T)
    return [row[:n] for row, n in zip(tokens.tolist(), length.tolist())]


@dataclass
class Rollouts:
    """A batch of sampled completions, the G samples of a prompt adjacent."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # up to and including the first EOS (if any)
    has_eos: list[bool]
    texts: list[str]
    rows: list[dict]


def sample_rollouts(model, tok, prompts: list[list[int]], rows: list[dict],
                    cfg: Config) -> Rollouts:
    """G samples per prompt from the current policy (= pi_old), in batches of about
    --gen-batch-size sequences; bf16 autocast on CUDA (on a CPU, fp32 decodes faster)."""
    eos_ids, device = common.eos_token_ids(tok, model), next(model.parameters()).device
    per_call = max(1, cfg.gen_batch_size // cfg.group_size)  # prompts per decoding batch
    model.eval()
    completions = []
    with common.decode_autocast(device, cfg.bf16), common.gathered(model):
        for s in range(0, len(prompts), per_call):
            completions += sample(model, prompts[s:s + per_call], cfg.group_size,
                                  cfg.max_new_tokens, eos_ids, tok.pad_token_id, cfg.temperature)
    model.train()
    has_eos = [bool(c) and c[-1] in eos_ids for c in completions]
    texts = [tok.decode(c[:-1] if e else c) for c, e in zip(completions, has_eos)]
    G = cfg.group_size
    return Rollouts([p for p in prompts for _ in range(G)], completions, has_eos, texts,
                    [r for r in rows for _ in range(G)])


# --- 6. Log-probs of the sampled tokens: each prompt run once, the vocabulary projection in chunks 

@dataclass
class Batch:
    """Prompt + completion sequences with each distinct prompt stored once: prompt_ids, prompt_mask
    [U, P] (left-padded), prompt_of [B] (each sequence's prompt row), completion_ids,
    completion_mask [B, T] (right-padded)."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_of: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in astuple(self)))


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """A Batch of (prompt, completion) id lists; masks from lengths, never from the pad id (pad may
    be EOS, a completion token the model must learn and be scored on)."""
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    row = {p: i for i, p in enumerate(distinct)}
    prompt_ids, prompt_mask = left_pad([list(p) for p in distinct], pad_id)
    T = max(1, max(len(c) for c in completions))
    comp = torch.full((len(completions), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), T), dtype=torch.long)
    for i, c in enumerate(completions):
        comp[i, :len(c)], mask[i, :len(c)] = torch.tensor(c, dtype=torch.long), 1
    prompt_of = torch.tensor([row[tuple(p)] for p in prompts])
    return Batch(prompt_ids, prompt_mask, prompt_of, comp, mask)


class TokenLogprob(torch.autograd.Function):
    """log softmax(h W^T / temperature)[y] for a chunk of positions, keeping no [N, V] tensor:
    backward recomputes the logits and forms softmax - one-hot in place (the fused linear
    cross-entropy trick). h [..., H], weight [V, H] in the matmul dtype, y [...] -> [...] fp32."""

    @staticmethod
    def _logits(h, weight, temperature):
        logits = h.to(weight.dtype) @ weight.T  # [..., V], normalised in fp32 (or fp64)
        logits = logits.float() if logits.element_size() < 4 else logits
        return logits.div_(temperature) if temperature != 1 else logits

    @staticmethod
    def forward(ctx, h, weight, y, temperature):
        logits = TokenLogprob._logits(h, weight, temperature)
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(h, weight, y, lse)
        ctx.temperature = temperature
        return logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):
        h, weight, y, lse = ctx.saved_tensors
        g = (grad / ctx.temperature).unsqueeze(-1)  # d logp_y/d logits = (one_hot(y) - softmax)/T
        g_logits = TokenLogprob._logits(h, weight, ctx.temperature).sub_(lse.unsqueeze(-1)).exp_()
        g_logits = g_logits.mul_(-g).scatter_add_(-1, y.unsqueeze(-1), g).to(weight.dtype)
        grad_w = g_logits.flatten(0, -2).T @ h.to(weight.dtype).flatten(0, -2)
        return (g_logits @ weight).to(h.dtype), grad_w, None, None


def completion_logprobs(model, batch: Batch, temperature: float = 1.0, share_prompts: bool = True,
                        chunk: int = 128) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every completion token, [B, T] fp32 (with gradients when enabled).
    share_prompts: each distinct prompt runs once and its keys/values serve all its completions (a
    Rank-GRPO group costs P + G*T tokens, not G*(P + T)); gradients flow back through the shared
    states. Off: every sequence runs whole (needed under activation checkpointing, which drops the
    cache); the numbers are the same. Positions count real tokens only, as in sample()."""
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    prompt_pos = (batch.prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [U, P]
    prompt_len = batch.prompt_mask.sum(1)[batch.prompt_of]  # [B]
    comp_pos = prompt_len[:, None] + torch.arange(T, device=prompt_len.device)  # [B, T]
    attn = torch.cat([batch.prompt_mask[batch.prompt_of], batch.completion_mask], 1)  # [B, P + T]
    if share_prompts:
        cache = DynamicCache()
        h = common.hidden_states(model, input_ids=batch.prompt_ids, use_cache=True,
                                 attention_mask=batch.prompt_mask, position_ids=prompt_pos,
                                 past_key_values=cache)  # [U, P, H]
        cache.batch_select_indices(batch.prompt_of)  # [U, ...] -> [B, ...], differentiable
        last = h[batch.prompt_of, -1:]  # [B, 1, H]: predicts completion token 0
        h = common.hidden_states(model, input_ids=batch.completion_ids, attention_mask=attn,
                                 position_ids=comp_pos, past_key_values=cache,
                                 use_cache=True)  # [B, T, H]
        hidden = torch.cat([last, h[:, :-1]], dim=1)
    else:
        ids = torch.cat([batch.prompt_ids[batch.prompt_of], batch.completion_ids], dim=1)
        pos = torch.cat([prompt_pos[batch.prompt_of], comp_pos], dim=1)
        h = common.hidden_states(model, input_ids=ids, attention_mask=attn, position_ids=pos)
        hidden = h[:, P - 1:-1]  # the state before each token predicts it
    weight = model.get_output_embeddings().weight  # [V, H], cast once to the autocast dtype
    if torch.is_autocast_enabled(weight.device.type):
        weight = weight.to(torch.get_autocast_dtype(weight.device.type))
    y = batch.completion_ids
    chunks = [TokenLogprob.apply(hidden[:, s:s + chunk], weight, y[:, s:s + chunk], temperature)
              for s in range(0, T, chunk)]
    return torch.cat(chunks, dim=1)


def micro_batches(ro: Rollouts, adv_rank: torch.Tensor, nl_table: torch.Tensor, n: int, level: str,
                  cfg: Config, pad_id: int, device) -> list[tuple[Batch, dict]]:
    """The step's micro-batches of --micro-batch-size sequences (whole groups share a prompt pass),
    each with its per-token advantages, ratio units and loss mask."""
    out = []
    for s in range(0, len(ro.completion_ids), cfg.micro_batch_size):
        idx = list(range(s, min(s + cfg.micro_batch_size, len(ro.completion_ids))))
        batch = make_batch([ro.prompt_ids[i] for i in idx],
                           [ro.completion_ids[i] for i in idx], pad_id).to(device)
        lengths = batch.completion_mask.sum(1)  # [b]
        # [b, T]: True on the EOS, if any
        eos_tok = torch.zeros_like(batch.completion_mask, dtype=torch.bool)
        ends = torch.tensor([ro.has_eos[i] for i in idx], device=device).nonzero().squeeze(1)
        eos_tok[ends, lengths[ends] - 1] = True
        nl_tok = nl_table.to(device)[batch.completion_ids]
        adv, unit, mask = length_rules(adv_rank[idx].to(device), nl_tok, eos_tok,
                                       batch.completion_mask, n, cfg.eps_u, cfg.eps_o, cfg.eps_n)
        out.append((batch, {"adv": adv, "unit": ratio_units(unit, level), "mask": mask}))
    return out


# --- 7. One step, and the training loop -----------------------------------------------------------

def clock(device) -> float:
    """time.time() once the device has finished its queued work: phase timers measure the phase."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def rl_step(cfg: Config, policy, ref, optimizer, tok, catalog: common.Catalog,
            prompts: list[list[int]], rows: list[dict],
            nl_table: torch.Tensor) -> tuple[dict, Rollouts, torch.Tensor]:
    """One batch of rollouts and cfg.mu policy updates on it. `prompts`/`rows` are this process's
    share of the step's prompts (whole groups). Returns the step's record (summed over processes),
    the rollouts and their per-rank rewards [B, N]."""
    device, n, world = next(policy.parameters()).device, cfg.n_items, common.world_size()
    level, _, _, _ = ALGOS[cfg.algo]
    amp = cfg.bf16 and common.bf16_native(device)
    share = not cfg.grad_checkpointing  # checkpointed layers drop the cache of a shared prompt

    # 1. G lists per prompt from pi_old, the current policy.
    t0 = clock(device)
    ro = sample_rollouts(policy, tok, prompts, rows, cfg)
    t1 = clock(device)

    # 2. Rewards per rank (Eq. 8/9) and advantages normalised per rank across the G samples (Eq. 6).
    rel = rank_relevance(ro.texts, ro.rows, catalog, n)  # [B, N]
    rewards = rank_rewards(rel, cfg.reward)  # [B, N]
    adv_rank = group_advantages(rewards, cfg.group_size)  # [B, N]

    # 3. Tokens -> ranks, advantages, ratio units, the length rules; the step's normalisers.
    batches = micro_batches(ro, adv_rank, nl_table, n, level, cfg, tok.pad_token_id, device)
    n_seqs, n_tokens = common.all_sum(
        [len(ro.texts), sum(int(b["mask"].sum()) for _, b in batches)], device)
    n_units = {"rank": n_seqs * n, "sequence": n_seqs, "token": n_tokens}[level]
    t2 = clock(device)

    # 4. Old and reference log-probs, no gradient, each distinct prompt run once (in eval mode,
    # where activation checkpointing is off). On-policy (mu = 1) pi_old is the policy itself: its
    # log-probs are the detached ones of the update (every ratio exactly 1).
    policy.eval()
    with torch.no_grad(), common.autocast(device, amp), common.gathered(policy):
        for batch, b in batches:
            if cfg.mu > 1:
                b["logp_old"] = completion_logprobs(policy, batch, cfg.temperature)
            if ref is not None:
                b["logp_ref"] = completion_logprobs(ref, batch, cfg.temperature)
    policy.train()
    t3 = clock(device)

    # 5. mu policy updates, each accumulated over the micro-batches, then one all-reduce and step.
    sums: dict[str, torch.Tensor] = {}
    for _ in range(cfg.mu):
        for batch, b in batches:
            with common.autocast(device, amp):
                logp = completion_logprobs(policy, batch, cfg.temperature, share)  # [b, T]
            logp_old = b["logp_old"] if cfg.mu > 1 else logp.detach()
            loss, stats = rank_grpo_loss(
                logp, logp_old, b.get("logp_ref"), b["adv"], b["unit"], b["mask"],
                eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, n_units=n_units,
                n_tokens=n_tokens, token_mean=cfg.aggregation == "released" or level == "token")
            common.sync_grads(policy, last=batch is batches[-1][0])
            loss.backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
        common.all_reduce_grads(policy)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):  # never let a NaN or inf into the weights
            raise FloatingPointError(f"the gradient norm is {grad_norm.item()}; "
                                     "the policy was not updated")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    t4 = clock(device)
    timer = {"t_sample": t1 - t0, "t_score": t2 - t1, "t_ref": t3 - t2, "t_train": t4 - t3}
    record = step_record(ro, rel, rewards, sums, catalog, cfg, device)
    record.update({"grad_norm": grad_norm.item(), **timer, "dt": sum(timer.values())})
    return record, ro, rewards


def step_record(ro: Rollouts, rel: torch.Tensor, rewards: torch.Tensor, sums: dict,
                catalog: common.Catalog, cfg: Config, device) -> dict[str, float]:
    """The step's numbers: sums over this process's samples and tokens, added up over the
    processes, then divided by the whole step's samples or tokens."""
    n = cfg.n_items
    ndcg = [common.ndcg_at_k(r.tolist(), max(1, len(row["groundtruth_with_release_year"])), n)
            for r, row in zip(rel, ro.rows)]
    judged = [common.score_completion(t, r, catalog, n, ks=()) for t, r in zip(ro.texts, ro.rows)]
    shown = sorted({k for k in (1, 5, 10, n) if k <= n})
    per_sample = {"reward": rewards.mean(1).sum().item(),
                  **{f"reward@{k}": rewards[:, k - 1].sum().item() for k in shown},
                  "ndcg": sum(ndcg), "in_catalog": sum(j["in_catalog_rate"] for j in judged),
                  "valid": sum(j["valid_rate"] for j in judged),
                  "items": sum(j["n_lines"] for j in judged),
                  "exact_n": sum(j["exact_n"] for j in judged),
                  "len": sum(len(c) for c in ro.completion_ids)}
    per_token = {k: v.item() / cfg.mu for k, v in sums.items()}  # clip_low, clip_high, kl_sum, ...
    sums_here = [len(ro.texts), *per_sample.values(), *per_token.values()]
    n_seqs, *summed = common.all_sum(sums_here, device)
    total = dict(zip([*per_sample, *per_token], summed))
    record = {k: total[k] / n_seqs for k in per_sample}
    tokens = max(1.0, total["tokens"])
    record.update({"kl": total["kl_sum"] / tokens, "clip_low": total["clip_low"] / tokens,
                   "clip_high": total["clip_high"] / tokens, "ratio": total["ratio_sum"] / tokens})
    record["clip"] = record["clip_low"] + record["clip_high"]
    return record


def validate(model, tok, rows, catalog, cfg: Config) -> dict[str, float]:
    """Greedy Recall/NDCG@{5,10,N} (filtered protocol) on the first --val-limit conversations, on
    rank 0 ({} elsewhere). Call it on every process: a sharded model is gathered for it."""
    device = next(model.parameters()).device
    with common.gathered(model), common.decode_autocast(device, cfg.bf16):
        if common.rank() != 0:
            return {}
        texts = common.generate(model, tok, [r["prompt"] for r in rows], cfg.max_new_tokens,
                                batch_size=cfg.gen_batch_size,
                                max_prompt_tokens=cfg.max_prompt_tokens, progress="validation")
    ks = [k for k in common.cutoffs(cfg.n_items) if k in (5, 10, cfg.n_items)]
    s = common.summarize([common.score_completion(t, r, catalog, cfg.n_items, ks)
                          for t, r in zip(texts, rows)], rows)
    out = {}
    for k in ks:
        out[f"val_recall@{k}"] = s[f"recall@{k}_filtered"]
        out[f"val_ndcg@{k}"] = s[f"ndcg@{k}_filtered"]
    out["val_exact_n"] = s["exact_n"]
    return out


def resolve(cfg: Config, n: int) -> Config:
    """Fill the settings that depend on others: N, the completion cap, the algo's reward, clip."""
    _, reward, eps_low, eps_high = ALGOS[cfg.algo]
    cfg.n_items = n
    cfg.max_new_tokens = cfg.max_new_tokens or 16 * n + 16
    cfg.reward = cfg.reward or reward
    cfg.eps_low, cfg.eps_high = cfg.eps_low or eps_low, cfg.eps_high or eps_high
    return cfg


def load_models(cfg: Config, device, verbose: bool = True):
    """The policy (fp32 master weights), the frozen reference (bf16 on CUDA; None if beta = 0)."""
    if not Path(cfg.model).is_dir() and cfg.model.startswith("runs/"):
        raise common.DataError(f"{cfg.model} not found: run 03_sft.py first")
    policy, tok = common.load_model(cfg.model, device=device)
    ref = None
    if cfg.beta > 0:
        ref, _ = common.load_model(cfg.ref_model or cfg.model, device=device,
                                   dtype=common.inference_dtype(device, cfg.bf16))
        ref.eval().requires_grad_(False)
    if cfg.grad_checkpointing:
        common.enable_activation_checkpointing(policy)
    if cfg.fsdp:
        common.shard(policy)  # the reference stays whole: bf16 on GPUs, and no gathering
    if verbose:
        print(f"policy {cfg.model} on {device} x {common.world_size()} process(es), "
              f"{sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M params, bf16 autocast "
              f"{'on' if cfg.bf16 and common.bf16_native(device) else 'off'}; ref "
              f"{(cfg.ref_model or cfg.model) if ref is not None else 'none'}; algo {cfg.algo}: "
              f"{ALGOS[cfg.algo][0]}-level ratio, {cfg.reward} reward, "
              f"clip [{1 - cfg.eps_low:g}, {1 + cfg.eps_high:g}], N={cfg.n_items}, "
              f"G={cfg.group_size}")
    return policy, ref, tok


def make_optimizer(cfg: Config, policy):
    """AdamW (the paper's beta2) and the constant schedule with the optional drop."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=True)
    drop = cfg.lr_drop / cfg.lr
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: drop if cfg.lr_drop_step and s >= cfg.lr_drop_step else 1.0)
    return optimizer, schedule


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, __doc__.split("\n")[0])
    if cfg.benchmark:
        return benchmark(cfg)
    cfg = resolve(cfg, common.data_n(cfg.data_dir, cfg.n_items))
    rank, world, device = common.setup_distributed(cfg.cpu)
    if cfg.prompts_per_step % world:
        raise common.DataError(f"--prompts-per-step {cfg.prompts_per_step} is not divisible by "
                               f"{world} processes")
    out, main_process = Path(cfg.out), rank == 0

    # 1. Data and models.
    catalog = common.Catalog.load(Path(cfg.data_dir) / "catalog.jsonl")
    train = common.read_rows(Path(cfg.data_dir) / "train.jsonl", "run 01_catalog.py first")
    val = common.read_rows(Path(cfg.data_dir) / "val.jsonl", "run 01_catalog.py first")
    val = common.first_conversations(val, cfg.val_limit)
    policy, ref, tok = load_models(cfg, device, verbose=main_process)
    optimizer, schedule = make_optimizer(cfg, policy)
    nl_table = newline_table(tok, policy.get_output_embeddings().weight.shape[0])
    if main_process:
        print(f"read {len(train)} train rows, {len(val)} val rows, {len(catalog)} catalog items")

    order = torch.Generator().manual_seed(cfg.seed)  # the same prompt order in every process
    perm, pos, start = torch.randperm(len(train), generator=order).tolist(), 0, 0
    if main_process:
        common.start_run(out, cfg, cfg.resume, TRAJECTORY, cfg.overwrite)
    common.barrier()
    if cfg.resume:
        state = common.load_checkpoint(out, policy, optimizer, schedule)
        start, pos, perm = state["step"], state["pos"], state["perm"]
        order.set_state(state["order"])
        if main_process:
            print(f"resumed from {out}/ckpt.pt at step {start}")
    if start == 0 and cfg.val_every and (record := validate(policy, tok, val, catalog, cfg)):
        common.log_step(out, 0, cfg.steps, record, SHOW)

    try:
        for step in range(start + 1, cfg.steps + 1):
            # 2. This step's prompts: the next rows of a shuffled pass over train; this process
            # takes every world-th of them (whole groups).
            if pos + cfg.prompts_per_step > len(perm):
                perm, pos = torch.randperm(len(train), generator=order).tolist(), 0
            rows = [train[i] for i in perm[pos:pos + cfg.prompts_per_step]][rank::world]
            pos += cfg.prompts_per_step
            prompts = common.encode_prompts(tok, [r["prompt"] for r in rows],
                                            cfg.max_prompt_tokens)

            # 3. Sample, reward, update (rl_step); one line per step, now and then a real sample.
            # A step's samples come from a seed of its own (and of the process's): a resumed run
            # draws the same ones without saving a random state.
            torch.manual_seed(hash((cfg.seed, step, rank)))
            lr = schedule.get_last_lr()[0]
            try:
                record, ro, rewards = rl_step(cfg, policy, ref, optimizer, tok, catalog, prompts,
                                              rows, nl_table)
            except FloatingPointError as e:
                raise common.DataError(f"step {step}: {e}") from None
            schedule.step()
            if main_process:
                common.log_step(out, step, cfg.steps, {**record, "lr": lr}, SHOW)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    print(common.render_list(ro.texts[0], ro.rows[0], catalog, cfg.n_items,
                                             rewards[0].tolist()))

            if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps) and (
                    record := validate(policy, tok, val, catalog, cfg)):
                common.log_step(out, step, cfg.steps, record, SHOW)
            if step % cfg.save_every == 0 or step == cfg.steps:
                state = {"step": step, "pos": pos, "perm": perm, "order": order.get_state()}
                common.save_checkpoint(out, policy, optimizer, schedule, state)
            common.barrier()
    except KeyboardInterrupt:
        raise common.interrupted(out) from None  # one line: how to resume

    # 4. The final policy, loadable with from_pretrained / common.load_model.
    common.save_model(policy, tok, out)
    if main_process:
        print(f"wrote {out}/ (model, run_config.json, log.jsonl, ckpt.pt)")


# The printed step line: what a reader watches, and its number formats (all goes to log.jsonl).
SHOW = {"reward": ".3f", "ndcg": ".3f", "items": ".1f", "exact_n": ".2f", "kl": ".1e",
        "clip": ".3f", "dt": ".0f", "val_recall@10": ".3f", "val_ndcg@10": ".3f",
        "val_exact_n": ".2f"}


# --- Appendix: a benchmark of full steps on a randomly initialised model of a real architecture ---

ARCHS = {  # shapes of the released configs (weights are random: only speed and memory are measured)
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)),
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, tie_word_embeddings=True)),
    "tiny": ("LlamaConfig", dict(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


class SyntheticTokenizer:
    """Stands in for a tokenizer of any vocabulary size: token v reads 'w{v}' and every 16th is a
    newline, so sampled lists have ranks; every `eos_every`-th id ends a completion, so that the
    near-uniform samples of a random model stop after a geometric number of tokens."""

    def __init__(self, vocab_size: int, eos_every: int):
        self.vocab_size, self.pad_token_id, self.eos_token_id = vocab_size, 0, None
        self.eos_ids = list(range(eos_every, vocab_size, eos_every))

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids) -> str:
        return "".join("\n" if v % 16 == 15 else f" w{v}" for v in ids)

    def batch_decode(self, seqs) -> list[str]:
        return [self.decode(s) for s in seqs]


def benchmark_setup(cfg: Config, device):
    """A random policy and reference of --benchmark's shape, its synthetic tokenizer (completions
    of 3/4 of --max-new-tokens on average, a quarter of them cut at the cap) and rows."""
    cls_name, shape = ARCHS[cfg.benchmark]
    config = getattr(transformers, cls_name)(**shape, max_position_embeddings=32768, bos_token_id=0,
                                             pad_token_id=0, eos_token_id=None)
    tok = SyntheticTokenizer(config.vocab_size, max(2, round(0.75 * cfg.max_new_tokens)))
    policy = transformers.AutoModelForCausalLM.from_config(config).to(device)
    policy.generation_config = transformers.GenerationConfig(pad_token_id=0,
                                                             eos_token_id=tok.eos_ids)
    ref = None
    if cfg.beta > 0:
        ref = transformers.AutoModelForCausalLM.from_config(config).to(
            device, common.inference_dtype(device, cfg.bf16))
        ref.load_state_dict(policy.state_dict())
        ref.eval().requires_grad_(False)
    if cfg.grad_checkpointing:
        common.enable_activation_checkpointing(policy)
    if cfg.fsdp:
        common.shard(policy)
    local = cfg.prompts_per_step // common.world_size()
    rows = [{"id": f"bench#{i}", "seen_titles": [],
             "groundtruth_with_release_year": [["w17", "1995"]]} for i in range(local)]
    return policy, ref, tok, rows


def benchmark(cfg: Config) -> None:
    """Seconds per step by phase, sampled tokens per second and peak memory for --prompts-per-step
    x --group-size rollouts of up to --max-new-tokens tokens after prompts of 3/4 to all of
    --benchmark-prompt-tokens (a new mix every step)."""
    import resource
    rank, world, device = common.setup_distributed(cfg.cpu)
    transformers.set_seed(cfg.seed + rank)
    cfg.max_new_tokens = cfg.max_new_tokens or 300
    cfg = resolve(cfg, cfg.n_items or common.N_ITEMS)
    policy, ref, tok, rows = benchmark_setup(cfg, device)
    optimizer, _ = make_optimizer(cfg, policy)
    nl_table = newline_table(tok, len(tok))
    catalog = common.Catalog([{"title": "w17", "year": 1995}])
    g = torch.Generator().manual_seed(cfg.seed + rank)
    print(f"benchmark {cfg.benchmark} ({sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M "
          f"params) on {device} x {world}: {cfg.prompts_per_step} prompts x {cfg.group_size} "
          f"samples, prompts of up to {cfg.benchmark_prompt_tokens} tokens, up to "
          f"{cfg.max_new_tokens} new tokens, micro-batch {cfg.micro_batch_size}, "
          f"bf16 {cfg.bf16 and common.bf16_native(device)}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases, times = ("t_step", "t_sample", "t_score", "t_ref", "t_train"), []
    for step in range(cfg.benchmark_steps + 1):  # step 0 warms up (allocator, kernels)
        widths = torch.randint(max(1, 3 * cfg.benchmark_prompt_tokens // 4),
                               cfg.benchmark_prompt_tokens + 1, (len(rows),), generator=g)
        prompts = [torch.randint(1, len(tok), (w,), generator=g).tolist() for w in widths.tolist()]
        t0 = clock(device)
        record, _, _ = rl_step(cfg, policy, ref, optimizer, tok, catalog, prompts, rows, nl_table)
        record["t_step"] = clock(device) - t0
        times += [record] if step > 0 else []
        if rank == 0:
            print(f"step {step} ({'warm-up' if step == 0 else 'timed'}): "
                  + " | ".join(f"{k} {record[k]:.2f}s" for k in phases)
                  + f" | {record['len']:.0f} new tokens per sample")
    if rank == 0:
        mean = {k: sum(t[k] for t in times) / len(times) for k in (*phases, "len")}
        tokens = mean["len"] * cfg.prompts_per_step * cfg.group_size
        print(f"mean over {len(times)} steps: {mean['t_step']:.2f} s/step = sampling "
              f"{mean['t_sample']:.2f} + scoring {mean['t_score']:.2f} + old/ref log-probs "
              f"{mean['t_ref']:.2f} + training {mean['t_train']:.2f}; "
              f"{tokens / mean['t_sample']:.0f} sampled tokens/s")
        def gib(tensors) -> float:  # this process's share of sharded (DTensor) ones
            return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes
                       for t in tensors) / 2**30
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        print(f"this process holds {gib(policy.parameters()):.2f} GiB of parameters, as much again "
              f"of gradients during a step, and {gib(state):.2f} GiB of optimizer state (fsdp "
              f"{cfg.fsdp}, {world} process(es))")
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB "
                  f"allocated, {torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB reserved; "
                  f"now {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use")
        else:
            print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f}"
                  " GiB (CPU max RSS)")


if __name__ == "__main__":
    common.run(main)
