"""Preference pairs with PER-DIMENSION labels, for training reward models (``diffalign train-reward``).

A :class:`LabelledPairs` holds N pairs (A, B), a prompt each and labels [N, D] over named dimensions:
+1 = A preferred, -1 = B preferred, 0 = tie ("same"), with a mask [N, D] (False = no label; masked
entries are never read, see ``btt.py``). Media are either decoded images in memory (uint8
[N, H, W, 3]) or file paths (videos or images) read when a pair is used.

Sources (``data.path`` / ``data.val_path`` of the train-reward config; a list concatenates):

* a VideoAlign-style ``.csv`` (:func:`read_videoalign_csv`): columns ``path_A``, ``path_B``, ``prompt``,
  one column per dimension (``VQ``, ``MQ``, ``TA`` by default) holding ``A`` / ``B`` / ``same`` (``tie``
  is accepted; case-insensitive); an empty cell (or nan/none/null/-) is a missing label, masked out.
  Optional ``fps_A`` / ``fps_B`` override the files' own frame rates. Relative paths resolve against
  ``data.root`` or else the CSV's folder. A missing file, a bad label or a bad fps is a ``DataError``
  naming the file, the 0-based row (the header is not a row) and the column.
* a world-pairs parquet (:func:`read_world_pairs`; ``diffalign world pairs`` / ``make_pairs`` /
  ``make_render_pairs`` write it): Pick-a-Pic columns plus per-dimension oracle scores ``{dim}_0``,
  ``{dim}_1``; a dimension's label is A/B when the two scores differ by MORE than ``tie_margin``,
  else a tie.
* ``world:renders?split=train&per_caption=4&seed=0&change_prob=0.35&noise=12&jitter=0.04&minimal=0&blur=0&warp=0``
  renders pairs of the embedded world in memory (``diffalign.world.pairs.render_pairs``; ``minimal`` = fraction
  of pairs that differ in exactly one attribute; ``blur`` = max per-image Gaussian blur std in pixels; ``warp`` = max RMS of a smooth random
  displacement field in pixels, for generator-like irregular shapes),
  labelled like the parquet.
* ``world:video-renders?split=train&per_caption=4&seed=0&frames=8&fps=8&change_prob=0.2&motion_prob=0.5&appearance_prob=0.3&minimal=0.5&noise=12&blur=0.6&jitter=0.04``
  renders pairs of video-world clips in memory (``diffalign.world.video_pairs.video_pairs``: the caption's
  clip with changed attributes, motion faults such as jitter / shuffled / repeated frames / wrong speed or
  direction, and appearance faults such as colour or size flicker), labelled per dimension by the video
  oracle mapped to VQ / MQ / TA (``diffalign.world.video_oracle.videoreward_scores``; a tie when the two
  scores differ by <= ``tie_margin``). Clips are uint8 [N, F, H, W, 3] held in ``images_a``/``images_b``
  with their real frame rate ``fps`` in ``fps_a``/``fps_b``, so frames are sampled by time. ``split`` is
  the VIDEO world's split (``video_prompt_splits``: 720 train / 432 held-out captions).
* ``world:samples?model=world:flow&split=train&prompts=192&k=4&seed=0&steps=15`` samples a world
  generator and keeps every within-prompt pair (``make_pairs(pairing="all")``); the parquet is cached
  under ``$DIFFALIGN_HOME/world-pairs`` (sampling on a CPU takes minutes). ``model=world:video`` (or any
  WanPipeline world folder; the family is read from its model_index.json) samples the VIDEO world's
  generator on the video prompt split: clips labelled by the video oracle incl. VQ / MQ / TA, cached as
  a folder of GIFs + ``pairs.jsonl`` (:func:`read_world_video_pairs`), held in memory with their fps.

``split`` picks the world's prompt split: ``train`` (510 captions) or ``heldout`` (210, including every
scene of three colour-shape combinations never seen in training).
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qsl

import numpy as np
import torch

from diffalign.data.preference import DataError

LABEL_VALUES: dict[str, int] = {"a": 1, "b": -1, "same": 0, "tie": 0}
MISSING_VALUES = frozenset({"", "nan", "none", "null", "-", "na", "n/a"})
VIDEOALIGN_DIMENSIONS: tuple[str, ...] = ("VQ", "MQ", "TA")


@dataclass
class LabelledPairs:
    """N preference pairs with per-dimension labels.

    images_a / images_b: uint8 [N, H, W, 3] (in-memory images), uint8 [N, F, H, W, 3] (in-memory clips,
    with their real frame rates in fps_a / fps_b) or None when media come from files;
    paths_a / paths_b: list[str] of N files (videos or images) or None; fps_a / fps_b: N floats or None
    (None = use the file's own rate); prompts: N strings; labels: int8 [N, D] (+1 A, -1 B, 0 tie);
    mask: bool [N, D]; dimensions: D names; rows: source row of each pair (for messages); groups: a
    name per pair saying which source it came from (evaluation is also reported per group).
    """

    dimensions: tuple[str, ...]
    prompts: list[str]
    labels: torch.Tensor
    mask: torch.Tensor
    images_a: np.ndarray | None = None
    images_b: np.ndarray | None = None
    paths_a: list[str] | None = None
    paths_b: list[str] | None = None
    fps_a: list[float | None] | None = None
    fps_b: list[float | None] | None = None
    rows: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    source: str = ""
    dropped_unlabelled: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def in_memory(self) -> bool:
        return self.images_a is not None

    def subset(self, index: Sequence[int]) -> "LabelledPairs":
        """The pairs at ``index`` (a list of positions), same dimensions."""
        idx = list(index)
        pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
        return LabelledPairs(
            self.dimensions, [self.prompts[i] for i in idx], self.labels[idx], self.mask[idx],
            None if self.images_a is None else self.images_a[idx], None if self.images_b is None else self.images_b[idx],
            pick(self.paths_a), pick(self.paths_b), pick(self.fps_a), pick(self.fps_b),
            [self.rows[i] for i in idx] if self.rows else [], [self.groups[i] for i in idx] if self.groups else [],
            self.source, 0)

    def label_counts(self) -> dict[str, dict[str, int]]:
        """{dimension: {"A": n, "B": n, "same": n, "missing": n}} for the summary."""
        out = {}
        for j, d in enumerate(self.dimensions):
            m, y = self.mask[:, j], self.labels[:, j]
            out[d] = {"A": int((m & (y > 0)).sum()), "B": int((m & (y < 0)).sum()),
                      "same": int((m & (y == 0)).sum()), "missing": int((~m).sum())}
        return out


def concat_pairs(parts: Sequence[LabelledPairs]) -> LabelledPairs:
    """Concatenate sources with the same dimensions and the same storage (all in memory or all files)."""
    if not parts:
        raise DataError("no preference data: data.path is empty")
    if len(parts) == 1:
        return parts[0]
    dims = parts[0].dimensions
    for p in parts[1:]:
        if p.dimensions != dims:
            raise DataError(f"sources label different dimensions: {p.source} has {p.dimensions}, {parts[0].source} has {dims}")
        if p.in_memory != parts[0].in_memory:
            raise DataError(f"cannot mix in-memory image pairs ({parts[0].source}) with file pairs ({p.source}) in one "
                            "split; use one kind per split")
    cat = lambda name: sum((list(getattr(p, name)) for p in parts), [])  # noqa: E731
    in_mem = parts[0].in_memory
    shapes = {p.images_a.shape[1:] for p in parts} if in_mem else set()
    if len(shapes) > 1:
        raise DataError(f"image sources have different image sizes {sorted(shapes)}")
    return LabelledPairs(
        dims, cat("prompts"), torch.cat([p.labels for p in parts]), torch.cat([p.mask for p in parts]),
        np.concatenate([p.images_a for p in parts]) if in_mem else None,
        np.concatenate([p.images_b for p in parts]) if in_mem else None,
        None if in_mem else cat("paths_a"), None if in_mem else cat("paths_b"),
        _cat_fps(parts, "fps_a"), _cat_fps(parts, "fps_b"),
        cat("rows"), cat("groups"), " + ".join(p.source for p in parts), sum(p.dropped_unlabelled for p in parts))


def _cat_fps(parts: Sequence[LabelledPairs], name: str) -> list[float | None] | None:
    """Concatenated frame rates (None for parts without any, e.g. in-memory images); None if no part has any."""
    if all(getattr(p, name) is None for p in parts):
        return None
    return sum((list(getattr(p, name)) if getattr(p, name) is not None else [None] * len(p) for p in parts), [])


# --------------------------------------------------------------------------------------------- labels

def parse_label(value: object, *, where: str) -> int | None:
    """'A' -> +1, 'B' -> -1, 'same'/'tie' -> 0 (case-insensitive), empty/NaN -> None (missing).

    Anything else raises DataError naming ``where`` (file, row and column) and the accepted values.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    if text in MISSING_VALUES:
        return None
    if text in LABEL_VALUES:
        return LABEL_VALUES[text]
    raise DataError(f"{where}: label {value!r} is not one of A, B, same (or tie); leave the cell empty for a "
                    "missing label")


def labels_from_scores(s_a: np.ndarray, s_b: np.ndarray, tie_margin: float) -> np.ndarray:
    """int8 [N]: +1 where s_a - s_b > tie_margin, -1 where < -tie_margin, else 0 (a tie)."""
    if tie_margin < 0:
        raise DataError(f"data.tie_margin must be >= 0, got {tie_margin}")
    diff = np.asarray(s_a, dtype=np.float64) - np.asarray(s_b, dtype=np.float64)
    return np.where(diff > tie_margin, 1, np.where(diff < -tie_margin, -1, 0)).astype(np.int8)


def _drop_unlabelled(pairs: LabelledPairs) -> LabelledPairs:
    keep = pairs.mask.any(dim=1)
    if bool(keep.all()):
        return pairs
    out = pairs.subset(torch.nonzero(keep).flatten().tolist())
    out.dropped_unlabelled = int((~keep).sum())
    return out


# --------------------------------------------------------------------------------------------- VideoAlign CSV

def read_videoalign_csv(path: str | Path, dimensions: Sequence[str] = VIDEOALIGN_DIMENSIONS, *,
                        root: str | Path | None = None, check_files: bool = True) -> LabelledPairs:
    """Read a VideoAlign training CSV (see the module docstring) into file-backed LabelledPairs.

    Rows without any label are dropped and counted (``dropped_unlabelled``); every other problem is a
    DataError naming the file, the 0-based row and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    base = Path(root) if root else path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        required = ["path_A", "path_B", "prompt", *dimensions]
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; a VideoAlign CSV has path_A, path_B, prompt, "
                            f"{', '.join(dimensions)} (labels A/B/same) and optionally fps_A, fps_B. Found: {columns}")
        prompts, paths_a, paths_b, fps_a, fps_b, rows, labels, mask = [], [], [], [], [], [], [], []
        for row, rec in enumerate(reader):
            where = f"{path}: row {row} (line {reader.line_num})"
            files = []
            for col in ("path_A", "path_B"):
                value = (rec.get(col) or "").strip()
                if not value:
                    raise DataError(f"{where}, column '{col}': empty path")
                p = Path(value).expanduser()
                p = p if p.is_absolute() else base / p
                if check_files and not p.is_file():
                    raise DataError(f"{where}, column '{col}': file not found: {p} (relative paths resolve against "
                                    f"{'data.root' if root else 'the CSV file folder'} {base})")
                files.append(str(p))
            prompt = rec.get("prompt")
            if prompt is None or not str(prompt).strip():
                raise DataError(f"{where}, column 'prompt': empty prompt")
            fps = []
            for col in ("fps_A", "fps_B"):
                raw = (rec.get(col) or "").strip() if col in columns else ""
                if raw.lower() in MISSING_VALUES:
                    fps.append(None)
                    continue
                try:
                    value = float(raw)
                except ValueError:
                    value = float("nan")
                if not (math.isfinite(value) and value > 0):
                    raise DataError(f"{where}, column '{col}': fps {raw!r} is not a positive number (leave it empty to "
                                    "use the file's own frame rate)")
                fps.append(value)
            lab = [parse_label(rec.get(d), where=f"{where}, column '{d}'") for d in dimensions]
            prompts.append(str(prompt))
            paths_a.append(files[0])
            paths_b.append(files[1])
            fps_a.append(fps[0])
            fps_b.append(fps[1])
            rows.append(row)
            labels.append([0 if v is None else v for v in lab])
            mask.append([v is not None for v in lab])
    if not prompts:
        raise DataError(f"{path}: the CSV has a header but no rows")
    pairs = LabelledPairs(tuple(dimensions), prompts, torch.tensor(labels, dtype=torch.int8).view(-1, len(dimensions)),
                          torch.tensor(mask, dtype=torch.bool).view(-1, len(dimensions)),
                          paths_a=paths_a, paths_b=paths_b, fps_a=fps_a, fps_b=fps_b, rows=rows,
                          groups=[path.name] * len(prompts), source=str(path))
    return _drop_unlabelled(pairs)


# --------------------------------------------------------------------------------------------- world pairs

def _decode_png(data: bytes, *, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt data
        raise DataError(f"{where}: corrupt or unreadable image ({type(e).__name__}: {e})") from None


def world_pairs_from_scores(images_a: np.ndarray, images_b: np.ndarray, captions: list[str],
                            scores_a: dict[str, np.ndarray], scores_b: dict[str, np.ndarray],
                            dimensions: Sequence[str], tie_margin: float, *, source: str, group: str) -> LabelledPairs:
    """LabelledPairs from per-dimension oracle scores of in-memory images (labels by ``tie_margin``)."""
    for d in dimensions:
        if d not in scores_a or d not in scores_b:
            raise DataError(f"{source}: no oracle scores for dimension '{d}'; available: {sorted(scores_a)}")
    labels = np.stack([labels_from_scores(scores_a[d], scores_b[d], tie_margin) for d in dimensions], axis=1)
    n = len(captions)
    pairs = LabelledPairs(tuple(dimensions), list(captions), torch.from_numpy(labels).view(n, len(dimensions)),
                          torch.ones(n, len(dimensions), dtype=torch.bool), images_a=images_a, images_b=images_b,
                          rows=list(range(n)), groups=[group] * n, source=source)
    return pairs


def _world_pair_keys(dimensions: Sequence[str]) -> list[str]:
    """The columns (parquet) or keys (jsonl rows) every world-pairs table carries."""
    return ["jpg_0", "jpg_1", "caption"] + [f"{d}_{s}" for d in dimensions for s in (0, 1)]


def read_world_pairs(path: str | Path, dimensions: Sequence[str], tie_margin: float) -> LabelledPairs:
    """A world-pairs parquet (``{dim}_0``/``{dim}_1`` oracle scores per row) as in-memory LabelledPairs.

    jpg_0 is A, jpg_1 is B. A missing score column is a DataError naming it; a NaN score masks that
    dimension of that row.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such parquet file")
    table = pq.read_table(path)
    cols = table.column_names
    missing = [c for c in _world_pair_keys(dimensions) if c not in cols]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; world pairs carry jpg_0, jpg_1, caption and the oracle "
                        f"scores <dim>_0, <dim>_1 of both images (diffalign world pairs writes them)")
    data = table.to_pydict()
    n = len(data["caption"])
    images_a = np.stack([_decode_png(b, where=f"{path}: row {i}, column 'jpg_0'") for i, b in enumerate(data["jpg_0"])])
    images_b = np.stack([_decode_png(b, where=f"{path}: row {i}, column 'jpg_1'") for i, b in enumerate(data["jpg_1"])])
    labels, mask = [], []
    for d in dimensions:
        s0 = np.array([np.nan if v is None else v for v in data[f"{d}_0"]], dtype=np.float64)
        s1 = np.array([np.nan if v is None else v for v in data[f"{d}_1"]], dtype=np.float64)
        ok = np.isfinite(s0) & np.isfinite(s1)
        labels.append(labels_from_scores(np.where(ok, s0, 0), np.where(ok, s1, 0), tie_margin))
        mask.append(ok)
    pairs = LabelledPairs(tuple(dimensions), [str(c) for c in data["caption"]],
                          torch.from_numpy(np.stack(labels, 1)).view(n, len(dimensions)),
                          torch.from_numpy(np.stack(mask, 1)).view(n, len(dimensions)),
                          images_a=images_a, images_b=images_b, rows=list(range(n)), groups=[path.stem] * n,
                          source=str(path))
    return _drop_unlabelled(pairs)


def read_world_video_pairs(path: str | Path, dimensions: Sequence[str], tie_margin: float) -> LabelledPairs:
    """A video world-pairs ``.jsonl`` (``make_pairs`` on the video generator: ``jpg_0``/``jpg_1`` are clip
    files relative to the table, plus ``{dim}_0``/``{dim}_1`` oracle scores, VQ / MQ / TA included) as
    in-memory clips [N, F, H, W, 3] at the files' frame rate. jpg_0 is A, jpg_1 is B."""
    import json

    from diffalign.rewards.media import load_video, to_uint8_frames

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such .jsonl file")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    need = _world_pair_keys(dimensions)
    for i, row in enumerate(rows):
        missing = [c for c in need if c not in row]
        if missing:
            raise DataError(f"{path}: row {i}: missing key(s) {missing}; video world pairs carry jpg_0, jpg_1, caption "
                            f"and the oracle scores <dim>_0, <dim>_1 (make_pairs on world:video writes them)")
    clips, fps = {0: [], 1: []}, {0: [], 1: []}
    for i, row in enumerate(rows):
        for slot in (0, 1):
            file = path.parent / row[f"jpg_{slot}"]
            try:
                frames, rate = load_video(file)
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad row, named
                raise DataError(f"{path}: row {i}, column 'jpg_{slot}': cannot read {file} ({e})") from None
            clips[slot].append(np.asarray(to_uint8_frames(frames)))
            fps[slot].append(float(rate))
    scores = {slot: {d: np.array([row[f"{d}_{slot}"] for row in rows], dtype=np.float64) for d in dimensions}
              for slot in (0, 1)}
    empty = np.zeros((0, 1, 1, 1, 3), np.uint8)
    pairs = world_pairs_from_scores(np.stack(clips[0]) if rows else empty, np.stack(clips[1]) if rows else empty,
                                    [str(r["caption"]) for r in rows], scores[0], scores[1], dimensions, tie_margin,
                                    source=str(path), group=path.parent.name)
    pairs.fps_a, pairs.fps_b = fps[0], fps[1]
    return _drop_unlabelled(pairs)


def _world_captions(split: str, prompts: int | None, seed: int, kind: str = "flow") -> list[str]:
    """Captions of the world of generator ``kind`` ('unet'/'flow': images, 'video': clips), split as the demo
    splits them; ``prompts`` of them (seeded subset, original order kept) when given."""
    from diffalign.world.demo import world_spec

    if split not in ("train", "heldout"):
        raise DataError(f"world source: split={split!r} must be 'train' or 'heldout'")
    train, heldout = world_spec(kind).splits()
    caps = [s.caption() for s in (train if split == "train" else heldout)]
    if prompts is not None and prompts < len(caps):
        order = np.random.default_rng(seed).permutation(len(caps))[:prompts]
        caps = [caps[i] for i in sorted(order)]
    return caps


def _parse_query(spec: str, allowed: dict[str, type]) -> dict:
    kind, _, query = spec.partition("?")
    out = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            raise DataError(f"{spec}: unknown option '{key}' for {kind}; options: {', '.join(allowed)}")
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise DataError(f"{spec}: option {key}={value!r} is not a valid {allowed[key].__name__}") from None
    return out


def world_render_source(spec: str, dimensions: Sequence[str], tie_margin: float) -> LabelledPairs:
    """``world:renders?...`` (see the module docstring): render pairs generated in memory."""
    from diffalign.world.pairs import render_pairs

    opts = _parse_query(spec, {"split": str, "per_caption": int, "seed": int, "prompts": int, "change_prob": float,
                               "noise": float, "jitter": float, "minimal": float, "blur": float,
                               "warp": float})
    caps = _world_captions(opts.get("split", "train"), opts.get("prompts"), opts.get("seed", 0))
    r = render_pairs(caps, per_caption=opts.get("per_caption", 4), seed=opts.get("seed", 0),
                     change_prob=opts.get("change_prob", 0.35), jitter=opts.get("jitter", 0.04),
                     noise_std=opts.get("noise", 12.0), minimal=opts.get("minimal", 0.0),
                     blur=opts.get("blur", 0.0), warp=opts.get("warp", 0.0))
    group = f"renders-{opts.get('split', 'train')}"
    return _drop_unlabelled(world_pairs_from_scores(r["images_0"], r["images_1"], r["captions"], r["scores_0"],
                                                    r["scores_1"], dimensions, tie_margin, source=spec, group=group))


def world_video_render_source(spec: str, dimensions: Sequence[str], tie_margin: float) -> LabelledPairs:
    """``world:video-renders?...`` (see the module docstring): video-world clip pairs rendered in memory."""
    from diffalign.world.video_pairs import video_pairs

    opts = _parse_query(spec, {"split": str, "per_caption": int, "seed": int, "prompts": int, "change_prob": float,
                               "motion_prob": float, "appearance_prob": float, "minimal": float, "noise": float,
                               "blur": float, "jitter": float, "frames": int, "fps": float, "size": int})
    fps = opts.pop("fps", 8.0)
    if not (math.isfinite(fps) and fps > 0):
        raise DataError(f"{spec}: fps must be a positive number, got {fps}")
    split, prompts = opts.pop("split", "train"), opts.pop("prompts", None)
    caps = _world_captions(split, prompts, opts.get("seed", 0), kind="video")
    try:
        r = video_pairs(caps, **opts)
    except ValueError as e:
        raise DataError(f"{spec}: {e}") from None
    pairs = world_pairs_from_scores(r["clips_0"], r["clips_1"], r["captions"], r["scores_0"], r["scores_1"],
                                    dimensions, tie_margin, source=spec, group=f"video-renders-{split}")
    pairs.fps_a = [float(fps)] * len(pairs)
    pairs.fps_b = [float(fps)] * len(pairs)
    return _drop_unlabelled(pairs)


def world_sample_source(spec: str, dimensions: Sequence[str], tie_margin: float, *, show_progress: bool = True) -> LabelledPairs:
    """``world:samples?...``: all within-prompt pairs of generator samples, parquet cached by its options."""
    from diffalign.paths import diffalign_home

    opts = _parse_query(spec, {"model": str, "split": str, "prompts": int, "k": int, "seed": int, "steps": int,
                               "guidance": float})
    model = opts.get("model", "world:flow")
    split, k, seed = opts.get("split", "train"), opts.get("k", 4), opts.get("seed", 0)
    steps, guidance = opts.get("steps", 15), opts.get("guidance", 3.0)
    from diffalign.world.pairs import generator_family

    family = generator_family(model)
    video = family == "wan"  # the video world's generator: clips, its own prompt split, GIF files + .jsonl
    caps = _world_captions(split, opts.get("prompts"), seed, kind="video" if video else "flow")
    key = hashlib.sha256(repr((model, split, len(caps), caps[:3], k, seed, steps, guidance, 1)).encode()).hexdigest()[:16]
    stem = diffalign_home() / "world-pairs" / f"{model.replace(':', '-').replace('/', '_')}-{split}-{key}"
    # video: a folder (pairs.jsonl + its clips), else one parquet; written under a temporary name and renamed,
    # so an interrupted run re-samples instead of reading half a file
    cache = stem / "pairs.jsonl" if video else stem.with_suffix(".parquet")
    if not cache.is_file():
        from diffalign.config import ModelConfig
        from diffalign.models import load_pipeline
        from diffalign.world.pairs import make_pairs

        pipe = load_pipeline(ModelConfig(family=family, pretrained=model))
        tmp = stem.with_name(stem.name + ".tmp") / "pairs.jsonl" if video else cache.with_suffix(".tmp.parquet")
        make_pairs(pipe, caps, tmp, k=k, seed=seed, steps=steps, guidance_scale=guidance, pairing="all",
                   show_progress=show_progress)
        (tmp.parent if video else tmp).replace(stem if video else cache)
    pairs = read_world_video_pairs(cache, dimensions, tie_margin) if video else read_world_pairs(cache, dimensions, tie_margin)
    pairs.source = f"{spec} (cached {cache})"
    pairs.groups = [f"samples-{model.split(':')[-1]}-{split}"] * len(pairs)
    return pairs


def load_labelled_pairs(spec: str | Sequence[str], dimensions: Sequence[str], *, tie_margin: float = 0.1,
                        root: str | None = None, max_pairs: int | None = None, show_progress: bool = True) -> LabelledPairs:
    """One source spec or a list of them (concatenated) -> LabelledPairs (see the module docstring)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    specs = [s for s in specs if s]
    if not specs:
        raise DataError("no preference data given (data.path / data.val_path is empty)")
    parts = []
    for s in specs:
        if s.startswith("world:video-renders"):
            parts.append(world_video_render_source(s, dimensions, tie_margin))
        elif s.startswith("world:renders"):
            parts.append(world_render_source(s, dimensions, tie_margin))
        elif s.startswith("world:samples"):
            parts.append(world_sample_source(s, dimensions, tie_margin, show_progress=show_progress))
        elif s.endswith(".csv"):
            parts.append(read_videoalign_csv(s, dimensions, root=root))
        elif s.endswith(".parquet"):
            parts.append(read_world_pairs(s, dimensions, tie_margin))
        else:
            raise DataError(f"data source {s!r}: expected a VideoAlign .csv, a world-pairs .parquet, "
                            "world:renders?..., world:video-renders?... or world:samples?...")
    pairs = concat_pairs(parts)
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs.subset(range(max_pairs))
    return pairs
