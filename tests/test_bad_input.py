"""Bad input, bad flags and crashes: one clear line, exit 2, outputs untouched, never a NaN model.

Each case mutates a copy of a small, valid set of files, runs a stage the way the command line does
(common.run around main), and checks: exit status 2, one line on stderr naming the file (or, for a
bad flag, argparse's usage line and its error), nothing written or changed."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import common
from conftest import stage, TINY

catalog_stage, build, sft, rg, ev = (stage(n) for n in ("01_catalog", "02_build_sft", "03_sft",
                                                         "04_rank_grpo", "05_eval"))
STAGES = {"01": catalog_stage, "02": build, "03": sft, "04": rg, "05": ev}


@pytest.fixture(scope="module")
def world(demo_data, tmp_path_factory):
    """data/ (a demo world, N = 5, plus SFT rows) and runs/tiny (a saved tiny model)."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(demo_data, root / "data")
    for split in ("train", "val"):
        rows = common.read_rows(root / "data" / f"{split}.jsonl", "")[:6]
        for r in rows:
            r["completion"] = [{"role": "assistant",
                                "content": common.format_items(common.row_groundtruth(r))}]
        common.write_jsonl(root / "data" / f"sft_{split}.jsonl", rows)
    model, tok = common.load_model(TINY)
    common.save_model(model, tok, root / "runs" / "tiny")
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_stage(name, args, capsys):
    """(exit status, stderr) of a stage run as `python NN_stage.py args`."""
    with pytest.raises(SystemExit) as exit_info:
        common.run(lambda: STAGES[name].main(args))
        raise SystemExit(0)
    return exit_info.value.code, capsys.readouterr().err


def write(path: Path, text: str | bytes) -> None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def first_line_replaced(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    lines[0] = json.dumps(fn(json.loads(lines[0])))
    path.write_text("\n".join(lines) + "\n")


def gt_year(year):
    def fn(row):
        row["groundtruth_with_release_year"][0][1] = year
        return row
    return fn


# name, stage, arguments ({d}: the data dir, {r}: the root), mutation of the copy, text the message
# names
CASES = [
    # 01: imported data and flags
    ("01 empty split", "01", ["--from-dir", "{r}/released", "--data-dir", "{r}/out"],
     lambda r: write(r / "released" / "train.jsonl", ""),
     "train.jsonl: the train split has no rows"),
    ("01 row not an object", "01", ["--from-dir", "{r}/released", "--data-dir", "{r}/out"],
     lambda r: write(r / "released" / "val.jsonl", "[1, 2]\n"),
     "val.jsonl:1: expected a JSON object"),
    ("01 json list of non-objects", "01", ["--from-dir", "{r}/released2", "--data-dir", "{r}/out"],
     lambda r: write(r / "released2" / "test.json", "[1, 2]"),
     "test.json: row 0: expected a JSON object"),
    ("01 not utf-8", "01", ["--from-dir", "{r}/released", "--data-dir", "{r}/out"],
     lambda r: write(r / "released" / "test.jsonl", b'{"prompt": "\xff\xfe"}\n'),
     "test.jsonl:1: not UTF-8"),
    ("01 superscript year", "01", ["--from-dir", "{r}/released", "--data-dir", "{r}/out"],
     lambda r: first_line_replaced(r / "released" / "train.jsonl", gt_year("19\u00b295")),
     "train.jsonl:1: 'groundtruth_with_release_year'"),
    ("01 empty catalog pickle", "01", ["--from-dir", "{r}/released", "--catalog-pkl", "{r}/c.pkl",
                                       "--data-dir", "{r}/out"],
     lambda r: write(r / "c.pkl", pickle.dumps([])), "c.pkl: the catalog pickle holds no items"),
    ("01 damaged catalog pickle", "01", ["--from-dir", "{r}/released", "--catalog-pkl", "{r}/c.pkl",
                                         "--data-dir", "{r}/out"],
     lambda r: write(r / "c.pkl",
                     pickle.dumps([("Heat", 1995)])[:-7] + b"\x8e\xff\xff\xff\xff\xff\xff\xff"),
     "c.pkl: not a plain pickle"),
    ("01 code in the pickle", "01", ["--from-dir", "{r}/released", "--catalog-pkl", "{r}/c.pkl",
                                     "--data-dir", "{r}/out"],
     lambda r: write(r / "c.pkl", pickle.dumps([("Heat", Path("x"))])),
     "c.pkl: not a plain pickle"),
    ("01 data dir is a file", "01", ["--data-dir", "{r}/afile"], lambda r: write(r / "afile", "x"),
     "afile: exists and is not a directory"),
    ("01 repliers 0", "01", ["--data-dir", "{r}/out", "--repliers", "0"], None, "--repliers"),
    # 02: the data it reads
    ("02 catalog summary n not an int", "02", ["--data-dir", "{d}", "--teacher-model", TINY],
     lambda r: write(r / "data" / "catalog_summary.json", '{"n": "ten"}'),
     "'n' must be a positive integer"),
    ("02 empty catalog", "02", ["--data-dir", "{d}", "--teacher-model", TINY],
     lambda r: write(r / "data" / "catalog.jsonl", "\n"), "catalog.jsonl: the catalog is empty"),
    ("02 val row without prompt", "02", ["--data-dir", "{d}", "--teacher-model", TINY],
     lambda r: first_line_replaced(r / "data" / "val.jsonl",
                                   lambda row: {k: v for k, v in row.items() if k != "prompt"}),
     "val.jsonl:1: 'prompt' must be"),
    ("02 not an http url", "02", ["--data-dir", "{d}", "--teacher", "ftp://user:secret@host"], None,
     "--teacher: expected an http:// or https:// URL"),
    # 03: demonstrations, models, outputs
    ("03 completion not a list", "03", ["--data-dir", "{d}", "--model", TINY, "--out", "{r}/o"],
     lambda r: first_line_replaced(r / "data" / "sft_train.jsonl",
                                   lambda row: {**row, "completion": [
                                       {"role": "assistant", "content": "Sure! Here you go."}]}),
     "sft_train.jsonl:1: the completion must be one 'Title (Year)' per line"),
    ("03 empty completion", "03", ["--data-dir", "{d}", "--model", TINY, "--out", "{r}/o"],
     lambda r: first_line_replaced(r / "data" / "sft_val.jsonl",
                                   lambda row: {**row, "completion": [{"role": "assistant",
                                                                       "content": ""}]}),
     "sft_val.jsonl:1: the completion must be one"),
    ("03 broken config.json", "03",
     ["--data-dir", "{d}", "--model", "{r}/runs/tiny", "--out", "{r}/o"],
     lambda r: write(r / "runs" / "tiny" / "config.json", "{not json"),
     "runs/tiny: cannot load a model"),
    ("03 out is a file", "03", ["--data-dir", "{d}", "--model", TINY, "--out", "{r}/afile"],
     lambda r: write(r / "afile", "x"), "afile: exists and is not a directory"),
    ("03 catalog summary not json", "03",
     ["--data-dir", "{d}", "--model", TINY, "--out", "{r}/o"],
     lambda r: write(r / "data" / "catalog_summary.json", "{"),
     "catalog_summary.json:1: not valid JSON"),
    ("03 catalog summary without n", "03",
     ["--data-dir", "{d}", "--model", TINY, "--out", "{r}/o"],
     lambda r: write(r / "data" / "catalog_summary.json", "{}"),
     "catalog_summary.json: 'n' must be a positive"),
    ("03 catalog summary n = 0", "03", ["--data-dir", "{d}", "--model", TINY, "--out", "{r}/o"],
     lambda r: write(r / "data" / "catalog_summary.json", '{"n": 0}'),
     "'n' must be a positive integer"),
    ("03 empty catalog", "03", ["--data-dir", "{d}", "--model", TINY, "--out", "{r}/o"],
     lambda r: write(r / "data" / "catalog.jsonl", ""), "catalog.jsonl: the catalog is empty"),
    # 04
    ("04 broken config.json", "04",
     ["--data-dir", "{d}", "--model", "{r}/runs/tiny", "--out", "{r}/o"],
     lambda r: write(r / "runs" / "tiny" / "config.json", '{"model_type": "nothing"}'),
     "runs/tiny: cannot load a model"),
    ("04 catalog row without year", "04",
     ["--data-dir", "{d}", "--model", "{r}/runs/tiny", "--out", "{r}/o"],
     lambda r: first_line_replaced(r / "data" / "catalog.jsonl",
                                   lambda row: {"title": row["title"]}),
     "catalog.jsonl:1: a catalog row needs"),
    ("04 train not utf-8", "04",
     ["--data-dir", "{d}", "--model", "{r}/runs/tiny", "--out", "{r}/o"],
     lambda r: write(r / "data" / "train.jsonl",
                     (r / "data" / "train.jsonl").read_bytes() + b"\xc3\x28\n"),
     "train.jsonl:"),
    # 05
    ("05 out is a file", "05",
     ["--data-dir", "{d}", "--models", "popularity", "--out", "{r}/afile"],
     lambda r: write(r / "afile", "x"), "afile: exists and is not a directory"),
    ("05 missing model dir", "05", ["--data-dir", "{d}", "--models", "{r}/nothing/here"], None,
     "nothing/here: no such model directory"),
]


@pytest.mark.parametrize("name, script, args, mutate, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, script, args, mutate, message,
                                                          world, tmp_path, capsys):
    root = tmp_path / "w"
    shutil.copytree(world, root)
    for folder in ("released", "released2"):  # the demo world in the released layout (--from-dir)
        shutil.copytree(root / "data", root / folder,
                        ignore=shutil.ignore_patterns("sft_*", "catalog*"))
    os.remove(root / "released2" / "test.jsonl")
    if mutate:
        mutate(root)
    before = snapshot(root)
    code, err = run_stage(script, [a.format(d=root / "data", r=root) for a in args], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert snapshot(root) == before


BAD_FLAGS = [
    ("01", ["--conversations", "0"]), ("01", ["--val-frac", "1.5"]), ("01", ["--test-frac", "0"]),
    ("01", ["--n-items", "-1"]),
    ("02", ["--workers", "0"]), ("02", ["--retries", "-1"]), ("02", ["--timeout", "0"]),
    ("02", ["--train-frac", "0"]), ("02", ["--n-reflect", "0"]), ("02", ["--split", "test"]),
    ("02", ["--extra-demos", "-2"]),
    ("03", ["--steps", "0"]), ("03", ["--batch-size", "0"]), ("03", ["--micro-batch-size", "-2"]),
    ("03", ["--save-every", "-1"]), ("03", ["--warmup-frac", "1"]), ("03", ["--lr", "0"]),
    ("03", ["--steps", "ten"]),
    ("04", ["--group-size", "1"]), ("04", ["--prompts-per-step", "0"]), ("04", ["--algo", "ppo"]),
    ("04", ["--reward", "ndcg"]), ("04", ["--aggregation", "mean"]), ("04", ["--steps", "0"]),
    ("04", ["--save-every", "0"]), ("04", ["--micro-batch-size", "0"]),
    ("04", ["--temperature", "0"]),
    ("04", ["--adam-beta2", "1"]), ("04", ["--eps-low", "1"]), ("04", ["--lr", "nan"]),
    ("05", ["--split", "train"]), ("05", ["--limit", "-1"]), ("05", ["--batch-size", "0"]),
]


@pytest.mark.parametrize("script, args", BAD_FLAGS,
                         ids=[f"{s} {' '.join(a)}" for s, a in BAD_FLAGS])
def test_a_bad_flag_is_argparses_usage_and_error_before_any_work(script, args, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_stage(script, args, capsys)
    lines = err.strip().split("\n")
    assert (code == 2 and lines[0].startswith("usage: ")
            and f"error: argument {args[0]}" in lines[-1]), err
    assert not list(tmp_path.iterdir())  # nothing read, nothing written


# --- NaN: a diverged update stops with the step named, and no weights are written ----------------

def test_a_non_finite_rl_gradient_stops_the_run_and_writes_no_model(world, tmp_path, capsys,
                                                                    monkeypatch):
    real = rg.rank_grpo_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats
    monkeypatch.setattr(rg, "rank_grpo_loss", nan_loss)
    out = tmp_path / "rl"
    code, err = run_stage("04", ["--data-dir", str(world / "data"),
                                 "--model", str(world / "runs" / "tiny"), "--out", str(out),
                                 "--steps", "2", "--prompts-per-step", "1", "--group-size", "2",
                                 "--max-new-tokens", "8", "--val-every", "0", "--save-every", "1"],
                          capsys)
    assert (code == 2 and err.startswith("error: step 1: the gradient norm is nan")
            and err.count("\n") == 1)
    assert not (out / "model.safetensors").exists() and not (out / "ckpt.pt").exists()


def test_a_non_finite_sft_loss_stops_the_run_and_writes_no_model(world, tmp_path, capsys,
                                                                 monkeypatch):
    real = sft.completion_nll
    monkeypatch.setattr(sft, "completion_nll", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "sft"
    code, err = run_stage("03", ["--data-dir", str(world / "data"), "--model", TINY,
                                 "--out", str(out), "--steps", "2", "--batch-size", "2",
                                 "--eval-every", "0", "--save-every", "1"],
                          capsys)
    assert code == 2 and err.startswith("error: step 1: the loss (nan)") and err.count("\n") == 1
    assert not (out / "model.safetensors").exists() and not (out / "ckpt.pt").exists()


# --- checkpoints: one file renamed into place; a kill at any instant leaves a whole one ----------

def optimizer_and_schedule(model):
    optimizer = torch.optim.AdamW(model.parameters())
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def checkpoint_once(run_dir, model, step):
    with torch.no_grad():
        next(model.parameters())[0, 0] = float(step)  # the step, readable back from the weights
    common.save_checkpoint(run_dir, model, *optimizer_and_schedule(model), {"step": step})


KILL = """
import os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch, common, test_bad_input as t
model, _ = common.load_model(t.TINY)
t.checkpoint_once({run!r}, model, 1)
real_save, real_replace = torch.save, os.replace

def save(obj, f, *args, **kwargs):  # killed halfway through writing the new checkpoint
    if {point!r} == "writing":
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        os._exit(9)  # like SIGKILL: no cleanup, no finally
    real_save(obj, f, *args, **kwargs)

def replace(src, dst):
    if {point!r} == "renaming":
        os._exit(9)
    real_replace(src, dst)
    if {point!r} == "after":
        os._exit(9)

torch.save, common.os.replace = save, replace
t.checkpoint_once({run!r}, model, 2)
"""


@pytest.mark.parametrize("point, newest", [("writing", 1), ("renaming", 1), ("after", 2)])
def test_a_kill_while_a_checkpoint_is_written_keeps_a_whole_one(point, newest, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    script = KILL.format(root=str(ROOT), tests=str(ROOT / "tests"), run=str(tmp_path), point=point)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 9, res.stderr[-2000:]  # killed where the test meant it
    model, _ = common.load_model(TINY)
    state = common.load_checkpoint(tmp_path, model, *optimizer_and_schedule(model))
    assert state["step"] == newest and next(model.parameters())[0, 0].item() == newest
    checkpoint_once(tmp_path, model, 3)  # the next checkpoint replaces it, leftovers or not
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert common.load_checkpoint(tmp_path, model, *optimizer_and_schedule(model))["step"] == 3


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    model, _ = common.load_model(TINY)
    checkpoint_once(tmp_path, model, 1)
    state_file = tmp_path / "ckpt.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(common.DataError, match="damaged"):
        common.load_checkpoint(tmp_path, model, *optimizer_and_schedule(model))


# --- Ctrl-C: one line, exit status 130, and --resume continues --------------------------------

@pytest.mark.parametrize("stage_file", ["03_sft.py", "04_rank_grpo.py"])
def test_ctrl_c_prints_one_line_with_the_resume_command_and_resume_continues(stage_file, world,
                                                                             tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out = tmp_path / "run"
    model = TINY if stage_file == "03_sft.py" else str(world / "runs" / "tiny")
    args = [sys.executable, str(ROOT / stage_file), "--data-dir", str(world / "data"),
            "--model", model, "--out", str(out), "--save-every", "2"]
    steps = 150 if stage_file == "03_sft.py" else 40  # some seconds of tiny steps
    args += (["--steps", str(steps), "--batch-size", "2", "--eval-every", "0"]
             if stage_file == "03_sft.py" else
             ["--steps", str(steps), "--prompts-per-step", "1", "--group-size", "2",
              "--max-new-tokens", "8", "--val-every", "0", "--sample-every", "0"])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "ckpt.pt").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err, err[-2000:]
    step = torch.load(out / "ckpt.pt", weights_only=True)["state"]["step"]
    assert line.startswith(f"interrupted: the last checkpoint is {out}/ckpt.pt (step {step}); "
                           "continue with `python ")
    command = line.split("`")[1].split()[1:]  # without "python"
    assert 0 < step < steps and command[-1] == "--resume"
    res = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in common.read_jsonl(out / "log.jsonl")] == list(range(1, steps + 1))
