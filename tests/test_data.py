import gzip
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from genrec.config import DataConfig
from genrec.data import clean, history_windows, leave_one_out, load_dataset, popularity, train_examples
from genrec.data.catalog import Catalog, dedupe, kcore
from genrec.data.loaders import load_movielens, load_sequences, load_table, load_unisrec
from genrec.data.synthetic import generate
from genrec.errors import DataError


def write_ml100k(folder, ratings, n_items=6):
    folder.mkdir(exist_ok=True)
    flags = "|".join(["0"] * 18 + ["1"])
    (folder / "u.item").write_text(
        "".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|{flags}\n" for i in range(1, n_items + 1)),
        encoding="latin-1",
    )
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    return folder


def test_movielens_orders_by_time(tmp_path):
    folder = write_ml100k(tmp_path / "ml", [(1, 3, 5, 30), (1, 1, 4, 10), (1, 2, 1, 20), (2, 4, 3, 5)])
    catalog, users, seqs = load_movielens(folder)
    assert users == ["1", "2"]
    assert [catalog.item_ids[i] for i in seqs[0]] == ["1", "2", "3"]
    assert catalog.texts[0] == "Movie 1 (1995). Genres: Western."
    _, _, seqs = load_movielens(folder, min_rating=4)
    assert [catalog.item_ids[i] for i in seqs[0]] == ["1", "3"]


def test_movielens_unknown_item_names_line(tmp_path):
    folder = write_ml100k(tmp_path / "ml", [(1, 1, 5, 1), (1, 99, 5, 2)])
    with pytest.raises(DataError, match=r"u.data, line 2, field 'item_id': unknown item '99'"):
        load_movielens(folder)


def test_movielens_malformed_row(tmp_path):
    folder = write_ml100k(tmp_path / "ml", [(1, 1, 5, 1)])
    with open(folder / "u.data", "a") as f:
        f.write("1\t2\tfive\t3\n")
    with pytest.raises(DataError, match=r"line 2, field 'rating'"):
        load_movielens(folder)


def test_sequences_format(tmp_path):
    p = tmp_path / "seq.txt"
    p.write_text("u1 a b c\nu2 b c d e\n\n")
    catalog, users, _seqs = load_sequences(p)
    assert users == ["u1", "u2"] and catalog.item_ids == ["a", "b", "c", "d", "e"]
    p.write_bytes(b"\xef\xbb\xbfu1 a b c\r\nu2 b c d e\r\n")  # a byte-order mark and CRLF line ends
    assert load_sequences(p)[1:] == (["u1", "u2"], _seqs)
    p.write_bytes(b"u1 a b\nu2 b \xff\n")
    with pytest.raises(DataError, match=r"seq.txt, line 2: not UTF-8 text \(byte 0xff at column 6\)"):
        load_sequences(p)
    assert not catalog.has_text
    p.write_text("u1 a b\nu1 c d\n")
    with pytest.raises(DataError, match=r"seq.txt, line 2, field 'user': user 'u1' already listed on line 1"):
        load_sequences(p)
    p.write_text("u1 a b\nu2\n")
    with pytest.raises(DataError, match="line 2.*a user with no items"):
        load_sequences(p)
    gz = tmp_path / "seq.txt.gz"  # gzipped: read as it decompresses; data cut short names the file and line
    whole = gzip.compress("".join(f"u{i} a b c\n" for i in range(4000)).encode())
    gz.write_bytes(whole)
    assert load_sequences(gz)[1] == [f"u{i}" for i in range(4000)]
    gz.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"seq.txt.gz: gzip data ends early \(cut short\?\) after line [1-9]"):
        load_sequences(gz)


def test_unisrec_format(tmp_path):
    (tmp_path / "X.text").write_text(
        "item_id:token\ttext:token_seq\nA1\tGlue. Tools. Acme.\nA2\tTape. Tools. Acme.\nA3\tSaw. Tools. Bosch.\n"
    )
    (tmp_path / "X.item2index").write_text("A1\t0\nA2\t1\nA3\t2\n")
    (tmp_path / "X.test.inter").write_text(
        "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1\t2\n1\t2 1\t0\n"
    )
    catalog, _users, seqs = load_unisrec(tmp_path)
    assert catalog.titles == ["Glue", "Tape", "Saw"]
    assert [[catalog.item_ids[i] for i in s] for s in seqs] == [["A1", "A2", "A3"], ["A3", "A2", "A1"]]
    (tmp_path / "X.test.inter").write_text(
        "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 7\t2\n"
    )
    with pytest.raises(DataError, match=r"X.test.inter, line 2, field 'item_id': unknown item index '7'"):
        load_unisrec(tmp_path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "csv.gz", "jsonl.gz"])
def test_table_formats(tmp_path, fmt):
    inter = pd.DataFrame({"uid": ["u1", "u1", "u2", "u1"], "iid": ["b", "a", "a", "c"], "ts": [2, 1, 5, 3]})
    items = pd.DataFrame(
        {"iid": ["a", "b", "c"], "name": ["Alpha", "Beta", "Gamma"], "brand": ["X", "Y", "Z"]}
    )
    paths = []
    for name, df in (("inter", inter), ("items", items)):
        p = tmp_path / f"{name}.{fmt}"
        if fmt.startswith("csv"):
            text = df.to_csv(index=False)
        elif fmt.startswith("jsonl"):
            text = "".join(json.dumps(r) + "\n" for r in df.astype(str).to_dict("records"))
        else:
            df.to_parquet(p)
        if fmt != "parquet":
            p.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
        paths.append(p)
    catalog, users, seqs = load_table(
        paths[0],
        items_path=paths[1],
        user_col="uid",
        item_col="iid",
        time_col="ts",
        text_cols=["name", "brand"],
    )
    assert catalog.texts[0] == "Alpha. X" and catalog.titles[1] == "Beta"
    assert [catalog.item_ids[i] for i in seqs[users.index("u1")]] == ["a", "b", "c"]


def test_table_errors_name_file_line_field(tmp_path):
    p = tmp_path / "i.csv"
    p.write_text("user_id,item_id,timestamp\nu1,a,1\nu1,b,notatime\n")
    with pytest.raises(DataError, match=r"i.csv, line 3, field 'timestamp'"):
        load_table(
            p, items_path=None, user_col="user_id", item_col="item_id", time_col="timestamp", text_cols=[]
        )
    with pytest.raises(DataError, match=r"missing column 'uid'"):
        load_table(p, items_path=None, user_col="uid", item_col="item_id", time_col=None, text_cols=[])
    j = tmp_path / "i.jsonl"
    j.write_text('{"user_id": "u1", "item_id": "a"}\n{"user_id": oops}\n')
    with pytest.raises(DataError, match=r"i.jsonl, line 2: malformed JSON"):
        load_table(j, items_path=None, user_col="user_id", item_col="item_id", time_col=None, text_cols=[])
    unreadable = {  # file, its bytes, the error
        "i.jsonl": (
            b'{"user_id": "u1", "item_id": "a"}\n{"user_id": "u\xff1", "item_id": "a"}\n',
            r"i.jsonl, line 2: not UTF-8 text \(byte 0xff at column 15\)",
        ),
        "i.parquet": (b"not parquet", r"i.parquet: not a readable Parquet file"),
        "latin.csv": ("user_id,item_id\nu1,caf\u00e9\n".encode("latin-1"), r"latin.csv: not UTF-8 text"),
        "i.csv.gz": (b"user_id,item_id\nu1,a\n", r"i.csv.gz: gzip data is damaged \(Not a gzipped file"),
        "i.parquet.gz": (gzip.compress(b"x"), r"i.parquet.gz: unsupported extension '.parquet.gz'"),
    }
    for name, (content, message) in unreadable.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            load_table(
                tmp_path / name,
                items_path=None,
                user_col="user_id",
                item_col="item_id",
                time_col=None,
                text_cols=[],
            )
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\na,A\n")
    p.write_text("user_id,item_id\nu1,a\nu1,zz\n")
    with pytest.raises(DataError, match=r"i.csv, line 3, field 'item_id': unknown item 'zz'"):
        load_table(
            p, items_path=items, user_col="user_id", item_col="item_id", time_col=None, text_cols=["title"]
        )


def test_catalog_rejects_empty_and_duplicates():
    with pytest.raises(DataError, match="empty"):
        Catalog([], [], [])
    with pytest.raises(DataError, match="duplicate item id 'a'"):
        Catalog(["a", "b", "a"], ["", "", ""], ["", "", ""], source="items.csv")


def test_dedupe_and_kcore():
    seqs, dropped = dedupe([[1, 2, 1, 3, 2]])
    assert seqs == [[1, 2, 3]] and dropped == 2
    users, seqs = kcore(["a", "b", "c"], [[0, 1, 2], [0, 1], [0, 3]], 2)
    # item 2 and 3 appear once -> dropped; then user c has 1 item -> dropped
    assert users == ["a", "b"] and seqs == [[0, 1], [0, 1]]


def test_leave_one_out_is_chronological(small_data):
    test, valid = leave_one_out(small_data, "test"), leave_one_out(small_data, "valid")
    train = train_examples(small_data)
    s = small_data.sequences[0]
    assert test[0].history == tuple(s[:-1]) and test[0].target == s[-1]
    assert valid[0].history == tuple(s[:-2]) and valid[0].target == s[-2]
    # No training example ever sees the valid or test target position.
    u0 = [e for e in train if e.user == small_data.users[0]]
    assert max(len(e.history) for e in u0) == len(s) - 3
    counts = popularity(small_data, split="test")
    assert counts.sum() == sum(len(x) - 1 for x in small_data.sequences)


@pytest.mark.parametrize("window", [1, 3, 4, 50])
def test_history_windows_make_every_training_position_a_target_once(small_data, window):
    windows = history_windows(small_data, window=window)
    for u, s in zip(small_data.users, small_data.sequences, strict=True):
        train = s[:-2]
        mine = [w for w in windows if w.user == u]
        # oldest window first, each one starting on the item the one before it ended with: together they
        # are exactly the training part, so each item after the first is a target (an item after a window's
        # first) exactly once, and no window reaches the valid or test item
        chained: list[int] = []
        for w in reversed(mine):
            items = [*w.history, w.target]
            assert 2 <= len(items) <= window + 1
            assert not chained or items[0] == chained[-1]
            chained.extend(items[1:] if chained else items)
        assert chained == (train if len(train) >= 2 else [])
    # per_user N: the last N targets of each user only
    last2 = history_windows(small_data, window=window, per_user=2)
    for u, s in zip(small_data.users, small_data.sequences, strict=True):
        items = [[*w.history, w.target] for w in last2 if w.user == u]
        assert sum(len(x) - 1 for x in items) == min(2, len(s) - 3)
        assert all(x[-1] in s[-4:-2] for x in items)


def test_synthetic_is_deterministic_and_sequential():
    a, b = generate(400, 100, seed=3), generate(400, 100, seed=3)
    assert a[0].item_ids == b[0].item_ids and a[2] == b[2]
    assert generate(400, 100, seed=4)[2] != a[2]
    catalog, _, seqs = a
    # Sequential structure: the next item is often the next step of the same product line.
    line = [catalog.attributes[i]["line"] + catalog.attributes[i]["brand"] for i in range(len(catalog))]
    same = np.mean([line[x] == line[y] for s in seqs for x, y in itertools.pairwise(s)])
    assert same > 0.4
    assert len(set(catalog.titles)) > 0.9 * len(catalog)


def test_load_dataset_synthetic():
    data = load_dataset(DataConfig(synthetic_items=200, synthetic_users=50, kcore=2))
    assert len(data) > 30 and all(len(s) >= 3 for s in data.sequences)


def test_clean_logs_and_reindexes(small_data):
    cat = small_data.catalog
    data = clean(cat, ["u"] * 1 + ["v"], [[0, 1, 2, 0], [1, 2]], kcore_k=0)
    assert len(data) == 1 and len(data.catalog) == 3
