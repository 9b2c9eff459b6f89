"""Unpaired labelled images: the data Diffusion-KTO is made for (one image, its caption, a good/bad label per row).

Format (a ``.parquet`` file or folder of them, a ``datasets`` ``save_to_disk`` folder, a ``.jsonl`` or a ``.csv``):

    image    the image: encoded bytes or an HF Image struct (parquet / datasets), or a file path (relative paths
             resolve against the data file's folder); the column may also be called ``jpg``
    caption  the prompt (``data.caption_column``)
    label    desirable or undesirable (``data.label_column``, default ``label``), case-insensitive:
                 desirable:   desirable, true, 1 (also 1.0 / "1"), up, thumbs_up / thumbs up / thumbsup, 👍
                 undesirable: undesirable, false, 0 (also 0.0 / "0"), down, thumbs_down / thumbs down, 👎

A source is read as unpaired when it has the label column and ONE image column (``image`` or ``jpg``) and no
pair columns (``jpg_0``/``jpg_1``, ``image_0``/``image_1``, ``path_A``/``path_B``): :func:`detect_data_kind`
decides from the column names alone, before any row is read. Anything else is preference-pair data
(:mod:`diffalign.data.preference`).

Rules (the same as for pairs, see preference.py): rows are numbered from 0 in source order (blank .jsonl lines
and the .csv header are not rows; multi-file sources also name the file and its local row); a bad label value,
a missing or empty image, a missing file, a missing caption or (at decode time) a corrupt image raises a
:class:`~diffalign.data.preference.DataError` naming the file, the row, the column and the fix
(``data.on_error=raise``), or is skipped and counted (``data.on_error=skip``). There are no ties: a label is
binary, so 0.5 is a bad value, not a tie. ``data.max_pairs`` keeps the first N usable images. Video files are not
supported here (images only). Each image is augmented on its own (:meth:`JointTransform.single`, seeded per
(seed, index, epoch) like a pair).

Only objectives that train on single labelled images accept this data (``Objective.sample_fn``: Diffusion-KTO);
the others need pairs and refuse it before the model is loaded (:class:`diffalign.train.loop.Trainer`).
"""
from __future__ import annotations

import csv
import json
import logging
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import torch

from diffalign.data.preference import (
    _ABSENT, _BATCH_ROWS, _IMAGE_COLUMN_PAIRS, DataError, _hash_field, _parquet_files, _RowBuilder,
    _resolve_image, RowSource, dataset_key, decode_image, is_saved_dataset_folder, is_video_ref,
    load_saved_dataset,
)
from diffalign.data.transforms import JointTransform, pair_generator

logger = logging.getLogger(__name__)

PAIRS, UNPAIRED = "pairs", "unpaired"
IMAGE_COLUMNS = ("image", "jpg")  # the single-image column, first present wins
_PAIR_ONLY_COLUMNS = {c for pair in _IMAGE_COLUMN_PAIRS for c in pair} | {"path_A", "path_B"}

_DESIRABLE = {"desirable", "true", "1", "up", "thumbs_up", "thumbs up", "thumbsup", "thumbs-up", "👍"}
_UNDESIRABLE = {"undesirable", "false", "0", "down", "thumbs_down", "thumbs down", "thumbsdown", "thumbs-down", "👎"}
LABEL_HELP = "desirable/undesirable, true/false, 1/0, up/down or thumbs_up/thumbs_down"


def parse_binary_label(value: Any) -> bool | None:
    """True (desirable), False (undesirable), or None for anything that is not one of the accepted spellings
    (see the module docstring): numbers must be exactly 1 or 0, strings are matched case-insensitively."""
    if value is None or value is _ABSENT:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real):
        f = float(value)
        return True if f == 1.0 else False if f == 0.0 else None  # NaN and 0.5 fall through to None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _DESIRABLE:
            return True
        if text in _UNDESIRABLE:
            return False
        try:  # "1.0" / "0.0" as written by some CSV exporters
            f = float(text)
        except ValueError:
            return None
        return True if f == 1.0 else False if f == 0.0 else None
    return None


@dataclass(frozen=True)
class SampleRecord:
    """One usable labelled image: ``image`` is encoded bytes or an absolute file path; ``desirable`` its label;
    ``row`` its 0-based row in the source, for messages."""

    row: int
    caption: str
    image: bytes | str
    desirable: bool


@dataclass
class SampleCounts:
    """What happened to the rows of an unpaired source: read, kept (by class), bad rows skipped."""

    rows: int = 0
    desirable: int = 0
    undesirable: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return self.desirable + self.undesirable


@dataclass
class LabelledImageSource(RowSource):
    """The usable labelled images of one unpaired source (``records``: SampleRecord, ``counts``: SampleCounts), with
    the content fingerprint described on :class:`RowSource` (it keys the latent cache)."""

    kind: ClassVar[str] = UNPAIRED
    records: list[SampleRecord]
    counts: SampleCounts

    def count_dict(self) -> dict[str, int]:
        """{rows, samples, desirable, undesirable, skipped}: the run summary's data counts."""
        c = self.counts
        return {"rows": c.rows, "samples": c.samples, "desirable": c.desirable, "undesirable": c.undesirable,
                "skipped": len(c.skipped)}

    def summary(self) -> str:
        """One line for logs: rows read, images kept per class, bad rows skipped."""
        c = self.counts
        return (f"{self.name}: {c.rows} rows read, {c.samples} labelled images kept ({c.desirable} desirable, "
                f"{c.undesirable} undesirable), " + self._skipped_text())


# --------------------------------------------------------------------------------------------
# Which kind of data a path holds


def _column_names(spec: str, split: str) -> list[str] | None:
    """The column names of a local source without reading its rows; None when they cannot be known cheaply
    (a hub id, a missing path, an unreadable file: the pair loader then reports the problem)."""
    p = Path(spec).expanduser()
    try:
        if p.is_file():
            suffix = p.suffix.lower()
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(str(p)).schema_arrow.names)
            if suffix == ".jsonl":
                with open(p, encoding="utf-8") as fh:
                    for line in fh:
                        if line.strip():
                            obj = json.loads(line)
                            return list(obj) if isinstance(obj, dict) else None
                return None
            if suffix == ".csv":
                with open(p, encoding="utf-8-sig", newline="") as fh:
                    return [c for c in (next(csv.reader(fh), None) or []) if c is not None]
            return None
        if p.is_dir():
            if is_saved_dataset_folder(p):
                import datasets

                obj = datasets.load_from_disk(str(p))
                if isinstance(obj, datasets.DatasetDict):
                    obj = obj[split] if split in obj else None
                return list(obj.column_names) if obj is not None else None
            files = _parquet_files(p, split)
            if files:
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(str(files[0])).schema_arrow.names)
    except Exception:  # the real loader raises the properly worded error for a broken source
        return None
    return None


def is_unpaired_columns(names: Iterable[str], label_column: str = "label") -> bool:
    """True for unpaired labelled images: the label column and a single image column, no pair columns."""
    names = set(names)
    return (label_column in names and any(c in names for c in IMAGE_COLUMNS)
            and not names & _PAIR_ONLY_COLUMNS)


def detect_data_kind(path: str, split: str = "train", label_column: str = "label") -> str:
    """'unpaired' (labelled single images) or 'pairs' (preference pairs) for a resolved data path, from its column
    names alone (``toy:unpaired`` is unpaired, ``toy:pairs`` pairs; a hub id or a missing path counts as pairs)."""
    spec = str(path)
    if not spec.strip():  # Path("") is the working folder: never scan it (the loader reports the empty data.path)
        return PAIRS
    if spec.startswith("toy:"):
        return UNPAIRED if spec.partition("?")[0] == "toy:unpaired" else PAIRS
    names = _column_names(spec, split)
    return UNPAIRED if names is not None and is_unpaired_columns(names, label_column) else PAIRS


# --------------------------------------------------------------------------------------------
# Reading


class _SampleBuilder(_RowBuilder):
    """Applies the label / bad-row rules to labelled single images row by row."""

    def __init__(self, name: str, *, caption_column: str, label_column: str, on_error: str,
                 max_samples: int | None) -> None:
        super().__init__(name, caption_column=caption_column, on_error=on_error, limit=max_samples,
                         counts=SampleCounts(), hash_tag=b"diffalign-unpaired-v1\0")
        self.label_column = label_column
        self.records: list[SampleRecord] = []

    def add(self, caption: Any, label: Any, image: Any, image_column: str, base_dir: Path | None) -> None:
        row = self.counts.rows
        self.counts.rows += 1
        h = self.hash
        _hash_field(h, b"R", row.to_bytes(8, "little"))
        _hash_field(h, b"C", repr(caption).encode("utf-8", "replace"))
        _hash_field(h, b"L", repr(label).encode("utf-8", "replace"))
        ref, why = _resolve_image(image, base_dir, h)
        desirable = parse_binary_label(label)
        if desirable is None:
            shown = "missing" if label is _ABSENT else repr(label)
            extra = (" (a label is binary here: there are no ties in unpaired data)"
                     if isinstance(label, numbers.Real) and not isinstance(label, bool) and 0 < float(label) < 1 else "")
            return self._bad(row, f"column {self.label_column!r}: {shown} is not a label; use {LABEL_HELP}{extra}")
        if caption is None or caption is _ABSENT:
            return self._bad(row, f"column {self.caption_column!r}: caption is missing (None)")
        if not isinstance(caption, str):
            return self._bad(row, f"column {self.caption_column!r}: caption must be text, got "
                                  f"{type(caption).__name__} {caption!r}")
        if why is not None:
            return self._bad(row, f"column {image_column!r}: {why}")
        assert ref is not None
        if is_video_ref(ref):
            return self._bad(row, f"column {image_column!r}: {ref} is a video; unpaired data supports images only")
        self.records.append(SampleRecord(row=row, caption=caption, image=ref, desirable=desirable))
        if desirable:
            self.counts.desirable += 1
        else:
            self.counts.undesirable += 1
        return None

    def finish(self) -> LabelledImageSource:
        if self.counts.skipped:
            logger.warning("%s: skipped %d bad rows (on_error=skip); first: row %d: %s", self.name,
                           len(self.counts.skipped), *self.counts.skipped[0])
        source = LabelledImageSource(name=self.name, records=self.records, counts=self.counts,
                                     fingerprint=self.hash.hexdigest(), parts=tuple(self.parts))
        if not source.records:  # training on zero images "successfully" would be a silent wrong answer
            raise DataError(f"{source.summary()}. No usable labelled images: check the label column "
                            f"({self.label_column!r}: {LABEL_HELP}) and the skipped rows listed above.")
        return source


def _image_column(where: str, names: list[str], caption_column: str, label_column: str) -> str:
    """The single-image column; DataError listing the missing and present columns and the format."""
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    missing = ([] if image else ["image (or jpg)"]) + [c for c in (label_column, caption_column) if c not in names]
    if missing:
        raise DataError(
            f"{where}: missing required column(s): {', '.join(missing)}; columns present: "
            f"{', '.join(names) if names else '(none)'}. Unpaired labelled images need an image column 'image' (or "
            f"'jpg': bytes, or file paths in .jsonl/.csv), the label column (data.label_column={label_column!r}: "
            f"{LABEL_HELP}) and the caption column (data.caption_column={caption_column!r}).")
    assert image is not None
    return image


def _read_columns(b: _SampleBuilder, columns: Iterator[dict[str, list]], image: str, base_dir: Path | None) -> None:
    for cols in columns:
        for i in range(len(cols[image])):
            if b.full:
                return
            b.add(cols[b.caption_column][i], cols[b.label_column][i], cols[image][i], image, base_dir)


def _load_parquet(b: _SampleBuilder, files: list[Path]) -> None:
    import pyarrow.parquet as pq

    for file in files:
        if b.full:
            break
        try:
            pf = pq.ParquetFile(str(file))
        except Exception as exc:
            raise DataError(f"{file}: not a readable parquet file ({type(exc).__name__}: {exc}). "
                            "Re-download or rewrite the file.") from None
        names = list(pf.schema_arrow.names)
        image = _image_column(str(file), names, b.caption_column, b.label_column)
        if len(files) > 1:
            b.start_part(str(file))
        wanted = list(dict.fromkeys([image, b.caption_column, b.label_column]))
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted)
        _read_columns(b, ({n: batch.column(n).to_pylist() for n in wanted} for batch in batches), image, file.parent)


def _load_datasets_folder(b: _SampleBuilder, folder: Path, split: str) -> None:
    obj = load_saved_dataset(folder, split)
    image = _image_column(str(folder), list(obj.column_names), b.caption_column, b.label_column)
    wanted = list(dict.fromkeys([image, b.caption_column, b.label_column]))
    table = obj.select_columns(wanted).with_format("arrow")  # never decodes an Image feature: {"bytes", "path"}
    _read_columns(b, ({n: t.column(n).to_pylist() for n in wanted} for t in table.iter(batch_size=_BATCH_ROWS)),
                  image, folder)


def _load_jsonl(b: _SampleBuilder, file: Path) -> None:
    image: str | None = None
    for obj in b.jsonl_records(file):
        if image is None:  # the first record defines the columns
            image = _image_column(str(file), list(obj), b.caption_column, b.label_column)
        b.add(obj.get(b.caption_column, _ABSENT), obj.get(b.label_column, _ABSENT), obj.get(image, _ABSENT),
              image, file.parent)


def _load_csv(b: _SampleBuilder, file: Path) -> None:
    with open(file, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [c for c in (reader.fieldnames or []) if c is not None]
        image = _image_column(str(file), fields, b.caption_column, b.label_column)
        for rec in reader:
            if b.full:
                return
            # a short row leaves trailing cells as None (-> a bad row naming the column); an empty cell is ""
            b.add(rec.get(b.caption_column), rec.get(b.label_column), rec.get(image), image, file.parent)


def load_unpaired_source(path: str, *, split: str = "train", caption_column: str = "caption",
                         label_column: str = "label", on_error: str = "raise",
                         max_samples: int | None = None) -> LabelledImageSource:
    """Read unpaired labelled images (see the module docstring for the format and the rules).

    ``path``: a ``.parquet`` file or a folder of them, a ``datasets`` ``save_to_disk`` folder (``split`` picks a
    DatasetDict split), a ``.jsonl`` or a ``.csv`` (image paths relative to the file's folder). A ``toy:`` spec must
    already be resolved (:func:`diffalign.data.loading.resolve_data_path`). ``max_samples`` keeps the first N usable
    images.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
        raise DataError(f"data.max_pairs must be a positive integer or null, got {max_samples!r}")
    spec = str(path)
    b = _SampleBuilder(spec, caption_column=caption_column, label_column=label_column, on_error=on_error,
                       max_samples=None if max_samples is None else int(max_samples))
    p = Path(spec).expanduser()
    if p.is_dir():
        if is_saved_dataset_folder(p):
            _load_datasets_folder(b, p, split)
        else:
            files = _parquet_files(p, split)
            if not files:
                raise DataError(f"{spec}: folder has no *.parquet files and is not a datasets save_to_disk folder.")
            _load_parquet(b, files)
    elif p.is_file() and p.suffix.lower() in (".parquet", ".jsonl", ".csv"):
        {".parquet": lambda: _load_parquet(b, [p]), ".jsonl": lambda: _load_jsonl(b, p),
         ".csv": lambda: _load_csv(b, p)}[p.suffix.lower()]()
    else:
        raise DataError(f"{spec}: unpaired labelled images are read from a local .parquet file or folder, a datasets "
                        "save_to_disk folder, a .jsonl or a .csv; check data.path.")
    return b.finish()


# --------------------------------------------------------------------------------------------
# Torch dataset


class LabelledImageDataset(torch.utils.data.Dataset):
    """On-the-fly decoding + augmentation of a :class:`LabelledImageSource`.

    ``dataset[i]`` or ``dataset[(i, epoch)]`` returns ``pixels`` (float ``[3, R, R]`` in [-1, 1]), ``desirable``
    (bool scalar tensor), ``caption``, ``row`` and the SDXL micro-conditioning ``original_size`` /
    ``crop_top_left`` (LongTensor[2]). Augmentation is seeded by ``pair_generator(seed, i, epoch)``. An image that
    does not decode raises :class:`DataError` (``on_error='raise'``) or gives ``None`` (``'skip'``), which
    :func:`collate_samples` drops and counts.
    """

    def __init__(self, source: LabelledImageSource, transform: JointTransform, seed: int = 0,
                 on_error: str = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.source.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, epoch = dataset_key(key, len(self.source.records), "labelled images")
        rec = self.source.records[index]
        try:
            image = decode_image(rec.image, source=self.source.describe(rec.row), row=rec.row)
        except DataError as exc:
            if self.on_error == "raise":
                raise
            logger.warning("skipping image (data.on_error=skip): %s", exc)
            return None
        pixels, original, crop = self.transform.single(image, pair_generator(self.seed, index, epoch))
        return {"pixels": pixels, "desirable": torch.tensor(rec.desirable), "caption": rec.caption, "row": rec.row,
                "original_size": torch.tensor(original, dtype=torch.long),
                "crop_top_left": torch.tensor(crop, dtype=torch.long)}


_SAMPLE_TENSOR_KEYS = ("pixels", "desirable", "original_size", "crop_top_left")


def collate_samples(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch labelled images: tensors stacked (``desirable`` bool [B]), ``caption``/``row`` as lists, ``skipped`` =
    number of ``None`` items dropped. If every item was skipped: ``{"skipped": n, "pixels": None}`` (no ``row``)."""
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return {"skipped": skipped, "pixels": None}
    batch: dict[str, Any] = {key: torch.stack([item[key] for item in kept]) for key in _SAMPLE_TENSOR_KEYS}
    batch["caption"] = [item["caption"] for item in kept]
    batch["row"] = [item["row"] for item in kept]
    batch["skipped"] = skipped
    return batch
