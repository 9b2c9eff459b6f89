"""`diffalign filter` (FiFA-style selection): the math by hand, selection and tie-breaking, byte-identical
outputs, round trips through the normal data/cache/train path, and the error messages."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.data.filter import (distinct, fifa_scores, hashed_bag_of_words, knn_log_distance, pair_margins,
                                   quantiles, select_top, top_count, word_count_quality)
from diffalign.data.preference import decode_image, load_preference_source
from diffalign.data.toy import write_toy_pairs

FIFA_COLS = ["fifa_score", "fifa_margin", "fifa_quality", "fifa_log_knn", "fifa_rank", "source_row"]
R = 1 / math.sqrt(2)


# ------------------------------------------------------------------------------------------ pure math
def test_knn_log_distance_hand_example():
    # unit directions at 0, 45, 90 and 180 degrees; row 1 is scaled (cosine ignores length)
    e = np.array([[1.0, 0.0], [3.0, 3.0], [0.0, 1.0], [-1.0, 0.0]])
    # cosine distances: d01 = d12 = 1 - 1/sqrt2, d02 = d23 = 1, d03 = 2, d13 = 1 + 1/sqrt2
    a = 1 - R
    np.testing.assert_allclose(knn_log_distance(e, k=1), np.log([a, a, a, 1.0]), rtol=1e-12)
    np.testing.assert_allclose(knn_log_distance(e, k=2), np.log([1.0, a, 1.0, 1 + R]), rtol=1e-12)
    np.testing.assert_allclose(knn_log_distance(e, k=3), np.log([2.0, 1 + R, 1.0, 2.0]), rtol=1e-12)
    # chunking changes nothing
    np.testing.assert_array_equal(knn_log_distance(e, k=2, chunk=1), knn_log_distance(e, k=2))


def test_knn_excludes_self_and_floors_duplicates():
    e = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 point the same way
    out = knn_log_distance(e, k=1, eps=1e-3)
    # each duplicate's nearest OTHER row is the other duplicate at distance 0 -> log(eps); row 2 is 1 away
    np.testing.assert_allclose(out, [math.log(1e-3), math.log(1e-3), 0.0], atol=1e-12)
    np.testing.assert_allclose(knn_log_distance(e, k=2, eps=1e-3), [0.0, 0.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="more than k=3 distinct prompts; got 3"):
        knn_log_distance(e, k=3)
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        knn_log_distance(np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), k=1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn_log_distance(e, k=0)


def test_hashed_bag_of_words_is_stable_and_lexical():
    a, b, c, empty = hashed_bag_of_words(["A red dog.", "a red  DOG", "a blue car", "!!"], dim=64)
    np.testing.assert_array_equal(a, b)  # case, spacing and punctuation do not matter
    assert a.sum() == 3 and c.sum() == 3 and empty.sum() == 1  # "<empty>" keeps the row non-zero
    assert not np.array_equal(a, c)
    # crc32 buckets, not Python's salted hash: the same numbers in every process
    import zlib
    assert a[zlib.crc32(b"red") % 64] >= 1


def test_word_count_quality_by_hand():
    long_61 = " ".join(["w"] * 61)
    long_200 = " ".join(["w"] * 200)
    q = word_count_quality(["", "cat", "two words", "a red cat", long_61, long_200], min_words=3, max_words=60)
    np.testing.assert_allclose(q, [-1.0, -2 / 3, -1 / 3, 0.0, -1 / 60, -1.0], rtol=1e-12)
    with pytest.raises(ValueError, match="min_words"):
        word_count_quality(["x"], min_words=5, max_words=4)


def test_margins_and_score_formula_by_hand():
    r_w, r_l = np.array([0.9, 0.2, 0.4]), np.array([0.4, 0.5, 0.4])
    np.testing.assert_allclose(pair_margins(r_w, r_l), [0.5, 0.3, 0.0])
    np.testing.assert_allclose(pair_margins(r_w, r_l, signed=True), [0.5, -0.3, 0.0])
    margin = np.array([0.5, 0.2])
    quality = np.array([0.0, -1.0])
    log_knn = np.log([0.1, 0.5])
    s = fifa_scores(margin, quality, log_knn, alpha=2.0, gamma=0.5)
    # 0.5 + 2*0 + 0.5*ln 0.1 = -0.651292...;  0.2 + 2*(-1) + 0.5*ln 0.5 = -2.146574...
    np.testing.assert_allclose(s, [0.5 + 0.5 * math.log(0.1), 0.2 - 2.0 + 0.5 * math.log(0.5)], rtol=1e-12)
    np.testing.assert_allclose(s, [-0.6512925465, -2.1465735903], rtol=1e-9)
    np.testing.assert_array_equal(fifa_scores(margin, None, None, alpha=0.0, gamma=0.0), margin)
    with pytest.raises(ValueError, match="log_knn is missing but its weight is 0.5"):
        fifa_scores(margin, quality, None, alpha=1.0, gamma=0.5)
    with pytest.raises(ValueError, match=r"margin\[1\] is nan"):
        fifa_scores([0.1, float("nan")], None, None, alpha=0, gamma=0)
    with pytest.raises(ValueError, match="quality has 3 values but there are 2 pairs"):
        fifa_scores(margin, [0, 0, 0], None, alpha=1, gamma=0)


def test_select_top_breaks_ties_by_index_and_top_count():
    scores = [1.0, 3.0, 3.0, 2.0, 3.0, -5.0]
    assert select_top(scores, 3).tolist() == [1, 2, 4]  # three equal scores: lowest index first
    assert select_top(scores, 4).tolist() == [1, 2, 4, 3]
    assert select_top(scores, 6).tolist() == [1, 2, 4, 3, 0, 5]
    assert select_top(scores, 0).tolist() == []
    # the order does not depend on where the tied rows sit in memory
    assert select_top([3.0] * 5, 2).tolist() == [0, 1]
    with pytest.raises(ValueError):
        select_top(scores, 7)
    assert top_count(10, top_fraction=0.25) == 3  # ceil(2.5)
    assert top_count(10, top_fraction=0.3) == 3  # 0.3 * 10 = 3.0000000000000004 must not become 4
    assert top_count(10, top_fraction=0.001) == 1  # a positive fraction keeps at least one pair
    assert top_count(10, top_fraction=1.0) == 10
    assert top_count(10, top_k=50) == 10 and top_count(10, top_k=4) == 4
    for bad in ({"top_k": 0}, {"top_fraction": 0.0}, {"top_fraction": 1.5}, {}, {"top_k": 1, "top_fraction": 0.5}):
        with pytest.raises(ValueError):
            top_count(10, **bad)


def test_distinct_and_quantiles():
    uniq, inv = distinct(["b", "a", "b", "c", "a"])
    assert uniq == ["b", "a", "c"] and inv.tolist() == [0, 1, 0, 2, 1]
    q = quantiles([0.0, 1.0, 2.0, 3.0, 4.0])
    assert q["q0"] == 0.0 and q["q50"] == 2.0 and q["q100"] == 4.0 and q["q25"] == 1.0


# ------------------------------------------------------------------------------------------ fixtures
MARGINS = [0.9, 0.1, 0.5, 0.5, 0.3, 0.8, 0.2, 0.5, 0.05, 0.7, 0.4, 0.6, 0.35, 0.15]


def _scored_toy(path: Path, n_pairs: int = 12, ties: int = 2, size: int = 32) -> tuple[Path, list[float]]:
    """Toy Pick-a-Pic parquet + score_0/score_1 columns with a designed margin per row.

    Tie rows (label_0 = 0.5) get margin 5, the largest, so keeping one would show. Row 4's LOSER has
    the higher score (the proxy disagrees with the label there). Returns (path, |score_0 - score_1|).
    """
    write_toy_pairs(path, n_pairs=n_pairs, size=size, seed=3, ties=ties)
    table = pq.read_table(path)
    labels = table.column("label_0").to_pylist()
    s0, s1, margins = [], [], []
    for i, lab in enumerate(labels):
        m = 5.0 if lab == 0.5 else MARGINS[i]
        w_high = i != 4
        hi, lo = 0.2 + m, 0.2
        win, lose = (hi, lo) if w_high else (lo, hi)
        s0.append(win if lab == 1.0 else lose)
        s1.append(lose if lab == 1.0 else win)
        margins.append(abs(s0[-1] - s1[-1]))
    table = table.append_column("score_0", pa.array(s0)).append_column("score_1", pa.array(s1))
    pq.write_table(table, path)
    return path, margins


def _filter(*argv: str) -> int:
    return main(["filter", *map(str, argv), "--no-progress"])


# ------------------------------------------------------------------------------------------ the verb
def test_margin_from_columns_selection_ties_and_read_back(tmp_path, capsys):
    data, margins = _scored_toy(tmp_path / "in" / "pairs.parquet")
    labels = pq.read_table(data).column("label_0").to_pylist()
    tie_rows = [i for i, lab in enumerate(labels) if lab == 0.5]
    assert len(tie_rows) == 2
    out = tmp_path / "out" / "top.parquet"
    assert _filter(data, "--out", out, "--margin-from-columns", "score_0,score_1", "--alpha", "0", "--gamma", "0",
                   "--top-k", "5") == 0
    printed = capsys.readouterr().out
    assert "14 rows read, 12 pairs scored, 2 ties dropped" in printed and "kept       5 of 12 pairs" in printed

    # by hand: the 5 largest margins among the non-tie rows, equal margins -> lower row first
    usable = [i for i in range(14) if i not in tie_rows]
    expected = sorted(usable, key=lambda i: (-margins[i], i))[:5]
    assert expected == [0, 5, 9, 11, 2]  # by hand: 0.9, 0.8, 0.7, 0.6, then rows 2 and 7 tie at 0.5 -> row 2
    got = pq.read_table(out)
    assert got.column("source_row").to_pylist() == sorted(expected)  # written in source order
    ranks = dict(zip(got.column("source_row").to_pylist(), got.column("fifa_rank").to_pylist()))
    assert [r for r, _ in sorted(ranks.items(), key=lambda kv: kv[1])] == expected
    assert not set(tie_rows) & set(ranks)
    np.testing.assert_allclose(got.column("fifa_margin").to_pylist(), [margins[i] for i in sorted(expected)])
    np.testing.assert_array_equal(got.column("fifa_score").to_numpy(), got.column("fifa_margin").to_numpy())
    # every input column is kept, the selection columns appended (fifa_log_knn absent: gamma = 0)
    source_cols = pq.read_table(data).column_names
    assert got.column_names == source_cols + ["fifa_score", "fifa_margin", "fifa_quality", "fifa_rank", "source_row"]
    original = pq.read_table(data).to_pylist()
    for row in got.to_pylist():
        src = original[row["source_row"]]
        assert all(row[c] == src[c] for c in source_cols)

    # the subset reads back through the normal loader with the same orientation as the original rows
    back = load_preference_source(str(out))
    full = {r.row: r for r in load_preference_source(str(data)).records}
    assert back.counts.pairs == 5 and back.counts.ties_dropped == 0
    for rec, source_row in zip(back.records, got.column("source_row").to_pylist()):
        assert rec.image_w == full[source_row].image_w and rec.image_l == full[source_row].image_l
        assert rec.caption == full[source_row].caption

    side = json.loads((tmp_path / "out" / "top.filter.json").read_text())
    assert side["counts"] == {"rows": 14, "ties_dropped": 2, "bad_rows_skipped": 0, "pairs_scored": 12,
                              "distinct_prompts": side["counts"]["distinct_prompts"], "kept": 5}
    assert side["options"]["top_k"] == 5 and side["options"]["margin_from_columns"] == "score_0,score_1"
    assert side["threshold_score"] == pytest.approx(margins[expected[-1]])
    assert side["quantiles"]["margin_kept"]["q0"] == pytest.approx(margins[expected[-1]])
    png = tmp_path / "out" / "top.filter.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 100

    # signed margin: row 4 (proxy disagrees with the label) drops from rank 6 to last
    out2 = tmp_path / "out" / "signed.parquet"
    assert _filter(data, "--out", out2, "--margin-from-columns", "score_0,score_1", "--signed-margin", "--alpha", "0",
                   "--gamma", "0", "--top-fraction", "1") == 0
    signed = pq.read_table(out2)
    rank_of = dict(zip(signed.column("source_row").to_pylist(), signed.column("fifa_rank").to_pylist()))
    assert rank_of[4] == 12 and dict(zip(signed.column("source_row").to_pylist(),
                                         signed.column("fifa_margin").to_pylist()))[4] == pytest.approx(-0.3)


def test_all_terms_are_consistent_and_outputs_byte_identical(tmp_path):
    data, _ = _scored_toy(tmp_path / "pairs.parquet")
    t = pq.read_table(data)  # two prompts repeated: pairs sharing a prompt share its kNN value
    caps = t.column("caption").to_pylist()
    caps[1], caps[8] = caps[0], caps[7]
    pq.write_table(t.set_column(t.column_names.index("caption"), "caption", pa.array(caps)), data)
    args = ["--margin-from-columns", "score_0,score_1", "--text-encoder", "words", "--knn-k", "2", "--alpha", "0.5",
            "--gamma", "0.2", "--min-words", "8", "--top-fraction", "0.5"]
    out = tmp_path / "a" / "sel.parquet"
    assert _filter(data, "--out", out, *args) == 0
    files = [out, out.with_name("sel.filter.json"), out.with_name("sel.filter.png")]
    first = [f.read_bytes() for f in files]
    assert _filter(data, "--out", out, *args) == 0  # same input and options -> the same bytes, all three files
    assert [f.read_bytes() for f in files] == first
    other = tmp_path / "b" / "other.parquet"  # the parquet does not depend on where it is written
    assert _filter(data, "--out", other, *args) == 0
    assert other.read_bytes() == first[0]

    assert json.loads(files[1].read_text())["counts"]["distinct_prompts"] == 10
    t = pq.read_table(out).to_pydict()
    assert len(t["source_row"]) == 6  # ceil(0.5 * 12)
    assert set(FIFA_COLS) <= set(t)
    s = np.array(t["fifa_score"])
    np.testing.assert_allclose(s, np.array(t["fifa_margin"]) + 0.5 * np.array(t["fifa_quality"])
                               + 0.2 * np.array(t["fifa_log_knn"]), rtol=1e-12)
    # toy captions have 7 words, min 8 -> q = -1/8 for every pair
    np.testing.assert_allclose(t["fifa_quality"], -1 / 8)
    # ranks 1..6 follow the scores
    order = np.argsort(t["fifa_rank"])
    assert sorted(t["fifa_rank"]) == list(range(1, 7)) and np.all(np.diff(s[order]) <= 0)
    # the log kNN term is the distance among DISTINCT prompts: recompute it by hand from the words encoder
    all_rows = load_preference_source(str(data)).records
    uniq, inv = distinct([r.caption for r in all_rows])
    assert len(uniq) == 10
    expect = knn_log_distance(hashed_bag_of_words(uniq), k=2)[inv]
    assert expect[0] == expect[1]  # rows 0 and 1 (both usable) share a prompt
    by_row = {r.row: v for r, v in zip(all_rows, expect)}
    np.testing.assert_allclose(t["fifa_log_knn"], [by_row[r] for r in t["source_row"]], rtol=1e-12)


def test_filtered_parquet_caches_and_trains_on_a_tiny_model(tmp_path, make_cfg, tiny_model):
    from diffalign.data.cache import build_cache
    from diffalign.models import load_adapter
    from diffalign.train.loop import Trainer

    data, _ = _scored_toy(tmp_path / "pairs.parquet")
    out = tmp_path / "sel.parquet"
    # the diversity term from the generator's own text encoder (the family adapter path)
    assert _filter(data, "--out", out, "--margin-from-columns", "score_0,score_1", "--text-encoder",
                   f"sd15:{tiny_model('sd15')}", "--knn-k", "2", "--top-k", "4", "--device", "cpu") == 0
    side = json.loads(out.with_name("sel.filter.json").read_text())
    assert side["resolved"]["text_encoder"].startswith("sd15:")
    assert np.isfinite(pq.read_table(out).column("fifa_log_knn").to_numpy()).all()

    cfg = make_cfg("sd15", f"data.path={out}", f"cache.dir={tmp_path / 'cache'}", "train.batch_size=2",
                   "train.max_steps=2")
    manifest = build_cache(cfg, load_adapter(cfg.model), show_progress=False)
    assert manifest["counts"]["pairs"] == 4 and manifest["counts"]["rows"] == 4
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    result = trainer.train()
    assert result.steps == 2 and result.data_counts["pairs"] == 4
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_reward_margin_matches_the_reward_on_the_images(tmp_path):
    from diffalign.rewards.registry import build_reward

    data, _ = _scored_toy(tmp_path / "pairs.parquet", n_pairs=6, ties=0, size=16)
    out = tmp_path / "b.parquet"
    assert _filter(data, "--out", out, "--reward", "brightness", "--gamma", "0", "--top-fraction", "1",
                   "--batch-size", "4", "--device", "cpu") == 0
    t = pq.read_table(out).to_pydict()
    reward = build_reward("brightness")

    def score(png: bytes) -> float:
        img = decode_image(png, source="t", row=0)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()[None] / 255
        return float(reward(x)["brightness"][0])

    expect = [abs(score(a) - score(b)) for a, b in zip(t["jpg_0"], t["jpg_1"])]
    np.testing.assert_allclose(t["fifa_margin"], expect, rtol=1e-6)
    assert "reward brightness (brightness)" in json.loads(out.with_name("b.filter.json").read_text())["resolved"]["margin"]


def test_clip_text_tower_from_a_folder(tmp_path, tiny_model):
    from transformers import CLIPConfig, CLIPModel

    from diffalign.data.filter_cli import embed_prompts
    from diffalign.models.tiny import build_char_clip_tokenizer

    tok = build_char_clip_tokenizer(model_max_length=77)
    vocab = len(tok)
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2,
                                      eos_token_id=vocab - 1, pad_token_id=vocab - 1),
                     vision_config=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2),
                     projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    captions = ["a red dog", "a blue car on a road"]
    got = embed_prompts(captions, f"clip:{tmp_path / 'clip'}")
    with torch.no_grad():
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ref = model.get_text_features(input_ids=ids)
        ref = getattr(ref, "pooler_output", ref)  # a tensor, or an output object in newer transformers
    assert got.shape == (2, 16)  # the PROJECTED text embedding, what CLIP compares with images
    np.testing.assert_allclose(got, ref.double().numpy(), rtol=1e-5, atol=1e-6)
    # a diffusers pipeline folder: its text_encoder's pooled end-token state
    pipe_emb = embed_prompts(captions, f"clip:{tiny_model('sd15')}")
    assert pipe_emb.shape[0] == 2 and np.isfinite(pipe_emb).all() and not np.allclose(pipe_emb[0], pipe_emb[1])


def test_world_pairs_default_to_the_oracle_and_the_world_text_encoder(tmp_path):
    from diffalign.world.pairs import make_render_pairs
    from diffalign.world.scenes import prompt_splits

    train, _ = prompt_splits(0)
    data = tmp_path / "world.parquet"
    make_render_pairs([s.caption() for s in train[:10]], data, per_caption=1, seed=0)
    out = tmp_path / "top.parquet"
    assert _filter(data, "--out", out, "--top-k", "4", "--knn-k", "3", "--device", "cpu") == 0
    side = json.loads(out.with_name("top.filter.json").read_text())
    assert side["resolved"]["margin"].startswith("reward oracle (overall)")
    assert side["resolved"]["text_encoder"] == "world:unet"
    t = pq.read_table(out).to_pydict()
    # the images are lossless PNGs of what the oracle scored: margin == |score_0 - score_1|
    np.testing.assert_allclose(t["fifa_margin"], np.abs(np.subtract(t["score_0"], t["score_1"])), atol=1e-5)
    assert len(t["source_row"]) == 4 and np.isfinite(t["fifa_log_knn"]).all()


def test_jsonl_output_keeps_format_and_rebases_relative_paths(tmp_path):
    (tmp_path / "d" / "imgs").mkdir(parents=True)
    lines = []
    for i in range(6):
        for slot in (0, 1):
            Image.new("RGB", (8, 8), (40 * i, 100 * slot, 0)).save(tmp_path / "d" / "imgs" / f"{i}_{slot}.png")
        lines.append({"image_0": f"imgs/{i}_0.png", "image_1": f"imgs/{i}_1.png", "label_0": i % 2,
                      "caption": f"prompt number {i} with words", "s0": float(i), "s1": 0.0, "q": -float(i)})
    src = tmp_path / "d" / "pairs.jsonl"
    src.write_text("".join(json.dumps(x) + "\n\n" for x in lines))  # blank lines are not rows
    out = tmp_path / "elsewhere" / "top.jsonl"
    assert _filter(src, "--out", out, "--margin-from-columns", "s0,s1", "--quality", "column:q", "--alpha", "0.5",
                   "--gamma", "0", "--top-k", "3") == 0
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    # s = i + 0.5 * (-i) = i / 2: rows 5, 4, 3 win
    assert [k["source_row"] for k in kept] == [3, 4, 5] and [k["fifa_rank"] for k in kept] == [3, 2, 1]
    assert kept[0]["fifa_quality"] == -3.0 and kept[0]["fifa_score"] == pytest.approx(1.5)
    assert kept[0]["image_0"] == os.path.abspath(tmp_path / "d" / "imgs" / "3_0.png")
    back = load_preference_source(str(out))
    assert back.counts.pairs == 3 and back.records[0].caption == "prompt number 3 with words"
    # csv the same way (values are text there)
    csv_src = tmp_path / "d" / "pairs.csv"
    csv_src.write_text("image_0,image_1,label_0,caption,s0,s1\n" + "".join(
        f"{x['image_0']},{x['image_1']},{x['label_0']},{x['caption']},{x['s0']},{x['s1']}\n" for x in lines))
    csv_out = tmp_path / "d" / "top.csv"  # same folder: relative paths stay relative
    assert _filter(csv_src, "--out", csv_out, "--margin-from-columns", "s0,s1", "--gamma", "0", "--top-k", "2") == 0
    text = csv_out.read_text().splitlines()
    assert text[0] == "image_0,image_1,label_0,caption,s0,s1,fifa_score,fifa_margin,fifa_quality,fifa_rank,source_row"
    assert text[1].startswith("imgs/4_0.png,") and load_preference_source(str(csv_out)).counts.pairs == 2


def test_folder_of_parquet_files_numbers_rows_across_files(tmp_path):
    data, margins = _scored_toy(tmp_path / "one.parquet")
    table = pq.read_table(data)
    (tmp_path / "folder").mkdir()
    pq.write_table(table.slice(0, 5), tmp_path / "folder" / "part-0.parquet")
    pq.write_table(table.slice(5), tmp_path / "folder" / "part-1.parquet")
    out_one, out_folder = tmp_path / "one_top.parquet", tmp_path / "folder_top.parquet"
    args = ["--margin-from-columns", "score_0,score_1", "--gamma", "0", "--top-k", "4"]
    assert _filter(data, "--out", out_one, *args) == 0
    assert _filter(tmp_path / "folder", "--out", out_folder, *args) == 0
    # the same rows, numbered continuously over the sorted files, as the loader numbers them
    assert pq.read_table(out_folder).to_pydict() == pq.read_table(out_one).to_pydict()
    assert max(pq.read_table(out_folder).column("source_row").to_pylist()) >= 5  # rows from the second file


# ------------------------------------------------------------------------------------------ errors
def test_clear_errors(tmp_path, capsys):
    data, _ = _scored_toy(tmp_path / "pairs.parquet", n_pairs=6, ties=0, size=8)
    out = tmp_path / "o.parquet"

    def err(*argv: str) -> str:
        assert _filter(*argv) == 2
        return capsys.readouterr().err

    e = err(tmp_path / "nope.parquet", "--out", out, "--top-k", "2")
    assert "nope.parquet: file or folder not found" in e
    e = err(data, "--out", out, "--top-k", "2", "--margin-from-columns", "score_0,pick_1", "--gamma", "0")
    assert "margin column 'pick_1' not found; columns present: jpg_0, jpg_1, label_0, label_1, caption" in e
    # a non-numeric score names the row
    t = pq.read_table(data)
    bad = t.set_column(t.column_names.index("score_1"), "score_1",
                       pa.array([0.1, 0.2, None, 0.4, 0.5, 0.6], type=pa.float64()))
    pq.write_table(bad, tmp_path / "bad.parquet")
    e = err(tmp_path / "bad.parquet", "--out", out, "--top-k", "2", "--margin-from-columns", "score_0,score_1",
            "--gamma", "0")
    assert "row 2: margin column 'score_1' must be a finite number, got None" in e
    e = err(data, "--out", tmp_path / "o.jsonl", "--top-k", "2", "--margin-from-columns", "score_0,score_1")
    assert "the input is parquet data" in e and "ending in .parquet" in e
    e = err(data, "--out", out, "--top-k", "2", "--margin-from-columns", "score_0,score_1")
    assert "--text-encoder auto picks world:unet only for embedded-world captions" in e
    e = err(data, "--out", out, "--top-k", "2", "--margin-from-columns", "score_0,score_1", "--text-encoder", "words",
            "--knn-k", "50")
    assert "needs more than --knn-k=50" in e
    e = err(data, "--out", out, "--top-fraction", "0", "--margin-from-columns", "score_0,score_1")
    assert "top_fraction must be in (0, 1]" in e
    e = err(data, "--out", data, "--top-k", "2", "--margin-from-columns", "score_0,score_1", "--gamma", "0")
    assert "is the input file" in e
    e = err(data, "--out", out, "--top-k", "2", "--reward", "brightnes", "--gamma", "0")
    assert "Did you mean 'brightness'?" in e
    e = err(data, "--out", out, "--top-k", "2", "--margin-from-columns", "score_0,score_1", "--reward", "brightness")
    assert "drop --reward/--reward-dimension" in e
    e = err(data, "--out", out, "--top-k", "2", "--margin-from-columns", "score_0", "--gamma", "0")
    assert "takes two column names" in e
    e = err(data, "--out", out, "--top-k", "2", "--margin-from-columns", "score_0,score_1", "--text-encoder", "bogus:x")
    assert "expected world:unet, world:flow, tiny:FAMILY" in e
    e = err(data, "--out", out, "--top-k", "2", "--margin-from-columns", "score_0,score_1", "--gamma", "0",
            "--quality", "column:llm")
    assert "quality column 'llm' not found" in e
    assert not out.exists()  # nothing half-written by any failed run
