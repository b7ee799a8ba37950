"""Stage 03: supervised warm start (SFT) on the Remap-Reflect-Adjust demonstrations.

Paper: Eq. 2 and the SFT recipe of section 2.2 (docs/method.md, 'SFT'). Full fine-tuning with
cross-entropy on the completion tokens only: the prompt is the condition, not a target. The model
learns the output format (N lines of 'Title (Year)', then EOS) and the catalog; 04_rank_grpo.py
starts from the result and also uses it as the frozen KL reference.

  python 03_sft.py                    # CPU demo: smollm2, 110 steps x 8 sequences, ~20 min
  python 03_sft.py --resume           # continue from runs/sft/ckpt.pt, same flags

The paper's recipe (Qwen2.5-0.5B-Instruct, 95,753 SFT rows from 02; bf16 autocast, fp32 master
weights; 1,500 steps x 384 sequences = 576,000 sequences, about 6 passes over the rows; the paper
trains on 4 GPUs: `torchrun --nproc_per_node=4 03_sft.py ...`, and `--fsdp` shards a larger model):

  python 03_sft.py --model Qwen/Qwen2.5-0.5B-Instruct --out runs/sft --steps 1500 \
      --batch-size 384 --micro-batch-size 16 --lr 5e-5 --warmup-frac 0.05 --max-len 1024 \
      --grad-checkpointing --eval-every 100 --val-limit 1024 --eval-gen 256 --save-every 100

Reads <data-dir>/sft_train.jsonl, sft_val.jsonl (02) and, with --eval-gen, catalog.jsonl (01).
Writes <out>/: the model and tokenizer (save_pretrained), run_config.json, log.jsonl, ckpt.pt.

Each optimizer step: --batch-size sequences; the loss is the sum of the completion tokens' negative
log-likelihood divided by the number of completion tokens of the whole step, so the gradient does
not depend on how the step is cut into micro-batches (--micro-batch-size, memory only).

Deviations from the paper (which gives only lr, schedule, batch, max length and steps):
  1. Training length is counted in optimizer steps (--steps). The data is reshuffled each epoch with
     a seeded generator; a batch may span the end of one epoch and the start of the next.
  2. A sequence longer than --max-len keeps its prompt (left-truncated to --max-prompt-tokens, so
     the oldest turns go first) and loses the end of its completion, EOS included; the count is
     printed.
  3. AdamW with betas (0.9, 0.999) and no weight decay; warm-up = 5% of the steps rounded down, with
     transformers' schedule (its first warm-up step has lr 0: one of the demo's 110 steps only
     measures the loss). The paper does not give these.
  4. The CPU demo defaults (smollm2, 110 x 8 sequences, lr 5e-4, N = 10; chosen on validation,
     docs/experiments.md) are a miniature: 0.55 epoch of the demo's 1,600 demonstrations. bf16
     autocast runs where bf16 is native (CUDA, CPUs with AVX512-BF16 or AMX), fp32 elsewhere.
  5. Rows of one conversation share their prompt and demonstration (they differ only in ground
     truth, which SFT does not use), so each distinct (prompt, demonstration) pair is trained on
     once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common
from common import arg


@dataclass
class Config:
    data_dir: str = arg("data", "where sft_{train,val}.jsonl (02) and catalog.jsonl (01) are")
    out: str = arg("runs/sft", "run directory: the model, run_config.json, log.jsonl, ckpt.pt")
    model: str = arg("smollm2", "start model: smollm2, an HF directory or a hub id")
    trust_remote_code: bool = arg(False, "let transformers run code shipped with a hub model")
    n_items: int = arg(0, "N, the list length, for --eval-gen scoring; 0: what 01_catalog.py wrote",
                       within="[0, inf)")
    seed: int = arg(0, "seed of the data order (and of everything else random)")
    cpu: bool = arg(False, "train on the CPU even when CUDA is available")
    bf16: bool = arg(True, "bf16 autocast (fp32 master weights) where bf16 is native: CUDA, CPUs "
                           "with AVX512-BF16 or AMX; --no-bf16: fp32")
    limit: int = arg(0, "use only the first LIMIT training rows (0: all)", within="[0, inf)")
    steps: int = arg(110, "optimizer steps (the paper: 1,500)", within="[1, inf)")
    batch_size: int = arg(8, "sequences per optimizer step (the paper's effective batch: 384)",
                          within="[1, inf)")
    micro_batch_size: int = arg(8, "sequences per forward/backward pass; changes memory, not the "
                                "math", within="[1, inf)")
    lr: float = arg(5e-4, "peak learning rate of AdamW (the paper: 5e-5; the 110-step CPU demo "
                    "needs more)", within="(0, inf)")
    warmup_frac: float = arg(0.05, "fraction of the steps with linear warm-up, then cosine decay "
                             "to 0", within="[0, 1)")
    weight_decay: float = arg(0.0, "AdamW weight decay", within="[0, inf)")
    max_grad_norm: float = arg(1.0, "clip the gradient's global norm to this (0: no clipping)",
                               within="[0, inf)")
    max_len: int = arg(1024, "max tokens of prompt + completion; longer completions are cut",
                       within="[2, inf)")
    max_prompt_tokens: int = arg(768, "keep the last this many prompt tokens (must be < --max-len)",
                                 within="[1, inf)")
    grad_checkpointing: bool = arg(False, "recompute activations in backward: less memory, more "
                                   "time")
    fsdp: bool = arg(False, "under torchrun: split parameters, gradients and optimizer state over "
                     "the processes (FSDP2)")
    eval_every: int = arg(55, "validation every this many steps, and at the last step (0: never)",
                          within="[0, inf)")
    val_limit: int = arg(16, "validation rows for the validation loss", within="[1, inf)")
    eval_gen: int = arg(8, "greedy generation on this many validation conversations (0: off)",
                        within="[0, inf)")
    eval_batch_size: int = arg(16, "sequences per batch in validation loss and generation",
                               within="[1, inf)")
    max_new_tokens: int = arg(0, "generation length for --eval-gen; 0: 1.5x the longest SFT "
                              "completion", within="[0, inf)")
    save_every: int = arg(55, "write <out>/ckpt.pt every this many steps (0: never)",
                          within="[0, inf)")
    resume: bool = arg(False, "continue exactly from <out>/ckpt.pt (use the same flags)")
    overwrite: bool = arg(False, "replace an earlier run in --out (without it, a finished run is "
                          "kept)")


# Settings that define the training trajectory: a resume with different values would not continue
# the same run, so it is refused.
TRAJECTORY = ("model", "seed", "limit", "steps", "batch_size", "lr", "warmup_frac", "weight_decay",
              "max_grad_norm", "max_len", "max_prompt_tokens")


# --- 1. Examples: the prompt x and the demonstration y of Eq. 2, as token ids ---------------------

@dataclass
class Example:
    prompt: list[int]  # chat template up to and including the assistant header
    completion: list[int]  # the demonstration's tokens, then EOS: what the model must generate


def encode_examples(tok, rows: list[dict], max_prompt_tokens: int,
                    max_len: int) -> tuple[list[Example], int]:
    """Token ids of each row's prompt and completion, and how many completions were cut at max_len.

    The completion is tokenised on its own and followed by EOS: exactly the tokens the model will
    later produce after the assistant header (04 samples them that way), so training and sampling
    see the same token boundaries.
    """
    prompts = common.encode_prompts(tok, [r["prompt"] for r in rows], max_prompt_tokens)
    texts = [r["completion"][-1]["content"] for r in rows]
    completions = tok(texts, add_special_tokens=False).input_ids
    examples, n_cut = [], 0
    for p, c in zip(prompts, completions):
        c = list(c) + [tok.eos_token_id]
        room = max_len - len(p)
        n_cut += len(c) > room
        examples.append(Example(p, c[:room]))
    return examples, n_cut


def collate(examples: list[Example],
            pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask [B, L]: prompt + completion, right-padded; predicts [B, L]: True at the
    positions whose next token is a completion token (EOS included). All from lengths, never from
    the pad id: pad may be EOS, a completion token the model must learn."""
    L = max(len(e.prompt) + len(e.completion) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    predicts = torch.zeros_like(ids, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.prompt) + len(e.completion)
        ids[i, :n], attn[i, :n] = torch.tensor(e.prompt + e.completion, dtype=torch.long), 1
        predicts[i, len(e.prompt) - 1:n - 1] = True
    return ids, attn, predicts


# --- 2. The loss, Eq. 2: -sum_t log pi(y_t | x, y_<t) over the completion tokens only -------------

def completion_nll(model, ids: torch.Tensor, attn: torch.Tensor, predicts: torch.Tensor,
                   chunk: int = 1024) -> torch.Tensor:
    """Summed negative log-likelihood of the completion tokens (a scalar; the caller divides by the
    step's completion tokens). Only the positions that predict a completion token go through the
    output layer, `chunk` at a time and recomputed in backward (activation checkpointing), so no
    [tokens, V] logits are kept for backward: with a 150k vocabulary they would outweigh the
    model."""
    hidden = common.hidden_states(model, input_ids=ids, attention_mask=attn)  # [B, L, H]
    h, y = hidden[:, :-1][predicts[:, :-1]], ids[:, 1:][predicts[:, :-1]]  # [n, H], [n]
    head = model.get_output_embeddings()

    def nll(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="sum")
    return sum(checkpoint(nll, h[s:s + chunk], y[s:s + chunk], use_reentrant=False)
               for s in range(0, len(y), chunk))


def accumulate_gradients(model, batch: list[Example], micro_batch_size: int, pad_id: int,
                         amp: bool, n_comp: int | None = None) -> tuple[torch.Tensor, int, int]:
    """Backward over one optimizer step's batch, micro-batch by micro-batch.

    Every micro-batch's summed NLL is divided by `n_comp`, the completion tokens of the *whole* step
    (counted before the first backward; by default this batch's, with several processes all of
    theirs), so the accumulated gradient equals that of one big batch's token mean.
    Returns (summed NLL, completion tokens, all real tokens) of this batch.
    """
    device = next(model.parameters()).device
    n_comp = n_comp or sum(len(e.completion) for e in batch)  # the step's normaliser
    n_all = sum(len(e.prompt) + len(e.completion) for e in batch)
    # similar lengths: less padding
    batch = sorted(batch, key=lambda e: len(e.prompt) + len(e.completion))
    total = torch.zeros((), device=device)
    for s in range(0, len(batch), micro_batch_size):
        ids, attn, predicts = (t.to(device) for t in collate(batch[s:s + micro_batch_size], pad_id))
        with common.autocast(device, amp):
            nll = completion_nll(model, ids, attn, predicts)
        common.sync_grads(model, last=s + micro_batch_size >= len(batch))
        (nll / n_comp).backward()
        total += nll.detach()
    return total, sum(len(e.completion) for e in batch), n_all


# --- 3. Data order: a seeded shuffle per epoch; the position (epoch, pos) is all a resume needs ---

def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=g).tolist()


def next_batch(n_rows: int, batch_size: int, seed: int, epoch: int,
               pos: int) -> tuple[list[int], int, int]:
    """The next batch_size row indices from position (epoch, pos), and the position after them."""
    out: list[int] = []
    while len(out) < batch_size:
        take = epoch_order(n_rows, seed, epoch)[pos:pos + batch_size - len(out)]
        out += take
        pos += len(take)
        if pos == n_rows:
            epoch, pos = epoch + 1, 0
    return out, epoch, pos


# --- 4. Validation: loss on held-out demonstrations; greedy lists scored like 05_eval.py ----------

def generation_metrics(texts: list[str], rows: list[dict], catalog: common.Catalog, n: int) -> dict:
    """Recall@k / NDCG@k (filtered protocol, k = min(10, N)), in-catalog and valid-format rates of
    greedy lists (one per conversation, scored against each of its rows)."""
    k = min(10, n)
    s = common.summarize([common.score_completion(t, r, catalog, n, ks=(k,))
                          for t, r in zip(texts, rows)], rows)
    return {f"val_recall@{k}": s[f"recall@{k}_filtered"], f"val_ndcg@{k}": s[f"ndcg@{k}_filtered"],
            "val_in_catalog": s["in_catalog_rate"], "val_valid": s["valid_rate"]}


@torch.no_grad()
def validation_loss(model, examples: list[Example], batch_size: int, pad_id: int,
                    amp: bool) -> float:
    """Token-mean NLL of the validation completions (the same loss as training, no gradient)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n_tok = 0.0, 0
    for s in tqdm(range(0, len(examples), batch_size), desc="val loss", leave=False):
        ids, attn, predicts = (t.to(device) for t in collate(examples[s:s + batch_size], pad_id))
        with common.autocast(device, amp):
            total += completion_nll(model, ids, attn, predicts).item()
        n_tok += int(predicts.sum())
    model.train(was_training)
    return total / n_tok


def validate(model, tok, val: list[Example], gen_rows: list[dict], catalog, cfg: Config,
             amp: bool, max_new: int) -> dict:
    """The validation record: loss on held-out demonstrations and, with --eval-gen, greedy lists
    scored like 05_eval.py (one printed)."""
    record = {"val_loss": validation_loss(model, val, cfg.eval_batch_size, tok.pad_token_id, amp)}
    if gen_rows:
        device = next(model.parameters()).device
        with common.decode_autocast(device, amp):
            texts = common.generate(model, tok, [r["prompt"] for r in gen_rows], max_new,
                                    batch_size=cfg.eval_batch_size,
                                    max_prompt_tokens=cfg.max_prompt_tokens,
                                    progress="val generate")
        record.update(generation_metrics(texts, gen_rows, catalog, cfg.n_items))
        print(common.render_list(texts[0], gen_rows[0], catalog, cfg.n_items))
    return record


# --- 5. The run: data, model, then one optimizer step at a time -----------------------------------

def check_demonstration(row: dict, where: str) -> None:
    """An SFT row needs one assistant message of 'Title (Year)' lines (a DataError names where)."""
    comp = row.get("completion")
    if not isinstance(comp, list) or not comp or not isinstance(comp[-1].get("content"), str):
        raise common.DataError(f"{where}: 'completion' must be a list with one assistant message")
    bad = [x for x in common.split_lines(comp[-1]["content"].strip())
           if common.parse_line(x) is None]
    if bad:
        raise common.DataError(f"{where}: the completion must be one 'Title (Year)' per line, "
                               f"not {bad[0][:60]!r}")


def read_demonstrations(cfg: Config, data: Path) -> tuple[list[dict], list[dict]]:
    """The train and val rows of 02; the rows of one conversation differ only in their ground
    truth, which SFT does not use: each distinct (prompt, demonstration) is one training example."""
    hint = "run 02_build_sft.py first"
    train = common.read_rows(data / "sft_train.jsonl", hint, check_demonstration)
    val = common.read_rows(data / "sft_val.jsonl", hint, check_demonstration)
    train = list({common.prompt_key(r["prompt"] + r["completion"]): r for r in train}.values())
    return train[:cfg.limit] if cfg.limit else train, val


def encode_all(tok, train_rows: list[dict], val_rows: list[dict],
               cfg: Config) -> tuple[list[Example], list[Example]]:
    """The training and validation examples as token ids (the cut ones counted and printed)."""
    train, n_cut = encode_examples(tok, train_rows, cfg.max_prompt_tokens, cfg.max_len)
    val, _ = encode_examples(tok, val_rows[:cfg.val_limit], cfg.max_prompt_tokens, cfg.max_len)
    mean_len = sum(len(e.prompt) + len(e.completion) for e in train) / len(train)
    print(f"training sequences: {mean_len:.0f} tokens on average"
          + (f"; {n_cut} longer than --max-len {cfg.max_len}: their completions were cut (no EOS)"
             if n_cut else ""))
    print(f"{cfg.steps} steps x {cfg.batch_size} sequences = "
          f"{cfg.steps * cfg.batch_size / len(train):.2f} epochs of {len(train)} rows")
    return train, val


def train_step(model, optimizer, scheduler, batch: list[Example], n_comp: int, cfg: Config,
               pad_id: int, amp: bool, step: int) -> tuple[float, float, int]:
    """One optimizer step: accumulate over micro-batches, sum over processes, clip, step. Returns
    (summed NLL, gradient norm, real tokens), the first and last summed over processes."""
    device = next(model.parameters()).device
    nll, _, n_all = accumulate_gradients(model, batch, cfg.micro_batch_size, pad_id, amp, n_comp)
    common.all_reduce_grads(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
    if not (torch.isfinite(grad_norm) and torch.isfinite(nll)):  # never step into NaN weights
        raise common.DataError(f"step {step}: the loss ({nll.item()}) or gradient norm "
                               f"({grad_norm.item()}) is not finite; the model was not updated")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    nll, n_all = common.all_sum([nll.item(), n_all], device)
    return nll, grad_norm.item(), n_all


def make_optimizer(cfg: Config, model, out: Path):
    """AdamW, linear warm-up then cosine decay (paper: 5% warm-up), and the run's position: a fresh
    start, or with --resume what <out>/ckpt.pt holds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                  weight_decay=cfg.weight_decay)
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, int(cfg.warmup_frac * cfg.steps), cfg.steps)
    state = {"step": 0, "epoch": 0, "pos": 0, "elapsed": 0.0}
    if cfg.resume:
        state = common.load_checkpoint(out, model, optimizer, scheduler)
        print(f"resumed from {out}/ckpt.pt at step {state['step']} (epoch {state['epoch']}, "
              f"row {state['pos']})")
    return optimizer, scheduler, state


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, __doc__.split("\n")[0])
    data, out = Path(cfg.data_dir), Path(cfg.out)
    if cfg.max_prompt_tokens >= cfg.max_len:
        raise common.DataError(f"--max-prompt-tokens {cfg.max_prompt_tokens} leaves no room for a "
                               f"completion in --max-len {cfg.max_len}")
    # 1. The demonstrations (and the catalog, to score generated lists). Several processes
    # (torchrun): each takes every world-th sequence of a step; rank 0 logs and saves.
    train_rows, val_rows = read_demonstrations(cfg, data)
    catalog = common.Catalog.load(data / "catalog.jsonl") if cfg.eval_gen else None
    cfg.n_items = common.data_n(data, cfg.n_items)
    rank, world, device = common.setup_distributed(cfg.cpu)
    if cfg.batch_size % world:
        raise common.DataError(f"--batch-size {cfg.batch_size} is not divisible by {world} "
                               "processes")
    if rank == 0:
        print(f"read {len(train_rows)} distinct training examples and {len(val_rows)} validation "
              f"rows from {data}")

    # 2. Device, model, tokens. Weights stay fp32 (the master copy); bf16 only inside autocast.
    transformers.set_seed(cfg.seed)
    amp = cfg.bf16 and common.bf16_native(device)
    model, tok = common.load_model(cfg.model, device=device,
                                   trust_remote_code=cfg.trust_remote_code)
    if rank == 0:  # only now that everything it needs has loaded: a failure above writes nothing
        common.start_run(out, cfg, cfg.resume, TRAJECTORY, cfg.overwrite)
    common.barrier()
    print(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters | device {device} x {world} | weights fp32 | bf16 autocast {amp} | "
          f"gradient checkpointing {cfg.grad_checkpointing} | FSDP {cfg.fsdp}")
    if cfg.grad_checkpointing:
        common.enable_activation_checkpointing(model)
    if cfg.fsdp:
        common.shard(model)
    model.train()  # from_pretrained hands it over in eval mode
    train, val = encode_all(tok, train_rows, val_rows, cfg)
    gen_rows = common.first_conversations(val_rows, cfg.eval_gen) if cfg.eval_gen else []
    max_new = cfg.max_new_tokens or int(1.5 * max(len(e.completion) for e in train))

    # 3. Optimizer, schedule and where the run stands (step 0, or the checkpoint's).
    optimizer, scheduler, state = make_optimizer(cfg, model, out)

    # 4. Train: one optimizer step = accumulate over micro-batches, clip, step, zero_grad.
    try:
        start = time.time() - state["elapsed"]
        for step in range(state["step"] + 1, cfg.steps + 1):
            t0 = time.time()
            idx, state["epoch"], state["pos"] = next_batch(len(train), cfg.batch_size, cfg.seed,
                                                           state["epoch"], state["pos"])
            lr = scheduler.get_last_lr()[0]
            n_comp = sum(len(train[i].completion) for i in idx)  # every process knows all of it
            nll, grad_norm, n_all = train_step(model, optimizer, scheduler,
                                               [train[i] for i in idx[rank::world]], n_comp, cfg,
                                               tok.pad_token_id, amp, step)
            state["step"], state["elapsed"] = step, time.time() - start
            if rank == 0:
                record = {"loss": nll / n_comp, "lr": lr, "grad_norm": grad_norm,
                          "tok/s": n_all / (time.time() - t0),
                          "epoch": state["epoch"] + state["pos"] / len(train),
                          "elapsed": state["elapsed"]}
                common.log_step(out, step, cfg.steps, record, SHOW)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                with common.gathered(model):  # rank 0 validates, the others wait
                    if rank == 0:
                        record = validate(model, tok, val, gen_rows, catalog, cfg, amp, max_new)
                        common.log_step(out, step, cfg.steps, record, SHOW)
            if cfg.save_every and step % cfg.save_every == 0:
                state["elapsed"] = time.time() - start
                common.save_checkpoint(out, model, optimizer, scheduler, state)
            common.barrier()
    except KeyboardInterrupt:
        raise common.interrupted(out) from None  # one line: how to resume

    # 5. The final model, where 04_rank_grpo.py and 05_eval.py load it from.
    common.save_model(model, tok, out)
    if rank == 0:
        print(f"wrote {out}/ (model, tokenizer, run_config.json, log.jsonl"
              + (", ckpt.pt)" if (out / "ckpt.pt").exists() else ")"))


# The printed step line and its number formats (every number also goes to log.jsonl).
SHOW = {"loss": ".4f", "lr": ".2e", "grad_norm": ".3f", "tok/s": ".0f", "epoch": ".2f",
        "elapsed": ".0f", "val_loss": ".4f", "val_recall@10": ".3f", "val_ndcg@10": ".3f",
        "val_in_catalog": ".3f", "val_valid": ".3f"}


if __name__ == "__main__":
    common.run(main)
