"""01_catalog.py: the demo world, the released-format importer, the restricted unpickler."""

import json
import os
import pickle
import subprocess
import sys

import pytest

import common
from conftest import ROOT, stage

cat01 = stage("01_catalog")


def read_all(d):
    return {f.name: f.read_text() for f in sorted(d.iterdir())}


def test_demo_world_is_deterministic_for_a_seed(tmp_path):
    args = ["--conversations", "40", "--n-items", "5"]
    cat01.main(["--data-dir", str(tmp_path / "a"), *args])
    cat01.main(["--data-dir", str(tmp_path / "b"), *args])
    cat01.main(["--data-dir", str(tmp_path / "c"), "--seed", "1", *args])
    assert read_all(tmp_path / "a") == read_all(tmp_path / "b")
    assert read_all(tmp_path / "a")["train.jsonl"] != read_all(tmp_path / "c")["train.jsonl"]


def test_demo_world_rows_are_valid_and_consistent(demo_data):
    catalog = common.Catalog.load(demo_data / "catalog.jsonl")
    assert len(catalog) > 400
    ids = {}
    for split in ("train", "val", "test"):
        rows = common.read_rows(demo_data / f"{split}.jsonl", "")
        ids[split] = {common.conversation_id(r) for r in rows}
        for r in rows:
            text = r["prompt"][0]["content"]
            assert "Recommend 5 movies" in text
            for t in r["seen_titles"]:  # every seen title is mentioned in the conversation
                assert t.lower() in text.lower()
            for title, year in common.row_groundtruth(r):  # ground truth: in catalog, never seen
                assert catalog.find(title, year) is not None
                assert title not in r["seen_titles"]
    # time-ordered split: no conversation in two splits, test is the newest
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert max(ids["train"]) < min(ids["val"]) <= max(ids["val"]) < min(ids["test"])


def test_demo_world_wording_varies(demo_data):
    rows = common.read_rows(demo_data / "train.jsonl", "")
    firsts = {r["prompt"][0]["content"].split("\n\n")[1].split("\n")[0] for r in rows}
    assert len(firsts) > 0.8 * len({common.conversation_id(r) for r in rows})


def test_yardsticks_oracle_beats_popularity(demo_data):
    summary = json.loads((demo_data / "catalog_summary.json").read_text())
    y = summary["test_yardsticks"]
    assert y["oracle"]["ndcg@5_filtered"] > y["popularity"]["ndcg@5_filtered"]


def test_catalog_counts_are_train_ground_truth(demo_data):
    rows = common.read_rows(demo_data / "train.jsonl", "")
    catalog = common.read_jsonl(demo_data / "catalog.jsonl")
    assert (sum(c["count"] for c in catalog)
            == sum(len(r["groundtruth_with_release_year"]) for r in rows))


# --- the released format --------------------------------------------------------------------------

def released_row(conv, gt, seen=("Heat",)):
    return {"prompt": [{"role": "user", "content": f"conversation {conv}"}],
            "seen_titles": list(seen), "groundtruth_with_release_year": [[t, y] for t, y in gt]}


@pytest.fixture
def released(tmp_path):
    src = tmp_path / "reddit_v2"
    src.mkdir()
    train = [released_row(1, [("Alien", "1979")]), released_row(1, [("Ronin", "1998")]),
             released_row(2, [("Alien", "1979"), ("Heat", "1995")])]
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (src / "validation.json").write_text(json.dumps([released_row(3, [("Dune", "2021")])]))
    (src / "test.jsonl").write_text(json.dumps(released_row(4, [("Gravity", "2013")])) + "\n")
    return src


def test_import_released_format(released, tmp_path):
    out = tmp_path / "data"
    cat01.main(["--data-dir", str(out), "--from-dir", str(released)])
    train = common.read_rows(out / "train.jsonl", "")
    # years stay str
    assert [r["groundtruth_with_release_year"] for r in train][0] == [["Alien", "1979"]]
    a, b, c = (r["id"] for r in train)
    assert a.split("#")[0] == b.split("#")[0] != c.split("#")[0]  # same prompt -> same conversation
    assert a.endswith("#0") and b.endswith("#1")
    assert len(common.read_rows(out / "val.jsonl", "")) == 1
    catalog = {(c["title"], c["year"]): c["count"]
               for c in common.read_jsonl(out / "catalog.jsonl")}
    assert catalog == {("Alien", 1979): 2, ("Ronin", 1998): 1, ("Heat", 1995): 1, ("Dune", 2021): 0,
                       ("Gravity", 2013): 0}
    assert common.data_n(out) == 20  # the released prompts ask for the paper's N


def test_demo_world_default_n_is_cpu_sized(tmp_path):
    cat01.main(["--data-dir", str(tmp_path), "--conversations", "10"])
    assert common.data_n(tmp_path) == 10 and common.data_n(tmp_path, 7) == 7


def test_import_with_catalog_pickle(released, tmp_path):
    pkl = tmp_path / "catalog.pkl"
    pkl.write_bytes(pickle.dumps([("Alien", 1979), ("Ronin", 1998), ("Brazil", 1985)]))
    out = tmp_path / "data"
    cat01.main(["--data-dir", str(out), "--from-dir", str(released), "--catalog-pkl", str(pkl)])
    titles = [c["title"] for c in common.read_jsonl(out / "catalog.jsonl")]
    assert titles == ["Alien", "Ronin", "Brazil"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/convrec_pwned",))


@pytest.mark.parametrize("payload", [
    pickle.dumps(Exploit()),
    pickle.dumps([("Alien", 1979), Exploit()]),
])
def test_restricted_unpickler_refuses_code(tmp_path, payload):
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(payload)
    with pytest.raises(common.DataError, match="refusing (opcode|to load)"):
        cat01.load_catalog_pickle(pkl)
    assert not os.path.exists("/tmp/convrec_pwned")


@pytest.mark.parametrize("obj", [{"Alien": 1979}, [("Alien", "1979")], [("Alien", 1979.0)],
                                 [("Alien",)], [("Alien", True)]])
def test_restricted_unpickler_refuses_other_shapes(tmp_path, obj):
    pkl = tmp_path / "c.pkl"
    pkl.write_bytes(pickle.dumps(obj))
    with pytest.raises(common.DataError):
        cat01.load_catalog_pickle(pkl)


def run01(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "01_catalog.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


def test_bad_input_one_line_exit_2_nothing_written(released, tmp_path):
    with open(released / "train.jsonl", "a") as f:
        f.write('{"prompt": [{"role": "user", "content": "x"}], "seen_titles": "Heat", '
                '"groundtruth_with_release_year": []}\n')
    res = run01("--from-dir", str(released), "--data-dir", "data", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().split("\n")
    assert len(lines) == 1 and "train.jsonl:4" in lines[0] and "seen_titles" in lines[0]
    assert not (tmp_path / "data").exists()


def test_missing_dir_is_a_clear_error(tmp_path):
    res = run01("--from-dir", "nowhere", cwd=tmp_path)
    assert res.returncode == 2 and "nowhere not found" in res.stderr
