"""Several processes (torchrun, gloo on CPU): the same result as one process on the same data."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import common
from conftest import ROOT, stage, TINY

rg = stage("04_rank_grpo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sft_data(demo_data, tmp_path_factory):
    """The demo world plus SFT rows: each row's ground truth, padded to N lines from the catalog."""
    out = tmp_path_factory.mktemp("sftdata")
    for f in demo_data.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    catalog = common.read_jsonl(demo_data / "catalog.jsonl")
    for split in ("train", "val"):
        rows = common.read_rows(demo_data / f"{split}.jsonl", "")[:12]
        for r in rows:
            items = [(t, int(y)) for t, y in r["groundtruth_with_release_year"]]
            items += [(c["title"], c["year"]) for c in catalog[:5 - len(items)]]
            r["completion"] = [{"role": "assistant", "content": common.format_items(items)}]
        common.write_jsonl(out / f"sft_{split}.jsonl", rows)
    return out


def torchrun(script, *args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(d):
    return common.load_model(str(d))[0].state_dict()


@pytest.mark.parametrize("fsdp", [False, True])
def test_sft_two_processes_equal_one(fsdp, sft_data, tmp_path):
    """Two processes (with --fsdp: each holding half of the parameters, gradients and optimizer
    state) give one process's weights, up to float summation order: 1e-5 against updates of 1e-3
    a step (lr 1e-3, Adam) over 3 steps."""
    args = ["--model", TINY, "--data-dir", str(sft_data), "--steps", "3", "--batch-size", "4",
            "--micro-batch-size", "1", "--lr", "1e-3", "--eval-every", "3", "--save-every", "0",
            "--eval-gen", "1", "--val-limit", "2", "--cpu"]
    one = subprocess.run([sys.executable, str(ROOT / "03_sft.py"), *args,
                          "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("03_sft.py", *args, "--out", str(tmp_path / "two"), *(["--fsdp"] * fsdp))
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = common.load_model(TINY)[0].state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    log_one = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_two] == [1, 2, 3, 3]  # only rank 0 logs (and validates)
    assert [r.get("loss", r.get("val_loss")) for r in log_two] == pytest.approx(
        [r.get("loss", r.get("val_loss")) for r in log_one], rel=1e-5)
    assert "x 2" in two.stdout


def _learn(rank, world, port, ro_path, out_path, fsdp=False):
    """One process of the 04 equivalence test: one rl_step on its share of fixed rollouts, recording
    the step's normalisers and the all-reduced gradients that reach the optimizer."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    common.setup_distributed(cpu=True)
    # written by this test, not user input
    ro, catalog, cfg = torch.load(ro_path, weights_only=False)
    model, tok = common.load_model(TINY)
    ref, _ = common.load_model(TINY)
    per = len(ro.texts) // world
    share = rg.Rollouts(*(getattr(ro, f)[rank * per:(rank + 1) * per] for f in
                          ("prompt_ids", "completion_ids", "has_eos", "texts", "rows")))
    rg.sample_rollouts = lambda *args, **kwargs: share  # learn from these rollouts, sample nothing
    seen = {"normalisers": set(), "grads": []}
    loss_fn = rg.rank_grpo_loss

    def recording_loss(*args, **kwargs):
        seen["normalisers"].add((kwargs["n_units"], kwargs["n_tokens"]))
        return loss_fn(*args, **kwargs)
    rg.rank_grpo_loss = recording_loss
    if fsdp:
        common.shard(model)
    optimizer, _ = rg.make_optimizer(cfg, model)
    optimizer.register_step_pre_hook(lambda *_: seen["grads"].append(
        [(g.full_tensor() if hasattr(g, "full_tensor") else g.clone())
         for g in (p.grad for p in model.parameters())]))
    table = rg.newline_table(tok, model.get_output_embeddings().weight.shape[0])
    record, _, _ = rg.rl_step(cfg, model, ref, optimizer, tok, catalog, [], [], table)
    weights = common.full_state(model)  # on every process: gathering shards is a collective
    if rank == 0:
        torch.save({"weights": weights, "record": record, **seen}, out_path)
    common.barrier()


@pytest.mark.parametrize("algo, fsdp", [("rank_grpo", False), ("grpo", False), ("rank_grpo", True)])
def test_rank_grpo_two_processes_equal_one_on_the_same_rollouts(algo, fsdp, tmp_path):
    """Whole groups per process, normalisers of the whole step, gradients summed: the update of two
    processes on halves of a batch equals one process's update on all of it. Exact where it is
    exact (normalisers, the all-reduced gradients up to float summation order); the weights after
    two Adam steps within a small fraction of the update (Adam rescales rounding differences)."""
    model, tok = common.load_model(TINY)
    # fp32: bf16 rounding differs with the micro-batch shapes
    cfg = rg.resolve(rg.Config(group_size=3, max_new_tokens=20, micro_batch_size=2, lr=1e-3,
                               algo=algo, mu=2, bf16=False), 2)
    catalog = common.Catalog([{"title": "Heat", "year": 1995}, {"title": "Alien", "year": 1979}])
    rows = [{"id": f"c{i}#0", "seen_titles": [],
             "groundtruth_with_release_year": [["Heat", "1995"]]} for i in range(2)]
    torch.manual_seed(0)
    ro = rg.sample_rollouts(model, tok, [tok.encode("Heat (1995)\n"), tok.encode("Alien\n")],
                            rows, cfg)
    # some rewards to learn from
    ro.texts[0], ro.texts[4] = "Heat (1995)\nAlien (1979)", "x\nHeat (1995)"
    ro_path = tmp_path / "ro.pt"
    torch.save((ro, catalog, cfg), ro_path)
    mp.spawn(_learn, args=(1, free_port(), ro_path, tmp_path / "one.pt"), nprocs=1)
    mp.spawn(_learn, args=(2, free_port(), ro_path, tmp_path / "two.pt", fsdp), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["normalisers"] == two["normalisers"] and len(one["normalisers"]) == 1
    assert len(one["grads"]) == len(two["grads"]) == cfg.mu
    for g1, g2 in zip(one["grads"][0], two["grads"][0]):  # the first update: the same gradient
        assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-5 * g1.abs().max().item())
    start = common.load_model(TINY)[0].state_dict()
    assert any(not torch.equal(one["weights"][k], start[k]) for k in start)
    for k in start:
        update = (one["weights"][k] - start[k]).abs().max().item()
        assert (one["weights"][k] - two["weights"][k]).abs().max().item() <= 0.02 * update + 1e-9, k
    for key in ("reward", "kl", "ratio", "grad_norm", "clip_low", "clip_high", "len"):
        assert two["record"][key] == pytest.approx(one["record"][key], rel=1e-4, abs=1e-8), key


def test_rank_grpo_under_torchrun_logs_once_and_resumes(demo_data, tmp_path):
    model, tok = common.load_model(TINY)
    common.save_model(model, tok, tmp_path / "sft")
    args = ["--data-dir", str(demo_data), "--model", str(tmp_path / "sft"),
            "--out", str(tmp_path / "rl"), "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "12", "--val-every", "0", "--save-every", "1", "--n-items", "1",
            "--cpu"]
    torchrun("04_rank_grpo.py", *args, "--steps", "2")
    torchrun("04_rank_grpo.py", *args, "--steps", "3", "--resume")
    steps = [json.loads(x)["step"]
             for x in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (tmp_path / "rl" / "model.safetensors").exists()
    # samples are seeded per step and process, so one process may continue a run of two
    res = subprocess.run([sys.executable, str(ROOT / "04_rank_grpo.py"), *args, "--steps", "4",
                          "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    steps = [json.loads(x)["step"]
             for x in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_run_refused_on_rank_0_ends_every_process_within_seconds(demo_data, tmp_path):
    """Rank 0 refuses to replace an earlier run while rank 1 waits for it at a barrier: torchrun
    stops rank 1 at once, long before the process group's timeout (2 hours)."""
    model, tok = common.load_model(TINY)
    common.save_model(model, tok, tmp_path / "sft")
    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "log.jsonl").write_text('{"step": 1}\n')
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "04_rank_grpo.py"), "--data-dir", str(demo_data), "--model",
           str(tmp_path / "sft"), "--out", str(tmp_path / "rl"), "--prompts-per-step", "2",
           "--cpu"]
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode != 0 and time.time() - start < 120
    assert "error: " in res.stderr and "holds an earlier run (log.jsonl)" in res.stderr


def test_fsdp_rank_grpo_resumes_after_a_kill_and_saves_a_plain_hf_directory(demo_data, tmp_path):
    """--fsdp under torchrun: killed after a checkpoint, resumed to the end; the run directory is a
    save_pretrained directory any HF tool loads, holding the gathered weights of the checkpoint."""
    import signal
    from transformers import AutoModelForCausalLM
    model, tok = common.load_model(TINY)
    common.save_model(model, tok, tmp_path / "sft")
    args = ["--data-dir", str(demo_data), "--model", str(tmp_path / "sft"),
            "--out", str(tmp_path / "rl"), "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "12", "--val-every", "3", "--val-limit", "2", "--save-every", "2",
            "--n-items", "1", "--cpu", "--fsdp", "--steps", "6"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "04_rank_grpo.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "rl" / "ckpt.pt").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    proc.wait()
    killed_at = torch.load(tmp_path / "rl" / "ckpt.pt", weights_only=True)["state"]["step"]
    assert killed_at in (2, 4)
    torchrun("04_rank_grpo.py", *args, "--resume")
    log = [json.loads(x) for x in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "reward" in r] == [1, 2, 3, 4, 5, 6]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "rl").state_dict()
    ckpt = torch.load(tmp_path / "rl" / "ckpt.pt", weights_only=True)
    assert ckpt["state"]["step"] == 6
    assert all(torch.equal(saved[k], ckpt["model"][k]) for k in saved)
    assert not all(torch.equal(saved[k], model.state_dict()[k]) for k in saved)  # it trained
