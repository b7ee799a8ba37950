"""03_sft.py: completion-only loss, token-normalised accumulation, exact resume, smoke run."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import ROOT, stage, TINY
from tiny import build_model

sft = stage("03_sft")

MOVIES = [("Heat", 1995), ("Alien", 1979), ("The Matrix", 1999), ("Toy Story", 1995),
          ("Jaws", 1975), ("The Godfather", 1972), ("Pulp Fiction", 1994), ("Spirited Away", 2001),
          ("The Shining", 1980), ("Casablanca", 1942), ("Titanic", 1997), ("Gravity", 2013),
          ("Inception", 2010), ("Rocky", 1976)]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine two threads
    fighting other processes made each step ~50x slower (measured: 2 s instead of 0.04 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fresh_model(tok):
    """A new tiny model with the same initial weights each time (the session's `tiny` is shared)."""
    return build_model(len(tok), seed=0)


def examples(tok, specs):
    """Hand-made examples: (prompt text, completion items) -> Example with EOS appended."""
    out = []
    for text, items in specs:
        prompt = tok.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        out.append(sft.Example(prompt, tok.encode(common.format_items(items)) + [tok.eos_token_id]))
    return out


def sft_data(dir_, n_rows, n=5, short=True):
    """A data directory with a catalog, catalog_summary.json and SFT rows of short conversations
    whose completions are n movies each (what 02_build_sft.py writes, in miniature)."""
    dir_.mkdir(parents=True, exist_ok=True)
    common.write_jsonl(dir_ / "catalog.jsonl",
                       [{"title": t, "year": y, "count": 1} for t, y in MOVIES])
    common.write_json(dir_ / "catalog_summary.json", {"n": n})
    for split, count in (("train", n_rows), ("val", 2)):
        rows = []
        for i in range(count):
            j = i + (100 if split == "val" else 0)
            items = [MOVIES[(j * 3 + k) % len(MOVIES)] for k in range(n)]
            seen = MOVIES[j % len(MOVIES)][0]
            rows.append({"id": f"{split}{i}#0",
                         "prompt": [{"role": "user", "content": f"Movies like {seen}?"}],
                         "seen_titles": [seen],
                         "groundtruth_with_release_year": [[items[0][0], str(items[0][1])]],
                         "completion": [{"role": "assistant",
                                         "content": common.format_items(items)}]})
        common.write_jsonl(dir_ / f"sft_{split}.jsonl", rows)
    return dir_


# --- tokens ---------------------------------------------------------------------------------------

def test_examples_are_the_chat_template_continuation_ending_in_eos(tiny):
    _, tok = tiny
    row = {"prompt": [{"role": "user", "content": "Movies like Heat?"}],
           "completion": [{"role": "assistant", "content": "Alien (1979)\nJaws (1975)"}]}
    (ex,), n_cut = sft.encode_examples(tok, [row], max_prompt_tokens=500, max_len=1000)
    full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    # the template closes the assistant turn with EOS and a newline; the model stops at EOS
    assert ex.prompt + ex.completion == full[:-1] and ex.completion[-1] == tok.eos_token_id
    assert tok.decode(ex.prompt).endswith("<|im_start|>assistant\n") and n_cut == 0


def test_long_sequences_lose_the_end_of_the_completion_not_the_prompt(tiny):
    _, tok = tiny
    row = {"prompt": [{"role": "user", "content": "Movies like Heat?"}],
           "completion": [{"role": "assistant", "content": common.format_items(MOVIES)}]}
    (whole,), _ = sft.encode_examples(tok, [row], 500, 1000)
    (cut,), n_cut = sft.encode_examples(tok, [row], 500, len(whole.prompt) + 7)
    assert n_cut == 1 and cut.prompt == whole.prompt and cut.completion == whole.completion[:7]


def test_collate_pads_right_and_marks_the_positions_that_predict_completion_tokens():
    pad = 2  # pad == EOS, as in SmolLM2: the EOS of a completion must stay a target
    exs = [sft.Example([5, 6, 7], [8, 2]), sft.Example([9], [10, 11, 2])]
    ids, attn, predicts = sft.collate(exs, pad)
    assert ids.tolist() == [[5, 6, 7, 8, 2], [9, 10, 11, 2, 2]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert predicts.int().tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]


# --- the loss (Eq. 2) -----------------------------------------------------------------------------

SPECS = [("Movies like Heat?", MOVIES[1:4]),
         ("I loved The Matrix and Alien, more sci-fi please", MOVIES[11:13]),
         ("Jaws", MOVIES[5:9]),
         ("Something like Casablanca or Titanic for a quiet evening?", MOVIES[:1])]


def test_loss_is_the_completion_nll_of_each_sequence_alone(tiny):
    _, tok = tiny
    model, exs = fresh_model(tok), examples(tok, SPECS)
    with torch.no_grad():
        got = sft.completion_nll(model, *sft.collate(exs, tok.pad_token_id), chunk=5)
        want = 0.0
        for e in exs:  # plain forward pass, no padding, completion positions only
            logp = torch.log_softmax(model(torch.tensor([e.prompt + e.completion])).logits[0], -1)
            pos = torch.arange(len(e.prompt) - 1, len(e.prompt) + len(e.completion) - 1)
            want -= logp[pos, torch.tensor(e.completion)].sum()
    assert torch.allclose(got, want, rtol=1e-5)


def test_prompt_and_padding_positions_carry_no_loss(tiny):
    """The gradient reaches the final hidden state only at positions whose next token is a
    completion token (EOS included): no prompt position and no padding position is ever a target."""
    _, tok = tiny
    model, exs = fresh_model(tok), examples(tok, SPECS)
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["h"] = output

    handle = model.model.norm.register_forward_hook(keep)
    sft.completion_nll(model, *sft.collate(exs, tok.pad_token_id), chunk=7).backward()
    handle.remove()
    has_grad = captured["h"].grad.abs().sum(-1) > 0  # [B, L]: right-padded sequences
    for i, e in enumerate(exs):
        want = torch.zeros(has_grad.shape[1], dtype=torch.bool)
        want[len(e.prompt) - 1:len(e.prompt) + len(e.completion) - 1] = True
        assert torch.equal(has_grad[i], want)


def test_padding_ids_change_nothing_completion_ids_change_the_loss(tiny):
    _, tok = tiny
    model, exs = fresh_model(tok), examples(tok, SPECS)
    ids, attn, predicts = sft.collate(exs, tok.pad_token_id)

    def loss(ids):
        with torch.no_grad():
            return sft.completion_nll(model, ids, attn, predicts)

    base = loss(ids)
    assert torch.allclose(loss(ids.masked_fill(attn == 0, 37)), base, rtol=1e-6)  # any pad id
    other = ids.clone()
    first = len(exs[0].prompt)  # the first completion token
    other[0, first] = 37 if other[0, first] != 37 else 38
    assert not torch.allclose(loss(other), base)


def test_accumulated_micro_batches_equal_one_big_batch(tiny):
    _, tok = tiny
    # 8, unequal lengths
    exs = examples(tok, SPECS + [(p[::-1], items[::-1]) for p, items in SPECS])
    grads = {}
    for mbs in (8, 2):
        model = fresh_model(tok)
        nll, n_comp, _ = sft.accumulate_gradients(model, exs, mbs, tok.pad_token_id, amp=False)
        grads[mbs] = [p.grad.clone() for p in model.parameters()]
        assert n_comp == sum(len(e.completion) for e in exs)
    for a, b in zip(grads[8], grads[2]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # the test can fail: a mean of per-micro-batch token means weights short micro-batches up
    model = fresh_model(tok)
    ordered = sorted(exs, key=lambda e: len(e.prompt) + len(e.completion))
    for s in range(0, 8, 2):
        ids, attn, predicts = sft.collate(ordered[s:s + 2], tok.pad_token_id)
        (sft.completion_nll(model, ids, attn, predicts) / predicts.sum() / 4).backward()
    wrong = [p.grad for p in model.parameters()]
    assert not all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads[8], wrong))


def test_gradient_checkpointing_gives_the_same_gradient(tiny):
    _, tok = tiny
    exs = examples(tok, SPECS)
    grads = []
    for ckpt in (False, True):
        model = fresh_model(tok)
        if ckpt:
            common.enable_activation_checkpointing(model)
        model.train()
        sft.accumulate_gradients(model, exs, 2, tok.pad_token_id, amp=False)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# --- data order -----------------------------------------------------------------------------------

def test_batches_cover_every_row_once_per_epoch_and_span_epochs():
    seen, epoch, pos = [], 0, 0
    for _ in range(5):  # 5 batches of 4 over 10 rows: 2 epochs exactly
        idx, epoch, pos = sft.next_batch(10, 4, 7, epoch, pos)
        seen += idx
    assert (epoch, pos) == (2, 0)
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # reshuffled
    assert sft.next_batch(10, 4, 7, 0, 8)[0] == seen[8:12]  # a batch that spans two epochs
    assert sft.next_batch(10, 10, 8, 0, 0)[0] != seen[:10]  # another seed, another order


# --- runs -----------------------------------------------------------------------------------------

def run_args(data, out, *extra):
    return ["--model", TINY, "--data-dir", str(data), "--out", str(out), "--eval-gen", "0",
            *extra]


def test_resume_after_a_crash_gives_the_same_weights_and_log(tmp_path, monkeypatch):
    data = sft_data(tmp_path / "data", n_rows=5)
    # 4 steps of 3 rows over 5 rows: step 2 crosses an epoch boundary, the checkpoint is at step 2
    args = ["--steps", "4", "--batch-size", "3", "--micro-batch-size", "2", "--lr", "1e-3",
            "--save-every", "2", "--eval-every", "2", "--val-limit", "2"]
    sft.main(run_args(data, tmp_path / "straight", *args))

    calls = {"n": 0}
    real = sft.accumulate_gradients

    def crash_in_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(sft, "accumulate_gradients", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft.main(run_args(data, tmp_path / "crashed", *args))
    monkeypatch.setattr(sft, "accumulate_gradients", real)
    assert ([r["step"] for r in common.read_jsonl(tmp_path / "crashed" / "log.jsonl")]
            == [1, 2, 2, 3])
    at_step_2 = torch.load(tmp_path / "crashed" / "ckpt.pt", weights_only=True)["model"]
    sft.main(run_args(data, tmp_path / "crashed", *args, "--resume"))

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "crashed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], at_step_2[k]) for k in a if k in at_step_2)  # steps 3-4 did move the weights
    log_a = common.read_jsonl(tmp_path / "straight" / "log.jsonl")
    log_b = common.read_jsonl(tmp_path / "crashed" / "log.jsonl")
    assert [r["step"] for r in log_b] == [1, 2, 2, 3, 4, 4]
    for ra, rb in zip(log_a, log_b):
        assert {k: v for k, v in ra.items() if k not in ("time", "elapsed", "tok/s")} == \
               {k: v for k, v in rb.items() if k not in ("time", "elapsed", "tok/s")}


def test_resume_refuses_other_settings_and_stale_checkpoints(tmp_path):
    data = sft_data(tmp_path / "data", n_rows=4)
    sft.main(run_args(data, tmp_path / "run", "--steps", "1", "--batch-size", "2",
                      "--save-every", "1", "--eval-every", "0"))
    with pytest.raises(common.DataError, match="--lr"):
        sft.main(run_args(data, tmp_path / "run", "--steps", "1", "--batch-size", "2",
                          "--lr", "1e-3", "--resume"))
    # a finished run is never replaced silently
    with pytest.raises(common.DataError, match="holds an earlier run"):
        sft.main(run_args(data, tmp_path / "run", "--steps", "1", "--batch-size", "2",
                          "--eval-every", "0"))
    # a fresh run in the same directory drops the old run's checkpoint, so --resume cannot mix them
    sft.main(run_args(data, tmp_path / "run", "--steps", "1", "--batch-size", "2",
                      "--save-every", "0", "--eval-every", "0", "--overwrite"))
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    with pytest.raises(common.DataError, match="no checkpoint to resume from"):
        sft.main(run_args(data, tmp_path / "run", "--steps", "1", "--batch-size", "2",
                          "--save-every", "0", "--eval-every", "0", "--resume"))


def test_smoke_loss_falls_model_reloads_and_generates(tmp_path, capsys):
    data = sft_data(tmp_path / "data", n_rows=4)
    out = tmp_path / "run"
    sft.main(["--model", TINY, "--data-dir", str(data), "--out", str(out), "--steps", "100",
              "--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e-2", "--eval-every", "100",
              "--eval-gen", "2", "--val-limit", "2", "--save-every", "0"])
    log = common.read_jsonl(out / "log.jsonl")
    train = [r for r in log if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 101))
    assert set(train[0]) == set(train[-1]) >= {"loss", "lr", "grad_norm", "tok/s", "elapsed"}
    assert train[-1]["loss"] < 0.05 * train[0]["loss"]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [100]
    assert set(evals[0]) >= {"val_loss", "val_recall@5", "val_ndcg@5", "val_in_catalog",
                             "val_valid"}
    assert json.loads((out / "run_config.json").read_text())["steps"] == 100
    assert not (out / "ckpt.pt").exists()
    printed = capsys.readouterr().out
    assert "step 100/100 | loss" in printed and "sample val0#0" in printed

    model, tok = common.load_model(str(out))
    rows = common.read_rows(data / "sft_train.jsonl", "", sft.check_demonstration)
    texts = common.generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=60)
    assert sum(t == r["completion"][0]["content"] for t, r in zip(texts, rows)) >= 3  # memorised


def test_missing_input_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "03_sft.py"),
                          "--data-dir", str(tmp_path / "none"), "--model", TINY],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert "sft_train.jsonl not found: run 02_build_sft.py first" in res.stderr
    assert not (tmp_path / "runs").exists()
