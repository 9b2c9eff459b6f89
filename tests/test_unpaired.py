"""Unpaired labelled images (Diffusion-KTO data): format, validation, cache, the loop training KTO on them, and the
refusal of objectives that need pairs."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.data.preference import DataError
from diffalign.data.unpaired import (
    LabelledImageDataset, collate_samples, detect_data_kind, load_unpaired_source, parse_binary_label,
)
from diffalign.train.loop import Trainer
from diffalign.train.randomness import step_generator


def jpg(color: str, size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "JPEG")
    return buf.getvalue()


def write_parquet(path, labels, captions=None, column="image"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(labels)
    colors = ["red", "blue", "green", "white"]
    pq.write_table(pa.table({column: [jpg(colors[i % 4]) for i in range(n)],
                             "caption": captions if captions is not None else [f"a picture {i}" for i in range(n)],
                             "label": labels}), path)
    return path


# ----------------------------------------------------------------------------------------------- format
def test_label_spellings():
    for v in ("desirable", "TRUE", "1", "1.0", "up", "thumbs_up", "Thumbs Up", "thumbsup", "👍", True, 1, 1.0):
        assert parse_binary_label(v) is True, v
    for v in ("undesirable", "false", "0", "0.0", " down ", "thumbs_down", "thumbs down", "👎", False, 0, 0.0):
        assert parse_binary_label(v) is False, v
    for v in ("maybe", "", "0.5", 0.5, 2, -1, float("nan"), None, "yes please", [1]):
        assert parse_binary_label(v) is None, v


def test_parquet_jsonl_and_csv_load_with_mixed_label_spellings(tmp_path):
    labels = ["desirable", "thumbs_up", "TRUE", "1", "0", "Thumbs Down", "👎", "undesirable"]
    src = load_unpaired_source(str(write_parquet(tmp_path / "u.parquet", labels)))
    assert src.kind == "unpaired" and len(src) == 8
    assert [r.desirable for r in src.records] == [True] * 4 + [False] * 4
    assert src.count_dict() == {"rows": 8, "samples": 8, "desirable": 4, "undesirable": 4, "skipped": 0}
    assert isinstance(src.records[0].image, bytes) and src.records[3].caption == "a picture 3"

    (tmp_path / "img").mkdir()
    for i, c in enumerate(["red", "blue", "green"]):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpg(c))
    rows = [{"image": "img/0.jpg", "caption": "a red one", "label": True},
            {"image": "img/1.jpg", "caption": "a blue one", "label": 0},
            {"image": "img/2.jpg", "caption": "a green one", "label": "thumbs up"}]
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    src = load_unpaired_source(str(tmp_path / "u.jsonl"))
    assert [r.desirable for r in src.records] == [True, False, True]
    assert src.records[2].image == str(tmp_path / "img" / "2.jpg")  # relative paths resolve against the file

    (tmp_path / "u.csv").write_text("jpg,prompt,thumbs\nimg/0.jpg,a red one,up\nimg/1.jpg,a blue one,down\n")
    src = load_unpaired_source(str(tmp_path / "u.csv"), caption_column="prompt", label_column="thumbs")
    assert [r.desirable for r in src.records] == [True, False] and src.records[1].caption == "a blue one"
    # the fingerprint (the cache key) follows the content
    again = load_unpaired_source(str(tmp_path / "u.csv"), caption_column="prompt", label_column="thumbs")
    assert again.fingerprint == src.fingerprint
    (tmp_path / "u.csv").write_text("jpg,prompt,thumbs\nimg/0.jpg,a red one,down\nimg/1.jpg,a blue one,down\n")
    assert load_unpaired_source(str(tmp_path / "u.csv"), caption_column="prompt",
                                label_column="thumbs").fingerprint != src.fingerprint


def test_bad_label_names_file_row_column_and_fix(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", ["desirable", "undesirable", "maybe", "desirable"])
    with pytest.raises(DataError) as e:
        load_unpaired_source(str(path))
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and "column 'label'" in msg and "'maybe'" in msg
    assert "desirable/undesirable, true/false, 1/0" in msg and "data.on_error=skip" in msg
    skipped = load_unpaired_source(str(path), on_error="skip")
    assert len(skipped) == 3 and skipped.counts.skipped[0][0] == 2 and "1 bad rows skipped" in skipped.summary()

    (tmp_path / "half.jsonl").write_text(json.dumps({"image": "x.jpg", "caption": "c", "label": 0.5}) + "\n")
    with pytest.raises(DataError, match=r"row 0: column 'label': 0\.5 is not a label.*no ties"):
        load_unpaired_source(str(tmp_path / "half.jsonl"))
    (tmp_path / "img.jpg").write_bytes(jpg("red"))
    (tmp_path / "miss.jsonl").write_text(json.dumps({"image": "img.jpg", "caption": "c", "label": 1}) + "\n"
                                         + json.dumps({"image": "gone.jpg", "caption": "c", "label": 1}) + "\n")
    with pytest.raises(DataError, match=r"row 1: column 'image': file not found"):
        load_unpaired_source(str(tmp_path / "miss.jsonl"))
    (tmp_path / "nocap.csv").write_text("image,label\nimg.jpg,1\n")
    with pytest.raises(DataError, match=r"missing required column\(s\): caption; columns present: image, label"):
        load_unpaired_source(str(tmp_path / "nocap.csv"))
    with pytest.raises(DataError, match="No usable labelled images"):
        load_unpaired_source(str(write_parquet(tmp_path / "none.parquet", ["?", "?"])), on_error="skip")


def test_jsonl_lines_that_are_not_objects_are_bad_rows_named_by_line(tmp_path):
    """The JSON-lines reader both loaders share: blank lines are not rows, broken ones are bad rows by line number."""
    from diffalign.data.preference import load_preference_source

    (tmp_path / "img.jpg").write_bytes(jpg("red"))
    good = json.dumps({"image": "img.jpg", "caption": "c", "label": 1})
    path = tmp_path / "u.jsonl"
    path.write_text(good + "\n\n{not json\n[1, 2]\n" + good + "\n")
    with pytest.raises(DataError, match=r"row 1: invalid JSON on line 3"):
        load_unpaired_source(str(path))
    src = load_unpaired_source(str(path), on_error="skip")
    assert len(src) == 2 and src.counts.rows == 4
    assert [(row, reason.split(" (")[0]) for row, reason in src.counts.skipped] == [
        (1, "invalid JSON on line 3"), (2, "expected a JSON object on line 4, got list")]
    assert len(load_unpaired_source(str(path), max_samples=1)) == 1  # stops before the broken lines

    pairs = tmp_path / "p.jsonl"
    pair = json.dumps({"jpg_0": "img.jpg", "jpg_1": "img.jpg", "label_0": 1, "caption": "c"})
    pairs.write_text(pair + "\n[1]\n" + pair + "\n")
    with pytest.raises(DataError, match=r"row 1: expected a JSON object on line 2, got list"):
        load_preference_source(str(pairs))
    assert load_preference_source(str(pairs), on_error="skip").counts.pairs == 2


def test_a_broken_save_to_disk_folder_is_named_by_both_loaders(tmp_path):
    from diffalign.data.filter_cli import _open_rows
    from diffalign.data.preference import load_preference_source

    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')  # the marker file, but no split folder
    for load in (load_unpaired_source, load_preference_source, lambda spec: _open_rows(spec, "train")):
        with pytest.raises(DataError, match=r"looks like a datasets save_to_disk folder but could not be loaded"):
            load(str(tmp_path))


def test_kind_is_detected_from_the_columns(tmp_path):
    from diffalign.data.preference import load_preference_source

    unpaired = write_parquet(tmp_path / "u.parquet", ["up", "down"])
    assert detect_data_kind(str(unpaired)) == "unpaired"
    assert detect_data_kind(str(unpaired), label_column="thumbs") == "pairs"  # no such label column
    assert detect_data_kind("toy:unpaired?n=4") == "unpaired" and detect_data_kind("toy:pairs") == "pairs"
    from diffalign.data.toy import write_toy_pairs

    assert detect_data_kind(str(write_toy_pairs(tmp_path / "p.parquet", n_pairs=2))) == "pairs"
    # the pair reader, handed unpaired data, says where such data goes
    with pytest.raises(DataError, match="objective.name=kto"):
        load_preference_source(str(unpaired))


def test_dataset_items_collate_and_single_transform(tmp_path):
    from diffalign.data.transforms import JointTransform

    src = load_unpaired_source(str(write_parquet(tmp_path / "u.parquet", ["up", "down", "up"])))
    t = JointTransform(16, center_crop=False, random_flip=True)
    ds = LabelledImageDataset(src, t, seed=3)
    item = ds[(1, 0)]
    assert item["pixels"].shape == (3, 16, 16) and item["desirable"].item() is False and item["row"] == 1
    assert item["original_size"].tolist() == [32, 32]
    assert torch.equal(ds[(1, 0)]["pixels"], item["pixels"])  # augmentation is a function of (seed, index, epoch)
    batch = collate_samples([ds[0], None, ds[2]])
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["desirable"].tolist() == [True, True]
    assert batch["skipped"] == 1 and batch["row"] == [0, 2]
    assert "row" not in collate_samples([None])
    from diffalign.data.preference import decode_image
    from diffalign.data.transforms import pair_generator

    img = decode_image(src.records[0].image, source="x", row=0)
    single, original, crop = t.single(img, pair_generator(3, 0, 0))
    pair_w, _, meta = t(img, img, pair_generator(3, 0, 0))  # the same draws as a pair of that image
    assert torch.equal(single, pair_w) and crop == meta.crop_top_left and original == meta.original_size_w


def test_toy_unpaired_is_deterministic_with_the_asked_fraction(tmp_path):
    from diffalign.data.toy import resolve_toy_path, write_toy_unpaired

    a = write_toy_unpaired(tmp_path / "a.parquet", n=10, seed=1, desirable_percent=30)
    b = write_toy_unpaired(tmp_path / "b.parquet", n=10, seed=1, desirable_percent=30)
    assert a.read_bytes() == b.read_bytes()
    src = load_unpaired_source(str(a))
    assert src.counts.desirable == 3 and src.counts.undesirable == 7
    f = resolve_toy_path("toy:unpaired?n=6&desirable=50", tmp_path)
    assert f.name.startswith("unpaired-") and load_unpaired_source(str(f)).counts.desirable == 3
    with pytest.raises(DataError, match="unknown toy option 'ties'"):
        resolve_toy_path("toy:unpaired?ties=1", tmp_path)
    with pytest.raises(DataError, match="desirable_percent"):
        resolve_toy_path("toy:unpaired?desirable=150", tmp_path)


# ----------------------------------------------------------------------------------------------- the loop
KTO = ["objective.name=kto", "objective.beta=1000", "data.path=toy:unpaired?n=8&desirable=25"]


def kto_by_hand(policy, ref, desirable, beta, lam_d, lam_u) -> float:
    """Diffusion-KTO in float64 from the per-sample errors (the formula of ALGORITHMS.md, written out again)."""
    g = [r - p for p, r in zip(policy, ref)]
    z0 = max(0.0, sum(g) / len(g))
    total = 0.0
    for gi, d in zip(g, desirable):
        sign, lam = (1.0, lam_d) if d else (-1.0, lam_u)
        total += lam * (1.0 - 1.0 / (1.0 + math.exp(-sign * beta * (gi - z0))))
    return total / len(g)


def test_kto_trains_on_unpaired_images_with_hand_computed_losses(make_cfg):
    cfg = make_cfg("sd15", *KTO, "objective.kto_lambda_desirable=2", "objective.kto_lambda_undesirable=0.5",
                   "train.max_steps=3")
    trainer = Trainer(cfg, show_progress=False)
    assert trainer.data_kind == "unpaired"
    trainer.setup()
    assert trainer.data_counts == {"rows": 8, "samples": 8, "desirable": 2, "undesirable": 6, "skipped": 0}

    seen = []
    fn = trainer.objective.sample_fn
    object.__setattr__(trainer, "objective", type(trainer.objective)(
        **{**trainer.objective.__dict__, "sample_fn": lambda s, c: (seen.append(s), fn(s, c))[1]}))
    batch = next(trainer._loader(0))
    assert batch["desirable"].dtype == torch.bool and len(batch["row"]) == 4
    # step 0: LoRA B = 0, policy == reference, so g = 0, z0 = 0 and every sample costs λ_y / 2
    loss, m = trainer.compute_loss(batch, step_generator(0, 0, 0))
    lam = [2.0 if d else 0.5 for d in batch["desirable"].tolist()]
    assert loss.item() == pytest.approx(sum(lam) / len(lam) / 2, abs=1e-6)
    assert m["kto_z0"] == 0.0 and m["implicit_acc"] == 0.5 and m["err_policy"] == pytest.approx(m["err_ref"])
    assert m["frac_desirable"] == pytest.approx(batch["desirable"].float().mean().item())
    s = seen[-1]  # B single samples, each with its own t (not B/2 pairs sharing one)
    assert s.policy.shape == (4,) and torch.equal(s.desirable.cpu(), batch["desirable"])
    assert len(set(s.t.tolist())) == 4

    result = trainer.train()
    assert result.steps == 3 and result.nonfinite_steps == 0 and result.data_counts["samples"] == 8
    assert result.history[0]["loss"] == pytest.approx(sum(lam) / len(lam) / 2, abs=1e-6)  # the same first batch
    # later steps: the loss is KTO of the errors the loop measured, recomputed by hand
    for s, h in zip(seen[-3:], result.history):
        want = kto_by_hand(s.policy.tolist(), s.ref.tolist(), s.desirable.tolist(), 1000.0, 2.0, 0.5)
        assert h["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert not all(torch.equal(s.policy, s.ref) for s in seen[-2:])  # the LoRA moved the policy off the reference
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_kto_balance_rescales_lambdas_by_the_class_counts(make_cfg):
    trainer = Trainer(make_cfg("sd15", *KTO, "objective.kto_balance=true", "train.max_steps=1"), show_progress=False)
    trainer.setup()
    # 2 desirable, 6 undesirable of N = 8: λ_D' = 8 / (2·2) = 2, λ_U' = 8 / (2·6) = 2/3; λ_D' n_D = λ_U' n_U
    assert trainer.objective_cfg.kto_lambda_desirable == pytest.approx(2.0)
    assert trainer.objective_cfg.kto_lambda_undesirable == pytest.approx(2 / 3)
    assert trainer.cfg.objective.kto_lambda_desirable == 1.0  # the user's config is left alone
    batch = next(trainer._loader(0))
    loss, _ = trainer.compute_loss(batch, step_generator(0, 0, 0))
    lam = [2.0 if d else 2 / 3 for d in batch["desirable"].tolist()]
    assert loss.item() == pytest.approx(sum(lam) / len(lam) / 2, abs=1e-6)
    pairs = Trainer(make_cfg("sd15", "objective.name=kto", "objective.kto_balance=true", "train.max_steps=1"),
                    show_progress=False)
    pairs.setup()  # pair data is balanced 1:1 already
    assert pairs.data_kind == "pairs" and pairs.objective_cfg.kto_lambda_desirable == 1.0
    assert pairs.objective_cfg.kto_lambda_undesirable == 1.0
    with pytest.raises(ConfigError, match="kto_balance=true applies to objective.name=kto only"):
        make_cfg("sd15", "objective.kto_balance=true")


def test_bad_unpaired_rows_skipped_are_counted_in_the_run(make_cfg, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [jpg("red"), jpg("blue"), jpg("green"), jpg("white"), b"not a jpeg", jpg("red"), jpg("blue")]
    labels = ["up", "down", "sideways", "up", "down", "down", "up"]  # row 2: a bad label; row 4: a corrupt image
    pq.write_table(pa.table({"image": images, "caption": [f"c{i}" for i in range(7)], "label": labels}),
                   tmp_path / "u.parquet")
    cfg = make_cfg("sd15", "objective.name=kto", f"data.path={tmp_path / 'u.parquet'}", "data.on_error=skip",
                   "train.batch_size=2", "train.max_steps=4")
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    result = trainer.train()
    assert result.data_counts["samples"] == 6 and result.nonfinite_steps == 0
    assert result.data_counts["skipped"] == 2  # the bad label at load time + the corrupt JPEG at decode time
    with pytest.raises(DataError, match=r"row 2: column 'label': 'sideways' is not a label"):
        Trainer(make_cfg("sd15", "objective.name=kto", f"data.path={tmp_path / 'u.parquet'}"),
                show_progress=False).setup()


def test_unpaired_kto_resume_matches_uninterrupted_run(make_cfg, tmp_path):
    from diffalign.train.checkpoint import list_checkpoints, load_checkpoint

    common = [*KTO, "train.checkpoint_every=2", "train.batch_size=2", "data.prompt_dropout=0.3",
              "data.random_flip=true", "data.center_crop=false", "data.resolution=16"]
    straight = Trainer(make_cfg("sd15", *common, "train.max_steps=4", out=tmp_path / "a"), show_progress=False)
    straight.setup()
    result_a = straight.train()
    first = Trainer(make_cfg("sd15", *common, "train.max_steps=2", out=tmp_path / "b"), show_progress=False)
    first.setup()
    first.train()
    resumed = Trainer(make_cfg("sd15", *common, "train.max_steps=4", out=tmp_path / "b"), show_progress=False)
    resumed.setup()
    assert resumed.step == 2
    result_b = resumed.train()
    for a, b in zip(result_a.history[2:], result_b.history):
        assert a["step"] == b["step"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    a = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])["trainable"]
    b = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])["trainable"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", ["dpo", "sft", "mapo", "seppo"])
def test_objectives_that_need_pairs_refuse_unpaired_data(objective, make_cfg, monkeypatch):
    import diffalign.models

    def no_model(*a, **k):  # the refusal must come before any model is loaded
        raise AssertionError("model loaded")

    monkeypatch.setattr(diffalign.models, "load_adapter", no_model)
    with pytest.raises(ConfigError) as e:
        Trainer(make_cfg("sd15", f"objective.name={objective}", "data.path=toy:unpaired?n=8"), show_progress=False)
    msg = str(e.value)
    assert f"objective.name={objective} needs preference pairs" in msg and "data.path=toy:unpaired?n=8" in msg
    assert "objective.name=kto" in msg


def test_scores_do_not_apply_to_unpaired_data(make_cfg):
    trainer = Trainer(make_cfg("sd15", *KTO, "data.score_column=score"), show_progress=False)
    with pytest.raises(DataError, match="data.score_column does not apply"):
        trainer.setup()


# ----------------------------------------------------------------------------------------------- cache
def test_unpaired_cache_round_trip_matches_on_the_fly(make_cfg, tmp_path):
    from diffalign.data.cache import CacheMismatchError, CachedSampleDataset, build_cache, check_manifest
    from diffalign.models import load_adapter

    cfg = make_cfg("sd15", *KTO, f"cache.dir={tmp_path / 'cache'}", "cache.shard_size=3", "train.max_steps=2")
    manifest = build_cache(cfg, load_adapter(cfg.model), show_progress=False)
    assert manifest["kind"] == "unpaired" and manifest["scores"] is None
    assert {k: manifest["counts"][k] for k in ("rows", "samples", "desirable", "undesirable", "skipped")} == \
        {"rows": 8, "samples": 8, "desirable": 2, "undesirable": 6, "skipped": 0}
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 2]
    assert manifest["keys"]["data.label_column"] == "label"
    check_manifest(cfg.cache.dir, cfg)

    cached = Trainer(cfg, show_progress=False)
    assert cached.data_kind == "unpaired"
    cached.setup()
    assert isinstance(cached.dataset, CachedSampleDataset) and len(cached.dataset) == 8
    fly = Trainer(make_cfg("sd15", *KTO, "train.max_steps=2"), show_progress=False)
    fly.setup()
    item_c, item_f = cached.dataset[5], fly.dataset[5]
    assert item_c["row"] == item_f["row"] and bool(item_c["desirable"]) == bool(item_f["desirable"])
    assert item_c["caption"] == item_f["caption"]
    with torch.no_grad():
        encoded = fly.adapter.encode_images(item_f["pixels"][None])[0]
    torch.testing.assert_close(item_c["latents"], encoded, rtol=1e-5, atol=1e-5)
    b_c, b_f = next(cached._loader(0)), next(fly._loader(0))
    assert b_c["row"] == b_f["row"] and torch.equal(b_c["desirable"], b_f["desirable"])
    loss_c, _ = cached.compute_loss(b_c, step_generator(0, 1, 0))
    loss_f, _ = fly.compute_loss(b_f, step_generator(0, 1, 0))
    assert loss_c.item() == pytest.approx(loss_f.item(), rel=1e-4)
    result = cached.train()
    assert result.steps == 2 and result.data_counts["desirable"] == 2

    with pytest.raises(ConfigError, match=r"objective.name=dpo needs preference pairs.*cache.dir="):
        Trainer(make_cfg("sd15", f"cache.dir={tmp_path / 'cache'}", "data.path=toy:unpaired?n=8&desirable=25"),
                show_progress=False)
    other = make_cfg("sd15", *KTO, f"cache.dir={tmp_path / 'cache'}", "data.label_column=thumbs")
    with pytest.raises(CacheMismatchError):  # another label column reads other labels (here: no such column)
        Trainer(other, show_progress=False).setup()


def test_cli_caches_and_trains_the_unpaired_recipe(capsys, tiny_model, tmp_path):
    from pathlib import Path

    from diffalign.cli import main

    # the recipe by its file (configs/ is installed as diffalign.configs, which may point at another checkout)
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-sd15-kto-unpaired.yaml")
    common = [f"model.pretrained={tiny_model('sd15')}", f"cache.dir={tmp_path / 'cache'}"]
    assert main(["cache", recipe, *common]) == 0
    out = capsys.readouterr().out
    assert "20 labelled images encoded from 20 rows (6 desirable, 14 undesirable)" in out
    assert main(["train", recipe, *common, "train.max_steps=2", "train.checkpoint_every=0",
                 f"train.output_dir={tmp_path / 'run'}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "20 labelled images used (6 desirable, 14 undesirable)" in out
    assert "lambda_D=1.667, lambda_U=0.7143" in out  # kto_balance: 20/(2·6), 20/(2·14)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["samples"] == 20 and math.isfinite(summary["final_metrics"]["loss"])
