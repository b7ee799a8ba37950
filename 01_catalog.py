"""Stage 01: the catalog and the conversations, in the released Reddit-v2 row format.

Paper: section 1 (task, catalog, data) and 3 (metrics). Two ways to get data:

  python 01_catalog.py                               # the demo world (default, offline, ~5 s)
  python 01_catalog.py --from-dir path/to/reddit_v2 --catalog-pkl catalog.pkl   # real data

Writes data/catalog.jsonl, data/{train,val,test}.jsonl and data/catalog_summary.json.

The demo world is a small, seeded, procedurally generated benchmark made so that the whole
pipeline runs on a CPU and learning is visible: real movies (title, year, genres and a fame score,
in demo_movies.tsv next to this file), users whose taste is one or two genres and sometimes a
decade, conversations in varied forum wording that mention a few movies they have seen, and ground
truth drawn from the taste with a popularity skew, several rows ("repliers") per conversation,
split in time order like Reddit-v2. Because the world is known, so is the best policy: rank the
requested genres by popularity. Its Recall/NDCG on test is printed as a ceiling, next to a
popularity baseline as a floor.

Deviations from the paper:
  1. The demo world replaces Reddit-v2 (not downloadable here). Its catalog rows also carry
     'genres', which 02_build_sft.py embeds as item metadata, as the paper embeds LLM-written
     metadata. Real data drops in through --from-dir with the released field names.
  2. The released data has no row ids; the importer makes them from a hash of the prompt, so rows
     of one conversation share the part before '#', which is how metrics cluster standard errors.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import common
from common import arg


@dataclass
class Config:
    data_dir: str = arg("data", "where catalog.jsonl and {train,val,test}.jsonl are written")
    seed: int = arg(0, "seed of the demo world (same seed, same files)")
    conversations: int = arg(2000, "demo conversations; split in time order into "
                             "train/val/test", within="[10, inf)")
    val_frac: float = arg(0.1, "fraction of conversations (the latest but test) for validation",
                          within="(0, 0.5)")
    test_frac: float = arg(0.1, "fraction of conversations (the latest) for test",
                           within="(0, 0.5)")
    repliers: list = arg([2, 3, 3, 4], "rows per demo conversation: one drawn from this list per "
                         "conversation")
    groundtruth_per_row: list = arg([1, 2, 2, 3], "ground-truth items of a demo row: one drawn "
                                    "from this list")
    n_items: int = arg(0, "N, the list length asked for in the prompt; 0: 10 for the CPU-sized "
                       "demo world, 20 (the paper's) for imported data. Later stages read it from "
                       "catalog_summary.json", within="[0, inf)")
    from_dir: str = arg("", "import released-format data from this directory instead of the demo")
    catalog_pkl: str = arg("", "with --from-dir: catalog as a pickled list of (title, year) tuples")


# --- The demo world -------------------------------------------------------------------------------

DEMO_N = 10  # the demo's list length: half the paper's N = 20, so sampling and training fit a CPU

# How people name a genre in a post ("looking for some ___").
GENRE_PHRASES = {
    "action": ["action movies", "action flicks", "action films", "explosive action",
               "big action movies"],
    "adventure": ["adventure movies", "adventure films", "epic adventures",
                  "swashbuckling adventures"],
    "animation": ["animated movies", "animated films", "cartoons", "animation"],
    "comedy": ["comedies", "funny movies", "something funny", "laugh-out-loud comedies",
               "feel-good comedies"],
    "crime": ["crime movies", "crime films", "gangster movies", "heist and crime stories",
              "mob movies"],
    "drama": ["dramas", "serious dramas", "emotional dramas", "character-driven dramas",
              "tearjerkers"],
    "fantasy": ["fantasy movies", "fantasy films", "magical fantasy", "sword and sorcery stuff"],
    "horror": ["horror movies", "scary movies", "horror films", "something terrifying",
               "creepy films"],
    "romance": ["romantic movies", "romances", "love stories", "romantic films",
                "date-night romance"],
    "sci-fi": ["sci-fi", "science fiction", "sci-fi movies", "space movies",
               "science fiction films"],
    "thriller": ["thrillers", "suspense movies", "edge-of-your-seat thrillers",
                 "tense thrillers"],
    "war": ["war movies", "war films", "military dramas", "movies about soldiers"],
    "western": ["westerns", "cowboy movies", "western films", "frontier stories"],
    "musical": ["musicals", "movie musicals", "films with great songs", "song-and-dance movies"],
}
# (name, first year, last year, phrases)
DECADES = [
    ("classic", 1900, 1969, ["from before 1970", "old Hollywood classics", "from the golden age"]),
    ("70s", 1970, 1979, ["from the 70s", "from the seventies", "made in the 1970s"]),
    ("80s", 1980, 1989, ["from the 80s", "from the eighties", "made in the 1980s"]),
    ("90s", 1990, 1999, ["from the 90s", "from the nineties", "made in the 1990s"]),
    ("2000s", 2000, 2009, ["from the 2000s", "from the noughties", "made between 2000 and 2009"]),
    ("recent", 2010, 2100,
     ["that are recent (2010 or later)", "from the last decade or so", "newer"]),
]
POST_TITLES = [
    "Looking for {G}", "{G} recommendations?", "Need {G} recs", "Movies like {S}?",
    "What to watch after {S}?", "Help me find {G} for the weekend", "Best {G} you have seen?",
    "Suggest me some {G}", "{G} night, ideas?", "Something in the vein of {S}", "Recs please: {G}",
    "Movie night, need {G}",
]
TASTE = [
    "I've been on a {G} kick lately.", "Lately I can't get enough of {G}.",
    "I'm a huge fan of {G}.", "My partner and I want {G} for tonight.", "I'd like to get into {G}.",
    "Can anyone recommend {G}?",
    "Nothing hits like {G} for me.", "In the mood for {G}.", "I mostly watch {G}.",
    "Give me your favourite {G}.", "Trying to find more {G} to watch.", "I really love {G}.",
]
# What they have seen: {L} is the list of every seen movie, so any template fits any number of
# them.
SEEN = [
    "I just watched {L} and loved it.", "Favourites so far: {L}.",
    "I've already seen {L}, so skip those.",
    "Big fan of {L}.", "Rewatched {L} recently and now I want more like that.",
    "Loved {L}.", "Stuff like {L} is exactly my thing.", "Already watched {L}.",
    "{L}: amazing, I need something with that feel.", "For reference, I enjoyed {L}.",
]
DECADE_SENT = ["Preferably {D}.", "Bonus points if it's {D}.", "I'm especially into stuff {D}.",
               "Ideally {D}."]
CLOSERS = ["Thanks!", "Thanks in advance.", "Any help appreciated.", "What would you suggest?", "",
           "Cheers.", "", "Go!", "I'm open to anything."]
REPLIES = [
    ("Have you seen {S}? Sounds like your thing.", "Yes, saw it last year, really good."),
    ("Did you like {S}?", "Loved it!"),
    ("What did you think of {S}?", "One of my favourites, actually."),
    ("{S} maybe?", "Seen it already, great pick though."),
]


MOVIES_FILE = Path(__file__).with_name("demo_movies.tsv")


def load_movies(path: Path = MOVIES_FILE) -> list[dict]:
    """The demo world's movies: {title, year, genres, fame} from a tab-separated file."""
    lines = [(i, line) for i, line in enumerate(common.read_text(path).split("\n"), 1)
             if line.strip() and not line.startswith("#")]
    movies = []
    for lineno, line in lines[1:]:  # the first is the header
        fields = line.split("\t")
        if (len(fields) != 4 or not re.fullmatch("[0-9]{4}", fields[1])
                or fields[3] not in list("12345")):
            raise common.DataError(f"{path}:{lineno}: expected title, year, genres, fame (1-5)")
        genres = fields[2].split(",")
        if not set(genres) <= set(GENRE_PHRASES):
            raise common.DataError(f"{path}:{lineno}: unknown genre in {fields[2]!r}")
        movies.append({"title": fields[0], "year": int(fields[1]), "genres": genres,
                       "fame": int(fields[3])})
    return movies


def popularity(movies: list[dict], rng: random.Random) -> list[float]:
    """How often people suggest each movie: fame cubed times log-normal noise (seeded)."""
    return [m["fame"] ** 3 * math.exp(rng.gauss(0.0, 0.5)) for m in movies]


def taste_weights(movies: list[dict], pop: list[float], genres: list[str],
                  decade) -> list[float]:
    """The ground-truth distribution of one conversation: popular movies of the requested genres
    (twice as likely when they have all of them), within the decade if one was asked for."""
    out = []
    for m, p in zip(movies, pop):
        hit = sum(g in m["genres"] for g in genres)
        in_decade = decade is None or decade[1] <= m["year"] <= decade[2]
        out.append(p * (2.0 if hit == len(genres) and hit > 1 else 1.0) if hit and in_decade
                   else 0.0)
    return out


def draw(rng: random.Random, weights: list[float], k: int, exclude: set[int]) -> list[int]:
    """k distinct indices, each drawn with probability proportional to its weight."""
    w = [0.0 if i in exclude else x for i, x in enumerate(weights)]
    picked = []
    for _ in range(k):
        if sum(w) <= 0:
            break
        i = rng.choices(range(len(w)), weights=w)[0]
        picked.append(i)
        w[i] = 0.0
    return picked


def mention(m: dict, rng: random.Random) -> str:
    return f"{m['title']} ({m['year']})" if rng.random() < 0.25 else m["title"]


def write_conversation(rng: random.Random, movies: list[dict], genres: list[str], decade,
                       seen: list[int], replied: list[int]) -> str:
    """One forum thread: a post (title + body, sentences shuffled) and maybe a short exchange."""
    phrase = [rng.choice(GENRE_PHRASES[g]) for g in genres]
    g_text = (phrase[0] if len(phrase) == 1
              else rng.choice(["{} or {}", "{} and {}", "{}, or maybe {}"]).format(*phrase))
    names = [mention(movies[i], rng) for i in seen]
    s_list = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    sentences = [rng.choice(TASTE).format(G=g_text), rng.choice(SEEN).format(L=s_list)]
    rng.shuffle(sentences)
    if decade is not None:
        sentences.append(rng.choice(DECADE_SENT).format(D=rng.choice(decade[3])))
    sentences.append(rng.choice(CLOSERS))
    body = " ".join(s for s in sentences if s)
    title = rng.choice(POST_TITLES).format(G=g_text, S=names[0])
    if rng.random() < 0.15:
        body = body.lower()
    lines = [f"Post title: {title}", f"OP: {body}"]
    for i in replied:
        ask, answer = rng.choice(REPLIES)
        lines += [f"Reply: {ask.format(S=mention(movies[i], rng))}", f"OP: {answer}"]
    return "\n".join(lines)


def make_demo_world(cfg: Config) -> tuple[list[dict], dict[str, list[dict]], dict]:
    """Catalog rows and {train, val, test} rows of the demo world; plus the hidden tastes (for the
    oracle yardstick). Deterministic for a seed."""
    rng = random.Random(cfg.seed)
    movies = load_movies()
    pop = popularity(movies, rng)
    genres_all = sorted(GENRE_PHRASES)
    rows, hidden = [], {}
    for c in range(cfg.conversations):
        genres = rng.sample(genres_all, 1 if rng.random() < 0.6 else 2)
        decade = rng.choice(DECADES) if rng.random() < 0.25 else None
        weights = taste_weights(movies, pop, genres, decade)
        if sum(w > 0 for w in weights) < 3 * cfg.n_items // 2:  # too narrow a taste: no decade
            decade = None
            weights = taste_weights(movies, pop, genres, decade)
        seen = draw(rng, weights, rng.choice([1, 1, 2, 2, 3]), set())
        replied = draw(rng, weights, 1, set(seen)) if rng.random() < 0.3 else []
        conv_id = f"demo{c:05d}"
        text = write_conversation(rng, movies, genres, decade, seen, replied)
        seen_all = seen + replied
        hidden[conv_id] = (weights, set(seen_all))
        for r in range(rng.choice(cfg.repliers)):
            gt = draw(rng, weights, rng.choice(cfg.groundtruth_per_row), set(seen_all))
            rows.append({"id": f"{conv_id}#{r}", "prompt": common.task_prompt(text, cfg.n_items),
                         "seen_titles": [movies[i]["title"] for i in seen_all],
                         "groundtruth_with_release_year": [[movies[i]["title"],
                                                            str(movies[i]["year"])] for i in gt]})
    splits = split_by_time(rows, cfg.val_frac, cfg.test_frac)
    catalog = [{"title": m["title"], "year": m["year"], "genres": m["genres"], "count": 0}
               for m in movies]
    return catalog, splits, hidden


def split_by_time(rows: list[dict], val_frac: float,
                  test_frac: float) -> dict[str, list[dict]]:
    """Conversations are in time order: the oldest go to train, the newest to test (Reddit-v2)."""
    convs = list(dict.fromkeys(common.conversation_id(r) for r in rows))
    n_test, n_val = round(len(convs) * test_frac), round(len(convs) * val_frac)
    where = {c: "train" for c in convs[:len(convs) - n_val - n_test]}
    where.update({c: "val" for c in convs[len(convs) - n_val - n_test:len(convs) - n_test]})
    where.update({c: "test" for c in convs[len(convs) - n_test:]})
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r in rows:
        splits[where[common.conversation_id(r)]].append(r)
    return splits


# --- Importing the released Reddit-v2 format ------------------------------------------------------

SPLIT_NAMES = {"train": ["train"], "val": ["val", "validation", "valid"], "test": ["test"]}


def read_split_file(path: Path) -> list[dict]:
    """Rows of a .jsonl file, or of a .json file holding a list of rows (or JSON lines)."""
    text = common.read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise common.DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, r in enumerate(rows):
            common.validate_row(r, f"{path}: row {i}")
        return rows
    rows = common.read_jsonl(path, with_lines=True)
    for i, r in rows:
        common.validate_row(r, f"{path}:{i}")
    return [r for _, r in rows]


def read_released(src: Path) -> dict[str, list[dict]]:
    """{train, val, test} rows from a folder of per-split JSON/JSONL files or an HF DatasetDict."""
    splits = {}
    for split, names in SPLIT_NAMES.items():
        files = [src / f"{n}.{ext}" for n in names for ext in ("jsonl", "json")]
        found = [f for f in files if f.is_file()]
        hf = [src / n for n in names if (src / n / "dataset_info.json").is_file()]
        if found:
            rows = read_split_file(found[0])
        elif hf:
            try:
                import datasets  # optional: only for the released Arrow directories
            except ImportError:
                raise common.DataError(f"{hf[0]}: an HF dataset directory; pip install "
                                       "datasets, or export it to JSONL") from None
            rows = [dict(r) for r in datasets.load_from_disk(str(hf[0]))]
            for i, r in enumerate(rows):
                common.validate_row(r, f"{hf[0]}: row {i}")
        else:
            raise common.DataError(f"{src}: no {split} split "
                                   f"(looked for {', '.join(f.name for f in files)})")
        if not rows:
            raise common.DataError(f"{found[0] if found else hf[0]}: the {split} split has no rows")
        splits[split] = [keep_fields(r) for r in rows]
    return splits


def keep_fields(row: dict) -> dict:
    """The fields the pipeline uses; an id made from the prompt when the row has none."""
    out = {k: row[k] for k in ("id", "prompt", "seen_titles", "groundtruth_with_release_year",
                               "completion") if k in row}
    out.setdefault("id", common.prompt_key(row["prompt"]))
    return out


def number_rows(rows: list[dict]) -> None:
    """Give rows of one conversation ids 'conv#0', 'conv#1', ... (unless they already have '#')."""
    seen: dict[str, int] = {}
    for r in rows:
        if "#" not in str(r["id"]):
            conv = str(r["id"])
            r["id"] = f"{conv}#{seen.get(conv, 0)}"
            seen[conv] = seen.get(conv, 0) + 1


# The pickle opcodes of lists, tuples, str, int and the memo: a catalog needs nothing else.
PLAIN_OPCODES = {"PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "EMPTY_LIST",
                 "LIST", "APPEND", "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
                 "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "UNICODE", "BINUNICODE",
                 "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING", "PUT",
                 "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET"}


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles containers and scalars only: any class or function reference is refused, so a
    pickle cannot run code. The caller then checks the result is a list of (str, int)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only lists, tuples, str "
                                     "and int")


def load_catalog_pickle(path: Path) -> list[dict]:
    """Catalog from a pickled list of (title, year) tuples. Every opcode is checked first with
    pickletools, which reads lengths without trusting them (a damaged length field could otherwise
    ask the unpickler for gigabytes); then PlainDataUnpickler builds it."""
    import pickletools
    data = common.require(path, "no such file").read_bytes()
    try:
        for op, _, pos in pickletools.genops(data):
            if op.name not in PLAIN_OPCODES:
                raise pickle.UnpicklingError(f"refusing opcode {op.name} at byte {pos}: only "
                                             "lists, tuples, str and int")
        items = PlainDataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, RecursionError,
            struct.error) as e:  # what damaged opcodes raise
        raise common.DataError(f"{path}: not a plain pickle of (title, year) tuples "
                               f"({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(items, (list, tuple)):
        raise common.DataError(f"{path}: expected a list of (title, year), "
                               f"got {type(items).__name__}")
    rows = []
    for i, it in enumerate(items):
        if (not isinstance(it, (list, tuple)) or len(it) != 2 or not isinstance(it[0], str)
                or type(it[1]) is not int):
            raise common.DataError(f"{path}: item {i} is not a (str, int) pair: {it!r:.80}")
        rows.append({"title": it[0], "year": it[1], "count": 0})
    if not rows:
        raise common.DataError(f"{path}: the catalog pickle holds no items")
    return rows


def catalog_from_groundtruth(splits: dict[str, list[dict]]) -> list[dict]:
    """Without a catalog file: every distinct ground-truth item of every split."""
    rows, keys = [], set()
    for split_rows in splits.values():
        for r in split_rows:
            for title, year in common.row_groundtruth(r):
                key = (common.norm_title(title), year)
                if key not in keys:
                    keys.add(key)
                    rows.append({"title": title, "year": year, "count": 0})
    return rows


# --- Yardsticks and the summary -------------------------------------------------------------------

def count_popularity(catalog: list[dict], train: list[dict]) -> None:
    """catalog[i]['count'] = how often item i is a ground-truth item in train."""
    cat = common.Catalog(catalog)
    for r in train:
        for title, year in common.row_groundtruth(r):
            i = cat.find(title, year)
            if i is not None:
                catalog[i]["count"] += 1


def score_lists(rows: list[dict], lists: list[list[tuple[str, int]]], cat: common.Catalog,
                n: int) -> dict:
    scores = [common.score_completion(common.format_items(items), r, cat, n)
              for r, items in zip(rows, lists)]
    return common.summarize(scores, rows)


def oracle_lists(rows: list[dict], catalog: list[dict], hidden: dict,
                 n: int) -> list[list[tuple[str, int]]]:
    """The ceiling: the true ground-truth distribution of the conversation, ranked."""
    out = []
    for r in rows:
        weights, seen = hidden[common.conversation_id(r)]
        order = sorted((i for i, w in enumerate(weights) if w > 0 and i not in seen),
                       key=lambda i: -weights[i])
        out.append([(catalog[i]["title"], catalog[i]["year"]) for i in order[:n]])
    return out


def main(argv=None) -> None:
    cfg = common.parse_config(Config, argv, __doc__.split("\n")[0])
    cfg.n_items = cfg.n_items or (common.N_ITEMS if cfg.from_dir else DEMO_N)
    out = Path(cfg.data_dir)
    if out.exists() and not out.is_dir():
        raise common.DataError(f"{out}: exists and is not a directory; "
                               "choose another --data-dir")
    for name in ("repliers", "groundtruth_per_row"):
        if not getattr(cfg, name) or min(getattr(cfg, name)) < 1:
            raise common.DataError(f"--{name.replace('_', '-')}: give one or more counts, "
                                   "each at least 1")
    if cfg.from_dir:
        src = common.require(cfg.from_dir, "give a directory with train/val/test JSON or JSONL "
                             "files")
        print(f"reading released-format data from {src}")
        splits = read_released(src)
        for rows in splits.values():
            number_rows(rows)
        catalog = (load_catalog_pickle(Path(cfg.catalog_pkl)) if cfg.catalog_pkl
                   else catalog_from_groundtruth(splits))
        hidden = None
    else:
        print(f"generating the demo world: seed {cfg.seed}, {cfg.conversations} conversations, "
              f"N={cfg.n_items}")
        catalog, splits, hidden = make_demo_world(cfg)
    count_popularity(catalog, splits["train"])
    cat = common.Catalog(catalog)

    # The summary: what the data looks like, and the yardsticks every later stage is compared to.
    test = [r for r in splits["test"] if r["groundtruth_with_release_year"]]
    summary = {"catalog_items": len(catalog), "n": cfg.n_items}
    for split, rows in splits.items():
        summary[split] = {"rows": len(rows),
                          "conversations": len({common.conversation_id(r) for r in rows}),
                          "groundtruth_per_row": sum(len(r["groundtruth_with_release_year"])
                                                     for r in rows) / max(1, len(rows))}
    k = min(10, cfg.n_items)
    yardsticks = {"popularity": score_lists(test, common.popularity_lists(test, cat, cfg.n_items),
                                            cat, cfg.n_items)}
    if hidden is not None:
        yardsticks["oracle"] = score_lists(test, oracle_lists(test, catalog, hidden, cfg.n_items),
                                           cat, cfg.n_items)
    summary["test_yardsticks"] = {name: {m: s[m] for m in (f"recall@{k}_filtered",
                                                          f"ndcg@{k}_filtered",
                                                          f"recall@{cfg.n_items}_filtered",
                                                          f"ndcg@{cfg.n_items}_filtered")}
                                  for name, s in yardsticks.items()}
    # Write only once everything is computed: a failure above leaves no partial data directory.
    common.write_jsonl(out / "catalog.jsonl", catalog)
    for split, rows in splits.items():
        common.write_jsonl(out / f"{split}.jsonl", rows)
    common.write_json(out / "catalog_summary.json", summary)

    print(f"catalog: {len(catalog)} items")
    for split in ("train", "val", "test"):
        s = summary[split]
        print(f"{split:5s}: {s['rows']:6d} rows, {s['conversations']:5d} conversations, "
              f"{s['groundtruth_per_row']:.2f} ground-truth items per row")
    top = sorted(catalog, key=lambda c: -c["count"])[:8]
    print("most frequent in train: "
          + "; ".join(f"{c['title']} ({c['year']}) x{c['count']}" for c in top))
    for name, s in yardsticks.items():
        print(f"test {name:10s}: recall@{k} {s[f'recall@{k}_filtered']:.3f} "
              f"+- {s[f'recall@{k}_filtered_se']:.3f}"
              f" | ndcg@{k} {s[f'ndcg@{k}_filtered']:.3f} +- {s[f'ndcg@{k}_filtered_se']:.3f}")
    print(f"wrote {out}/catalog.jsonl, {out}/train.jsonl, {out}/val.jsonl, {out}/test.jsonl, "
          f"{out}/catalog_summary.json")


if __name__ == "__main__":
    common.run(main)
