"""A tiny synthetic Pick-a-Pic dataset for tiny recipes and tests (no download, byte-deterministic).

Each pair's caption names a shape and two colours, e.g. "a red square on a blue background". The
WINNER draws exactly that; the LOSER draws the same shape in wrong colours, or is a noisy copy of
the winner. The winner sits in slot 0 or slot 1 at random (``label_0`` = 1 or 0, ``label_1`` =
1 - ``label_0``), so loaders must swap correctly. ``ties`` extra rows have ``label_0`` = 0.5.
With ``scores=True`` (``toy:pairs?scores=1``) the file also has reward columns ``score_0``/``score_1`` in
[0, 1] like the world's pairs parquet: the winner's score is drawn from U(0.6, 1), the loser's from
U(0, 0.4) (a tie's two images share one score), from a separate random stream so the pictures are the
same as without scores.
``toy:unpaired?n=16&desirable=50`` (:func:`write_toy_unpaired`) is the unpaired counterpart for Diffusion-KTO: one
image per row (a pair's winner, labelled desirable, or its loser, undesirable) with ``desirable`` percent desirable.
The file is a function of the arguments only: same arguments, same bytes (verified by the tests).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from diffalign.data.preference import DataError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("square", "circle")
_TOY_VERSION = 1  # bump when the pictures change, so cached toy files are rewritten under a new name


def _draw(size: int, shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int],
          rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    side = max(2, size // 2)
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    box = (left, top, left + side - 1, top + side - 1)
    draw = ImageDraw.Draw(img)
    if shape == "square":
        draw.rectangle(box, fill=fg)
    else:
        draw.ellipse(box, fill=fg)
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)  # libjpeg is deterministic for fixed settings
    return buf.getvalue()


def _wrong(rng: np.random.Generator, *avoid: str) -> str:
    names = [c for c in COLOURS if c not in avoid]
    return names[int(rng.integers(len(names)))]


def _toy_pair(rng: np.random.Generator, size: int) -> tuple[str, Image.Image, Image.Image]:
    """(caption, winner, loser): the winner draws the caption; the loser wrong colours or a noisy copy."""
    names = list(COLOURS)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    fg, bg = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    caption = f"a {fg} {shape} on a {bg} background"
    winner = _draw(size, shape, COLOURS[fg], COLOURS[bg], rng)
    if rng.random() < 0.5:  # wrong colours
        wfg = _wrong(rng, fg)
        loser = _draw(size, shape, COLOURS[wfg], COLOURS[_wrong(rng, bg, wfg)], rng)
    else:  # right colours, heavy noise
        noise = rng.normal(0.0, 80.0, size=(size, size, 3))
        arr = np.clip(np.asarray(winner, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        loser = Image.fromarray(arr, "RGB")
    return caption, winner, loser


def _write_atomic(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, str(tmp), compression="snappy")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_toy_unpaired(path: str | Path, n: int = 16, size: int = 32, seed: int = 0,
                       desirable_percent: int = 50) -> Path:
    """Write an unpaired labelled-image parquet (Diffusion-KTO data: ``image`` JPEG q95 bytes, ``caption``,
    ``label`` = "desirable" / "undesirable") with ``n`` rows; returns the path.

    Row i draws one toy pair (:func:`write_toy_pairs`' pictures) and keeps ONLY its winner (labelled desirable)
    or ONLY its loser (undesirable), so no two rows form a pair. Exactly ``round(n * desirable_percent / 100)``
    rows are desirable, at positions drawn from the seed (an unbalanced set exercises KTO's λ_D / λ_U).
    """
    if n < 1 or size < 4 or not 0 <= desirable_percent <= 100:
        raise ValueError(f"need n >= 1, size >= 4, 0 <= desirable_percent <= 100; got n={n}, size={size}, "
                         f"desirable_percent={desirable_percent}")
    rng = np.random.default_rng([seed, 2])
    good = set(rng.permutation(n)[: int(round(n * desirable_percent / 100))].tolist())
    images, captions, labels = [], [], []
    for i in range(n):
        caption, winner, loser = _toy_pair(rng, size)
        images.append(_jpeg(winner if i in good else loser))
        captions.append(caption)
        labels.append("desirable" if i in good else "undesirable")
    table = pa.table({"image": pa.array(images, type=pa.binary()), "caption": pa.array(captions, type=pa.string()),
                      "label": pa.array(labels, type=pa.string())})
    return _write_atomic(table, path)


def write_toy_pairs(path: str | Path, n_pairs: int = 16, size: int = 32, seed: int = 0, ties: int = 0,
                    scores: bool = False) -> Path:
    """Write a Pick-a-Pic-format parquet (``jpg_0``, ``jpg_1`` JPEG q95 bytes, ``label_0``, ``label_1``,
    ``caption``; plus ``score_0``, ``score_1`` when ``scores``) with ``n_pairs`` preference pairs plus
    ``ties`` tied rows; returns the path.

    Written to a temporary file and renamed into place, so concurrent writers never leave a torn file.
    """
    if n_pairs < 1 or size < 4 or ties < 0:
        raise ValueError(f"need n_pairs >= 1, size >= 4, ties >= 0; got n_pairs={n_pairs}, size={size}, ties={ties}")
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows: list[tuple[bytes, bytes, float, str]] = []
    for _ in range(n_pairs):
        caption, winner, loser = _toy_pair(rng, size)
        w, l = _jpeg(winner), _jpeg(loser)
        if rng.random() < 0.5:
            rows.append((w, l, 1.0, caption))
        else:
            rows.append((l, w, 0.0, caption))
    for _ in range(ties):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        fg, bg = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        a = _jpeg(_draw(size, shape, COLOURS[fg], COLOURS[bg], rng))
        b = _jpeg(_draw(size, shape, COLOURS[fg], COLOURS[bg], rng))
        pos = int(rng.integers(len(rows) + 1))  # ties interleaved, as in real data
        rows.insert(pos, (a, b, 0.5, f"a {fg} {shape} on a {bg} background"))

    columns = {
        "jpg_0": pa.array([r[0] for r in rows], type=pa.binary()),
        "jpg_1": pa.array([r[1] for r in rows], type=pa.binary()),
        "label_0": pa.array([r[2] for r in rows], type=pa.float64()),
        "label_1": pa.array([1.0 - r[2] for r in rows], type=pa.float64()),
        "caption": pa.array([r[3] for r in rows], type=pa.string()),
    }
    if scores:
        srng = np.random.default_rng([seed, 1])  # its own stream: the pictures do not depend on `scores`
        s0, s1 = [], []
        for r in rows:
            win, lose = float(srng.uniform(0.6, 1.0)), float(srng.uniform(0.0, 0.4))
            a, b = (win, lose) if r[2] == 1.0 else (lose, win) if r[2] == 0.0 else (win, win)
            s0.append(round(a, 4))
            s1.append(round(b, 4))
        columns["score_0"] = pa.array(s0, type=pa.float64())
        columns["score_1"] = pa.array(s1, type=pa.float64())
    return _write_atomic(pa.table(columns), path)


def resolve_toy_path(spec: str, cache_root: str | Path) -> Path:
    """Map ``toy:pairs`` (optionally ``toy:pairs?n=32&size=32&seed=0&ties=0&scores=1``) or ``toy:unpaired``
    (optionally ``?n=16&size=32&seed=0&desirable=50``) to a parquet written once under ``cache_root/toy/`` and
    reused afterwards (the name encodes every parameter)."""
    kind, _, query = spec.partition("?")
    if kind not in ("toy:pairs", "toy:unpaired"):
        raise DataError(f"{spec}: unknown toy dataset {kind!r}; available: 'toy:pairs' "
                        "(options ?n=16&size=32&seed=0&ties=0&scores=0) and 'toy:unpaired' (labelled single images "
                        "for objective kto; options ?n=16&size=32&seed=0&desirable=50, desirable in percent).")
    params = ({"n": 16, "size": 32, "seed": 0, "ties": 0, "scores": 0} if kind == "toy:pairs"
              else {"n": 16, "size": 32, "seed": 0, "desirable": 50})
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in params:
            raise DataError(f"{spec}: unknown toy option {key!r}; options: {', '.join(params)}.")
        try:
            params[key] = int(value)
        except ValueError:
            raise DataError(f"{spec}: toy option {key} must be an integer, got {value!r}.") from None
    if kind == "toy:unpaired":
        file = (Path(cache_root) / "toy" / f"unpaired-v{_TOY_VERSION}-n{params['n']}-size{params['size']}"
                f"-seed{params['seed']}-desirable{params['desirable']}.parquet")
        if not file.is_file():
            try:
                write_toy_unpaired(file, n=params["n"], size=params["size"], seed=params["seed"],
                                   desirable_percent=params["desirable"])
            except ValueError as e:
                raise DataError(f"{spec}: {e}") from None
        return file
    if params["scores"] not in (0, 1):
        raise DataError(f"{spec}: toy option scores must be 0 or 1, got {params['scores']}.")
    suffix = "-scores" if params["scores"] else ""  # files without scores keep their old names
    file = (Path(cache_root) / "toy" /
            f"pairs-v{_TOY_VERSION}-n{params['n']}-size{params['size']}-seed{params['seed']}-ties{params['ties']}"
            f"{suffix}.parquet")
    if not file.is_file():
        write_toy_pairs(file, n_pairs=params["n"], size=params["size"], seed=params["seed"], ties=params["ties"],
                        scores=bool(params["scores"]))
    return file
