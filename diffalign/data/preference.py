"""Preference-pair sources: Pick-a-Pic parquet, datasets folders, .jsonl/.csv of paths, hub ids.

Conventions:

* A source is read into :class:`PairRecord` objects that are already oriented: ``image_w`` is the
  winner, ``image_l`` the loser. Pick-a-Pic's ``label_0`` is the probability that ``jpg_0`` won:
  1 -> ``jpg_0`` wins, 0 -> ``jpg_1`` wins (the pair is swapped), 0.5 -> tie. Ties carry no
  preference; they are dropped and counted (``ties='drop'``) or are an error (``ties='error'``).
  The diffusers DPO script treats ties as wins for ``jpg_0``, a silent bug this module avoids.
* Rows are numbered from 0 in source order (a folder of parquet files is read in sorted file order
  and numbered continuously; messages then also name the file and its local row). In .jsonl files
  blank lines are not rows; in .csv files the header is not a row.
* Image bytes are not decoded at load time (Pick-a-Pic has ~1M pairs); :func:`decode_image` finds
  corrupt images when a pair is used, and :func:`validate_images` decodes all of them up front.
* Per-image reward scores (``score_columns``, from ``data.score_column``) are optional. When asked for,
  both columns must exist and every kept pair must hold two finite numbers; they are oriented with the
  pair (``score_w`` belongs to the winner) and enter the fingerprint. Without them nothing changes.
* Bad rows (bad label, empty image, missing file, missing caption, corrupt image) raise a
  :class:`DataError` naming the source and the row (``on_error='raise'``), or are skipped and
  counted in :attr:`SourceCounts.skipped` (``on_error='skip'``). Nothing bad is used silently.
* Video pairs: when a row's media are video files (.mp4/.gif/.webm/..., any of the formats above), the
  dataset needs ``num_frames`` and ``fps`` (``data.num_frames``/``data.fps``): each clip is decoded at its
  real frame rate (``diffalign.rewards.media.load_video``) and the first ``num_frames`` frames on screen at
  times k / fps are kept, so a 10 fps and a 30 fps file of the same motion give the same frames. A clip
  shorter than num_frames / fps seconds, an unreadable video, a missing file, or a pair mixing an image
  and a video is a bad row (DataError naming the file and the row, or counted under on_error=skip).
* VideoAlign CSVs (a .csv whose header has ``path_A`` and ``path_B``; see
  ``diffalign.rewards.data.read_videoalign_csv``, which parses them) become DPO pairs by a combination
  rule: score = sum_d w_d * (+1 A, -1 B, 0 same or missing) with ``dimension_weights`` (default VQ = MQ =
  TA = 1); score > 0 -> A won, < 0 -> B won, 0 -> a tie (dropped and counted, or an error with
  ties='error'). Optional ``fps_A``/``fps_B`` override a file's own frame rate; an optional ``num_frames``
  column is the frame count both clips must have (checked when the pair is decoded: a different count is a
  "length mismatch" naming the file and the row). Relative paths resolve against the CSV's folder. Video
  media are file paths; encoded video bytes inside a parquet are not supported.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from PIL import Image

from diffalign.data.transforms import JointTransform, pair_generator

logger = logging.getLogger(__name__)

_FIX = "Fix the row or set data.on_error=skip to skip bad rows (they are counted)."
_IMAGE_COLUMN_PAIRS = (("jpg_0", "jpg_1"), ("image_0", "image_1"))
_LOCAL_SUFFIXES = {".parquet", ".jsonl", ".csv", ".json", ".arrow"}
_ABSENT = object()  # a column that does not exist, as opposed to a None value
_BATCH_ROWS = 256


class DataError(ValueError):
    """Bad preference data; the message names the file, the 0-based row and the fix."""


@dataclass(frozen=True)
class PairRecord:
    """One usable pair, already oriented (``image_w`` won). Images are encoded bytes or an
    absolute file path; ``row`` is the 0-based row in the source, for messages."""

    row: int
    caption: str
    image_w: bytes | str
    image_l: bytes | str
    score_w: float | None = None  # reward of the winner / loser (data.score_column); None when not read
    score_l: float | None = None
    fps_w: float | None = None  # video pairs: frame-rate override of the winner / loser file (VideoAlign fps_A/B)
    fps_l: float | None = None
    source_frames: int | None = None  # video pairs: the frame count both files must have (VideoAlign num_frames)


@dataclass
class SourceCounts:
    """What happened to the rows of a source: read, kept, ties dropped, bad rows skipped."""

    rows: int = 0
    pairs: int = 0
    ties_dropped: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class RowSource:
    """What every loaded data source shares: its name, usable records, counts, content fingerprint and parts.

    ``fingerprint`` is a sha256 hex digest over every row read (caption, raw labels, image bytes, or
    path + size + mtime for file images): stable across runs, changed by any data change. It keys
    the latent cache. ``parts`` lists ``(file, first_row)`` for multi-file sources (for messages).
    """

    name: str
    records: list
    counts: Any  # SourceCounts / SampleCounts: .rows and .skipped at least
    fingerprint: str
    parts: tuple[tuple[str, int], ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, row: int) -> str:
        """The source label used in messages about ``row`` (names the file for multi-file sources)."""
        return _describe(self.name, self.parts, row)

    def _skipped_text(self) -> str:
        skipped = self.counts.skipped
        text = f"{len(skipped)} bad rows skipped"
        if skipped:
            row, reason = skipped[0]
            text += f" (first: row {row}: {reason})"
        return text


@dataclass
class PreferenceSource(RowSource):
    """The usable pairs of one source (``records``: PairRecord, ``counts``: SourceCounts)."""

    kind: ClassVar[str] = "pairs"  # vs "unpaired" (diffalign.data.unpaired.LabelledImageSource)
    records: list[PairRecord]
    counts: SourceCounts

    def summary(self) -> str:
        """One line for logs: rows read, pairs kept, ties dropped, bad rows skipped."""
        c = self.counts
        return (f"{self.name}: {c.rows} rows read, {c.pairs} pairs kept, {c.ties_dropped} ties dropped, "
                + self._skipped_text())


def _describe(name: str, parts: tuple[tuple[str, int], ...] | list[tuple[str, int]], row: int) -> str:
    if len(parts) <= 1:
        return name
    file, start = parts[0]
    for f, s in parts:
        if s > row:
            break
        file, start = f, s
    return f"{name} ({Path(file).name}, row {row - start} of that file)"


# --------------------------------------------------------------------------------------------
# Images


class _ImageProblem(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    # Transparent pixels go onto white: a plain convert("RGB") would expose whatever colour the
    # encoder stored under alpha=0 (often black), which is not what a viewer shows.
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # a copy even when already RGB, so the file can be closed


def _decode(ref: bytes | str) -> Image.Image:
    if isinstance(ref, str):
        if not os.path.isfile(ref):
            raise _ImageProblem(f"file not found: {ref}")
        opener: Any = ref
    elif isinstance(ref, (bytes, bytearray, memoryview)):
        if len(ref) == 0:
            raise _ImageProblem("empty image (0 bytes)")
        opener = io.BytesIO(bytes(ref))
    else:
        raise _ImageProblem(f"unsupported image reference of type {type(ref).__name__}")
    try:
        with Image.open(opener) as img:
            img.load()  # decode now: a truncated JPEG fails here, not inside a training step
            return _to_rgb(img)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise _ImageProblem(f"corrupt or unreadable image ({type(exc).__name__}: {exc})") from None


def decode_image(ref: bytes | str, *, source: str, row: int) -> Image.Image:
    """Decode encoded image bytes or an image file into a fully loaded RGB ``PIL.Image``.

    Raises :class:`DataError` ``"{source}: row {row}: corrupt or unreadable image ..."`` or
    ``"... file not found: PATH ..."`` with the fix.
    """
    try:
        return _decode(ref)
    except _ImageProblem as p:
        hint = _FIX
        if p.reason.startswith("file not found"):
            hint = ("Relative paths in .jsonl/.csv files resolve against that file's folder. " + _FIX)
        raise DataError(f"{source}: row {row}: {p.reason}. {hint}") from None


def is_video_ref(ref: Any) -> bool:
    """True for a file path whose suffix is a video format (.mp4, .gif, .webm, ...; see rewards.media)."""
    from diffalign.rewards.media import VIDEO_SUFFIXES

    return isinstance(ref, str) and Path(ref).suffix.lower() in VIDEO_SUFFIXES


def _decode_video(ref: bytes | str, num_frames: int, fps: float, file_fps: float | None = None,
                  source_frames: int | None = None):
    """uint8 [num_frames, H, W, 3]: the frames on screen at t_k = k / fps, k < num_frames (raises _ImageProblem).
    ``source_frames``: the file must hold exactly that many frames (at its own constant rate)."""
    from diffalign.rewards.media import MediaError, frame_indices_by_time, load_video, to_uint8_frames

    if not isinstance(ref, str):
        raise _ImageProblem(f"a video must be a file path, got {type(ref).__name__}")
    if not os.path.isfile(ref):
        raise _ImageProblem(f"file not found: {ref}")
    try:
        if file_fps is None and source_frames is None:
            frames, _ = load_video(ref, target_fps=fps)  # subsampled before the float conversion: small
        else:  # decode every frame: to count them, or to sample by time at the rate the row gives
            frames, real = load_video(ref)
            if source_frames is not None and len(frames) != source_frames:
                raise _ImageProblem(f"length mismatch: {ref} has {len(frames)} frames at {real:g} fps, the row's "
                                    f"num_frames says {source_frames}")
            idx, _ = frame_indices_by_time(len(frames), real if file_fps is None else file_fps, target_fps=fps)
            frames = frames[idx]
    except _ImageProblem:
        raise
    except MediaError as exc:
        raise _ImageProblem(f"corrupt or unreadable video ({exc})") from None
    except Exception as exc:  # anything else a decoder throws also means "cannot read"
        raise _ImageProblem(f"corrupt or unreadable video {ref} ({type(exc).__name__}: {exc})") from None
    if len(frames) < num_frames:
        raise _ImageProblem(
            f"video too short: {ref} lasts {len(frames)} frame(s) at data.fps={fps:g} ({len(frames) / fps:.3f} s), "
            f"data.num_frames={num_frames} needs {num_frames / fps:.3f} s; lower data.num_frames, raise data.fps "
            "or drop the clip")
    return to_uint8_frames(frames[:num_frames])


def decode_video(ref: bytes | str, *, source: str, row: int, num_frames: int, fps: float,
                 file_fps: float | None = None, source_frames: int | None = None):
    """A video file as uint8 ``[num_frames, H, W, 3]``, sampled by time at ``fps`` from its real frame rate
    (``file_fps`` overrides the file's own rate). Raises :class:`DataError` naming ``source``, ``row`` and the file."""
    try:
        return _decode_video(ref, num_frames, fps, file_fps, source_frames)
    except _ImageProblem as p:
        hint = _FIX
        if p.reason.startswith("file not found"):
            hint = "Relative paths in .jsonl/.csv files resolve against that file's folder. " + _FIX
        raise DataError(f"{source}: row {row}: {p.reason}. {hint}") from None


# --------------------------------------------------------------------------------------------
# Row rules, shared by every format


def _parse_label(value: Any) -> float | None:
    """A finite float, or None for anything that is not a number (None, NaN, bool, text)."""
    if value is None or isinstance(value, bool) or value is _ABSENT:
        return None
    if isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            return None
    elif isinstance(value, numbers.Real):
        out = float(value)
    else:
        return None
    return out if math.isfinite(out) else None


def _hash_field(h: "hashlib._Hash", tag: bytes, data: bytes) -> None:
    # Length-prefixed so that no two different rows can hash the same byte stream.
    h.update(tag + len(data).to_bytes(8, "little") + data)


def _resolve_image(value: Any, base_dir: Path | None, h: "hashlib._Hash") -> tuple[bytes | str | None, str | None]:
    """(reference, None) for a usable image value, or (None, reason); feeds the hash either way."""
    if isinstance(value, dict):  # HF datasets Image struct {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        value = data if data else path
    if value is None or value is _ABSENT:
        _hash_field(h, b"N", b"")
        return None, "empty image (None)"
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        _hash_field(h, b"B", data)
        return (data, None) if data else (None, "empty image (0 bytes)")
    if isinstance(value, str):
        if not value.strip():
            _hash_field(h, b"P", b"")
            return None, "empty image path"
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        path = os.path.abspath(p)
        try:
            st = os.stat(path)
        except OSError:
            _hash_field(h, b"P", path.encode())
            return None, f"file not found: {path}"
        # Path + size + mtime stands in for the bytes: hashing every file would read the dataset twice.
        _hash_field(h, b"P", f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        if not os.path.isfile(path):
            return None, f"not a file: {path}"
        return path, None
    _hash_field(h, b"X", repr(type(value)).encode())
    return None, f"unsupported image value of type {type(value).__name__}"


class _RowBuilder:
    """What every source reader shares, row by row: the bad-row rule (raise or skip and count), the row
    counter, the part (file) each row came from, the content hash, and the record limit. Subclasses add
    their rows (pairs here, labelled single images in ``unpaired``) to ``records``."""

    def __init__(self, name: str, *, caption_column: str, on_error: str, limit: int | None, counts: Any,
                 hash_tag: bytes) -> None:
        self.name = name
        self.caption_column = caption_column
        self.on_error = on_error
        self.limit = limit
        self.records: list = []
        self.counts = counts  # a SourceCounts / SampleCounts: .rows and .skipped at least
        self.parts: list[tuple[str, int]] = []
        self.hash = hashlib.sha256(hash_tag)

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.records) >= self.limit

    def start_part(self, file: str) -> int:
        """Register the next file of a multi-file source; returns its first row number."""
        self.parts.append((file, self.counts.rows))
        return self.counts.rows

    def _where(self, row: int) -> str:
        return _describe(self.name, self.parts, row)

    def _bad(self, row: int, reason: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{self._where(row)}: row {row}: {reason}. {_FIX}")
        self.counts.skipped.append((row, reason))

    def bad_raw(self, raw: str, reason: str) -> None:
        """A row that could not even be parsed (e.g. invalid JSON)."""
        row = self.counts.rows
        self.counts.rows += 1
        _hash_field(self.hash, b"R", row.to_bytes(8, "little"))
        _hash_field(self.hash, b"Z", raw.encode("utf-8", "replace"))
        self._bad(row, reason)

    def jsonl_records(self, file: Path) -> Iterator[dict[str, Any]]:
        """The JSON objects of a JSON-lines file, one per non-blank line, until the record limit is reached.

        A line that is not a JSON object is a bad row (raised or skipped and counted, per ``on_error``), named by
        its 1-based line number."""
        with open(file, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if self.full:
                    return
                if not line.strip():
                    continue  # blank lines are not rows
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    self.bad_raw(line, f"invalid JSON on line {line_no} ({exc.msg} at column {exc.colno})")
                    continue
                if not isinstance(obj, dict):
                    self.bad_raw(line, f"expected a JSON object on line {line_no}, got {type(obj).__name__}")
                    continue
                yield obj


def is_saved_dataset_folder(folder: Path) -> bool:
    """Whether ``folder`` is a ``datasets`` save_to_disk folder (a DatasetDict, or one Dataset)."""
    return (folder / "dataset_dict.json").is_file() or ((folder / "state.json").is_file()
                                                      and (folder / "dataset_info.json").is_file())


def load_saved_dataset(folder: Path, split: str) -> Any:
    """The ``split`` of a ``datasets`` save_to_disk folder (a Dataset, or one split of a DatasetDict)."""
    import datasets

    try:
        obj = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(f"{folder}: looks like a datasets save_to_disk folder but could not be loaded "
                        f"({type(exc).__name__}: {exc}).") from None
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"{folder}: split {split!r} not found; splits present: {', '.join(obj.keys())}. "
                            "Set data.split.")
        obj = obj[split]
    return obj


class _Builder(_RowBuilder):
    """Applies the label / tie / bad-row rules to preference pairs row by row."""

    def __init__(self, name: str, *, caption_column: str, ties: str, on_error: str, max_pairs: int | None,
                 score_columns: tuple[str, str] | None = None) -> None:
        super().__init__(name, caption_column=caption_column, on_error=on_error, limit=max_pairs,
                         counts=SourceCounts(), hash_tag=b"diffalign-preference-v1\0")
        self.score_columns = score_columns
        self.ties = ties
        self.records: list[PairRecord] = []

    def add_scored(self, row: int, caption: Any, score: float | None, path_a: Any, path_b: Any,
                   base_dir: Path | None, fps: tuple[float | None, float | None], labels: str,
                   source_frames: Any = None) -> None:
        """One VideoAlign row (``row`` = its 0-based row in the CSV) with its combined score; None or 0 = tie.
        ``labels`` is the row's raw labels, for the fingerprint and messages."""
        self.counts.rows = max(self.counts.rows, row + 1)
        h = self.hash
        _hash_field(h, b"R", row.to_bytes(8, "little"))
        _hash_field(h, b"C", repr(caption).encode("utf-8", "replace"))
        _hash_field(h, b"V", f"{labels}\0{fps!r}\0{source_frames!r}".encode())
        ref_a, why_a = _resolve_image(path_a, base_dir, h)
        ref_b, why_b = _resolve_image(path_b, base_dir, h)
        if not score:
            if self.ties == "error":
                raise DataError(f"{self._where(row)}: row {row}: tie (combined score 0 over {labels}): a tie carries "
                                "no preference. Change data.dimension_weights, remove the row, or set data.ties=drop "
                                "to drop ties (they are counted).")
            self.counts.ties_dropped += 1
            return None
        if why_a is not None:
            return self._bad(row, f"path_A: {why_a}")
        if why_b is not None:
            return self._bad(row, f"path_B: {why_b}")
        frames = None
        if source_frames is not None and str(source_frames).strip().lower() not in ("", "nan", "none", "null", "-"):
            try:
                frames = int(str(source_frames).strip())
            except ValueError:
                frames = 0
            if frames < 1 or str(frames) != str(source_frames).strip():
                return self._bad(row, f"num_frames: {source_frames!r} is not a positive whole number of frames "
                                      "(leave it empty to not check the clips' lengths)")
        if is_video_ref(ref_a) != is_video_ref(ref_b):
            return self._bad(row, f"path_A and path_B must both be videos or both images, got {ref_a} and {ref_b}")
        if score > 0:
            w, l, fw, fl = ref_a, ref_b, fps[0], fps[1]
        else:
            w, l, fw, fl = ref_b, ref_a, fps[1], fps[0]
        self.records.append(PairRecord(row=row, caption=str(caption), image_w=w, image_l=l, fps_w=fw, fps_l=fl,
                                       source_frames=frames))
        self.counts.pairs += 1

    def add(self, caption: Any, label_0: Any, label_1: Any, image_0: Any, image_1: Any,
            image_columns: tuple[str, str], base_dir: Path | None,
            scores: tuple[Any, Any] | None = None) -> None:
        """One source row; ``scores`` = the raw (slot 0, slot 1) values of ``score_columns`` when set."""
        row = self.counts.rows
        self.counts.rows += 1
        h = self.hash
        _hash_field(h, b"R", row.to_bytes(8, "little"))
        _hash_field(h, b"C", repr(caption).encode("utf-8", "replace"))
        _hash_field(h, b"L", repr(label_0).encode())
        _hash_field(h, b"M", b"" if label_1 is _ABSENT else repr(label_1).encode())
        if self.score_columns is not None:  # only then, so sources read without scores keep their fingerprint
            _hash_field(h, b"S", repr(scores).encode())
        ref_0, why_0 = _resolve_image(image_0, base_dir, h)
        ref_1, why_1 = _resolve_image(image_1, base_dir, h)

        l0 = _parse_label(label_0)
        if l0 is None or l0 not in (0.0, 0.5, 1.0):
            shown = "missing" if label_0 is _ABSENT else repr(label_0)
            return self._bad(row, f"label_0 must be 1 ({image_columns[0]} won), 0 ({image_columns[1]} won) "
                                  f"or 0.5 (tie), got {shown}")
        if label_1 is not _ABSENT:
            l1 = _parse_label(label_1)
            if l1 is None or abs(l0 + l1 - 1.0) > 1e-6:
                return self._bad(row, f"label_0 + label_1 must be 1, got label_0={label_0!r}, label_1={label_1!r}")
        if l0 == 0.5:
            if self.ties == "error":
                raise DataError(f"{self._where(row)}: row {row}: tie (label_0 == 0.5): a tie carries no "
                                "preference. Remove tied rows or set data.ties=drop to drop them (they are counted).")
            self.counts.ties_dropped += 1
            return None
        if caption is None or caption is _ABSENT:
            return self._bad(row, f"caption is missing (None) in column {self.caption_column!r}")
        if not isinstance(caption, str):
            return self._bad(row, f"caption must be text, got {type(caption).__name__} {caption!r}")
        if why_0 is not None:
            return self._bad(row, f"{image_columns[0]}: {why_0}")
        if why_1 is not None:
            return self._bad(row, f"{image_columns[1]}: {why_1}")
        assert ref_0 is not None and ref_1 is not None
        s0 = s1 = None
        if self.score_columns is not None:
            raw = scores if scores is not None else (_ABSENT, _ABSENT)
            parsed = [_parse_label(v) for v in raw]
            for col, value, got in zip(self.score_columns, raw, parsed):
                if got is None:
                    shown = "missing" if value is _ABSENT else repr(value)
                    return self._bad(row, f"score column {col!r} must hold a finite number, got {shown} "
                                          "(data.score_column)")
            s0, s1 = parsed
        # label_0 == 1 -> slot 0 won; label_0 == 0 -> slot 1 won, so swap (the scores travel with their images).
        w, l = (ref_0, ref_1) if l0 == 1.0 else (ref_1, ref_0)
        score_w, score_l = (s0, s1) if l0 == 1.0 else (s1, s0)
        self.records.append(PairRecord(row=row, caption=caption, image_w=w, image_l=l, score_w=score_w, score_l=score_l))
        self.counts.pairs += 1
        return None

    def finish(self) -> PreferenceSource:
        if self.counts.skipped:
            logger.warning("%s: skipped %d bad rows (on_error=skip); first: row %d: %s", self.name,
                           len(self.counts.skipped), *self.counts.skipped[0])
        source = PreferenceSource(name=self.name, records=self.records, counts=self.counts,
                                  fingerprint=self.hash.hexdigest(), parts=tuple(self.parts))
        _require_pairs(source)
        return source


def _require_pairs(source: PreferenceSource) -> None:
    # Training on zero pairs "successfully" would be a silent wrong answer.
    if not source.records:
        raise DataError(f"{source.summary()}. No usable preference pairs: check label_0 values, ties "
                        "(label_0 == 0.5 rows are dropped) and the skipped rows listed above.")


# --------------------------------------------------------------------------------------------
# Columns


def _columns(where: str, names: list[str], caption_column: str) -> tuple[tuple[str, str], bool]:
    """Image column pair and whether ``label_1`` exists; DataError listing missing + present columns."""
    images = next((pair for pair in _IMAGE_COLUMN_PAIRS if pair[0] in names and pair[1] in names), None)
    missing: list[str] = []
    if images is None:
        partial = next((pair for pair in _IMAGE_COLUMN_PAIRS if pair[0] in names or pair[1] in names), None)
        if partial is not None:
            missing += [c for c in partial if c not in names]
        else:
            missing += ["jpg_0 (or image_0)", "jpg_1 (or image_1)"]
    missing += [c for c in ("label_0", caption_column) if c not in names]
    if missing:
        raise DataError(
            f"{where}: missing required column(s): {', '.join(missing)}; columns present: "
            f"{', '.join(names) if names else '(none)'}. Preference data needs jpg_0 and jpg_1 (image bytes, or "
            "image file paths in .jsonl/.csv; image_0/image_1 are accepted too), label_0, and the caption "
            f"column (data.caption_column={caption_column!r}: set it if the prompt lives in another column). "
            "Unpaired labelled images (one 'image' column and a desirable/undesirable 'label' column, see "
            "data.label_column) are read by `diffalign train` for objective.name=kto.")
    assert images is not None
    return images, "label_1" in names


def score_columns_from(spec: str | None) -> tuple[str, str] | None:
    """``data.score_column`` -> the (slot 0, slot 1) column names: 'score' -> ('score_0', 'score_1'),
    'a,b' -> ('a', 'b'), None -> None."""
    if spec is None:
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    if len(parts) == 1 and parts[0]:
        return f"{parts[0]}_0", f"{parts[0]}_1"
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise DataError(f"data.score_column={spec!r}: give a base name ('score' reads score_0/score_1) or two column "
                    "names separated by a comma ('reward_a,reward_b' for jpg_0/jpg_1)")


def _check_score_columns(where: str, names: list[str], score_columns: tuple[str, str] | None) -> list[str]:
    """The score columns to read (empty when none were asked for); DataError if any is missing."""
    if score_columns is None:
        return []
    missing = [c for c in score_columns if c not in names]
    if missing:
        raise DataError(f"{where}: missing score column(s) {', '.join(missing)} asked for by data.score_column; "
                        f"columns present: {', '.join(names) if names else '(none)'}. The world's pairs parquet "
                        "has score_0/score_1 (data.score_column=score) and per-dimension {dim}_0/{dim}_1.")
    return list(score_columns)


# --------------------------------------------------------------------------------------------
# Formats


def _read_arrow_batches(b: _Builder, batches: Iterator[Any], images: tuple[str, str], has_label_1: bool,
                        caption_column: str, base_dir: Path | None) -> None:
    sc = b.score_columns
    for batch in batches:
        cols = {name: batch.column(name).to_pylist()
                for name in {images[0], images[1], "label_0", caption_column} | ({"label_1"} if has_label_1 else set())
                | (set(sc) if sc else set())}
        for i in range(batch.num_rows):
            if b.full:
                return
            b.add(cols[caption_column][i], cols["label_0"][i], cols["label_1"][i] if has_label_1 else _ABSENT,
                  cols[images[0]][i], cols[images[1]][i], images, base_dir,
                  scores=(cols[sc[0]][i], cols[sc[1]][i]) if sc else None)


def _load_parquet(b: _Builder, files: list[Path], caption_column: str) -> None:
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
        images, has_label_1 = _columns(str(file), names, caption_column)
        score_cols = _check_score_columns(str(file), names, b.score_columns)
        if len(files) > 1:
            b.start_part(str(file))
        wanted = [images[0], images[1], "label_0", caption_column] + (["label_1"] if has_label_1 else []) + score_cols
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=list(dict.fromkeys(wanted)))
        # Image structs may carry relative paths (HF Image feature): resolve against the file's folder.
        _read_arrow_batches(b, batches, images, has_label_1, caption_column, file.parent)


def _read_dataset(b: _Builder, ds: Any, caption_column: str, base_dir: Path | None) -> None:
    images, has_label_1 = _columns(b.name, list(ds.column_names), caption_column)
    score_cols = _check_score_columns(b.name, list(ds.column_names), b.score_columns)
    wanted = [images[0], images[1], "label_0", caption_column] + (["label_1"] if has_label_1 else []) + score_cols
    # Arrow format never decodes an Image feature: we get {"bytes", "path"} structs (or raw bytes).
    table_ds = ds.select_columns(list(dict.fromkeys(wanted))).with_format("arrow")
    _read_arrow_batches(b, table_ds.iter(batch_size=_BATCH_ROWS), images, has_label_1, caption_column, base_dir)


def _load_datasets_folder(b: _Builder, folder: Path, split: str, caption_column: str) -> None:
    _read_dataset(b, load_saved_dataset(folder, split), caption_column, folder)


def _load_jsonl(b: _Builder, file: Path, caption_column: str) -> None:
    images: tuple[str, str] | None = None
    has_label_1 = False
    sc = b.score_columns
    for obj in b.jsonl_records(file):
        if images is None:  # the first record defines the columns
            images, has_label_1 = _columns(str(file), list(obj.keys()), caption_column)
            _check_score_columns(str(file), list(obj.keys()), sc)
        b.add(obj.get(caption_column, _ABSENT), obj.get("label_0", _ABSENT),
              obj.get("label_1", _ABSENT) if has_label_1 else _ABSENT,
              obj.get(images[0], _ABSENT), obj.get(images[1], _ABSENT), images, file.parent,
              scores=(obj.get(sc[0], _ABSENT), obj.get(sc[1], _ABSENT)) if sc else None)
    if images is None and not b.full:
        raise DataError(f"{file}: no JSON records found. Write one object per line with jpg_0/jpg_1 "
                        f"(or image_0/image_1) paths, label_0 and {caption_column!r}.")


DEFAULT_DIMENSION_WEIGHTS = {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}


def _load_videoalign_csv(b: _Builder, file: Path, weights: dict[str, float] | None) -> None:
    """A VideoAlign CSV (path_A, path_B, prompt, per-dimension A/B/same) -> pairs by the weighted combination rule.

    Parsing (columns, labels, fps_A/fps_B, prompts) is :func:`diffalign.rewards.data.read_videoalign_csv`'s; missing
    files are checked here so that on_error=skip can count them.
    """
    from diffalign.rewards.data import read_videoalign_csv

    weights = dict(DEFAULT_DIMENSION_WEIGHTS if weights is None else weights)
    dims = tuple(weights)
    w = torch.tensor([float(weights[d]) for d in dims], dtype=torch.float64)
    pairs = read_videoalign_csv(file, dims, check_files=False)
    with open(file, encoding="utf-8-sig", newline="") as fh:  # the optional num_frames column (lengths are checked)
        declared = [rec.get("num_frames") for rec in csv.DictReader(fh)]
    labels = pairs.labels.to(torch.float64) * pairs.mask
    scores = (labels * w).sum(dim=1)
    by_row = {row: i for i, row in enumerate(pairs.rows)}
    total = len(pairs) + pairs.dropped_unlabelled
    for row in range(total):
        if b.full:
            return
        i = by_row.get(row)
        if i is None:  # every label missing: no preference (read_videoalign_csv dropped it)
            b.add_scored(row, None, None, None, None, None, (None, None), "no labels")
            continue
        names = {1: "A", -1: "B", 0: "same"}
        raw = ", ".join(f"{d}={names[int(pairs.labels[i, j])] if pairs.mask[i, j] else 'missing'}"
                        for j, d in enumerate(dims))
        score = float(scores[i])
        b.add_scored(row, pairs.prompts[i], 0.0 if abs(score) < 1e-9 else score, pairs.paths_a[i], pairs.paths_b[i],
                     None, (pairs.fps_a[i], pairs.fps_b[i]), raw,
                     declared[row] if row < len(declared) else None)


def _is_videoalign_csv(file: Path) -> bool:
    with open(file, encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), None) or []
    return "path_A" in header and "path_B" in header


def _load_csv(b: _Builder, file: Path, caption_column: str) -> None:
    with open(file, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DataError(f"{file}: empty CSV (no header row). The header must name jpg_0/jpg_1 "
                            f"(or image_0/image_1), label_0 and {caption_column!r}.")
        fields = [c for c in reader.fieldnames if c is not None]
        images, has_label_1 = _columns(str(file), fields, caption_column)
        _check_score_columns(str(file), fields, b.score_columns)
        sc = b.score_columns
        for rec in reader:
            if b.full:
                return
            # A short row leaves trailing cells as None (-> bad row); an empty cell is "".
            b.add(rec.get(caption_column), rec.get("label_0"), rec.get("label_1") if has_label_1 else _ABSENT,
                  rec.get(images[0]), rec.get(images[1]), images, file.parent,
                  scores=(rec.get(sc[0]), rec.get(sc[1])) if sc else None)


def _parquet_files(folder: Path, split: str) -> list[Path]:
    files = sorted(folder.glob("*.parquet"))
    if files:
        return files
    # A hub snapshot (e.g. pickapic_v2/data/train-00000-of-00645.parquet) keeps splits side by side:
    # take only the requested split's files.
    nested = sorted(folder.rglob("*.parquet"))
    chosen = [f for f in nested
              if f.name.startswith((f"{split}-", f"{split}_", f"{split}.")) or split in f.relative_to(folder).parts[:-1]]
    if nested and not chosen:
        raise DataError(f"{folder}: found {len(nested)} parquet files in subfolders but none for split {split!r} "
                        f"(e.g. {nested[0].relative_to(folder)}). Set data.split or point data.path at the files.")
    return chosen


def default_cache_root() -> Path:
    """Where generated data (toy datasets) lives: the same root as the built-in tiny models."""
    from diffalign.paths import diffalign_home

    return diffalign_home()


def _looks_local(spec: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything with a file suffix or path syntax is meant locally.
    return (Path(spec).suffix.lower() in _LOCAL_SUFFIXES or spec.startswith(("/", ".", "~"))
            or "\\" in spec or spec.count("/") > 1)


def load_preference_source(path: str, *, split: str = "train", caption_column: str = "caption",
                           ties: str = "drop", on_error: str = "raise", max_pairs: int | None = None,
                           cache_root: str | Path | None = None,
                           score_columns: tuple[str, str] | None = None,
                           dimension_weights: dict[str, float] | None = None) -> PreferenceSource:
    """Read a preference source into oriented pairs (see the module docstring for the rules).

    ``path`` may be a ``.parquet`` file or a folder of them (Pick-a-Pic: ``jpg_0``, ``jpg_1`` bytes or
    HF Image structs, ``label_0``, caption), a ``datasets`` ``save_to_disk`` folder (``split`` picks a
    DatasetDict split), a ``.jsonl``/``.csv`` with image paths (relative to the file's folder),
    ``toy:pairs[?n=..&size=..&seed=..&ties=..]`` (written once under ``cache_root``, default
    :func:`default_cache_root`), or otherwise a hub dataset id (``datasets.load_dataset``).
    ``max_pairs`` keeps the first N usable pairs and stops reading there. ``score_columns`` (slot 0, slot 1)
    reads a reward per image into ``PairRecord.score_w``/``score_l`` (see :func:`score_columns_from`).
    A .csv whose header has ``path_A``/``path_B`` is read as a VideoAlign CSV with the combination rule
    ``dimension_weights`` (see the module docstring).
    """
    if ties not in ("drop", "error"):
        raise DataError(f"data.ties must be 'drop' or 'error', got {ties!r}")
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or int(max_pairs) < 1):
        raise DataError(f"data.max_pairs must be a positive integer or null, got {max_pairs!r}")
    spec = str(path)
    b = _Builder(spec, caption_column=caption_column, ties=ties, on_error=on_error,
                 max_pairs=None if max_pairs is None else int(max_pairs), score_columns=score_columns)
    if not spec:
        raise DataError("data.path is empty: set it to a parquet file/folder, a datasets folder, a .jsonl/.csv, "
                        "a hub dataset id, or 'toy:pairs'.")

    if spec.startswith("toy:"):
        from diffalign.data.toy import resolve_toy_path

        file = resolve_toy_path(spec, Path(cache_root) if cache_root is not None else default_cache_root())
        _load_parquet(b, [file], caption_column)
        return b.finish()

    p = Path(spec).expanduser()
    if p.is_dir():
        if is_saved_dataset_folder(p):
            _load_datasets_folder(b, p, split, caption_column)
        else:
            files = _parquet_files(p, split)
            if not files:
                raise DataError(f"{spec}: folder has no *.parquet files and is not a datasets save_to_disk "
                                "folder (no dataset_dict.json / state.json). Point data.path at Pick-a-Pic parquet "
                                "files, a save_to_disk folder, or a .jsonl/.csv file.")
            _load_parquet(b, files, caption_column)
    elif p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            _load_parquet(b, [p], caption_column)
        elif suffix == ".jsonl":
            _load_jsonl(b, p, caption_column)
        elif suffix == ".csv":
            if _is_videoalign_csv(p):
                if score_columns is not None:
                    raise DataError(f"{spec}: a VideoAlign CSV has per-dimension labels, not per-video scores; "
                                    "data.score_column does not apply to it (set it to null).")
                _load_videoalign_csv(b, p, dimension_weights)
            else:
                _load_csv(b, p, caption_column)
        else:
            raise DataError(f"{spec}: unsupported file type {suffix or '(no suffix)'!r}; use .parquet, .jsonl or "
                            ".csv, a folder of parquet files, or a datasets save_to_disk folder.")
    elif _looks_local(spec):
        raise DataError(f"{spec}: file or folder not found (resolved to {p.absolute()}). Check data.path.")
    else:
        _load_hub(b, spec, split, caption_column)
    return b.finish()


def _load_hub(b: _Builder, spec: str, split: str, caption_column: str) -> None:
    try:
        import datasets

        ds = datasets.load_dataset(spec, split=split)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        if len(detail) > 400:
            detail = detail[:400] + "..."
        raise DataError(
            f"{spec}: not a local file or folder, and the hub dataset id could not be loaded ({detail}). "
            "Without network access use local data, which works offline: a .parquet file or folder of "
            "parquet files (e.g. a downloaded Pick-a-Pic snapshot), a datasets save_to_disk folder, or a "
            ".jsonl/.csv of image paths.") from None
    _read_dataset(b, ds, caption_column, None)


def validate_images(source: PreferenceSource, on_error: str = "raise", num_frames: int | None = None,
                    fps: float | None = None) -> PreferenceSource:
    """Decode every image (or video, with ``num_frames``/``fps`` as in :class:`PreferencePairDataset`) of
    ``source``; bad pairs raise (naming the row) or are skipped and counted.

    Returns a new source without the bad pairs; its fingerprint changes only if pairs were removed.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    kept: list[PairRecord] = []
    skipped = list(source.counts.skipped)
    removed: list[int] = []
    for rec in source.records:
        try:
            for role, ref, file_fps in (("winner", rec.image_w, rec.fps_w), ("loser", rec.image_l, rec.fps_l)):
                try:
                    if is_video_ref(ref):
                        if num_frames is None or fps is None:
                            raise DataError(f"{source.describe(rec.row)}: row {rec.row}: {ref} is a video; give "
                                            "num_frames and fps (data.num_frames, data.fps) to validate video pairs")
                        _decode_video(ref, int(num_frames), float(fps), file_fps, rec.source_frames)
                    else:
                        _decode(ref)
                except _ImageProblem as p:
                    raise _ImageProblem(f"{role} image: {p.reason}") from None
        except _ImageProblem as p:
            if on_error == "raise":
                raise DataError(f"{source.describe(rec.row)}: row {rec.row}: {p.reason}. {_FIX}") from None
            skipped.append((rec.row, p.reason))
            removed.append(rec.row)
            continue
        kept.append(rec)
    if not removed:
        return source
    skipped.sort(key=lambda item: item[0])
    fingerprint = hashlib.sha256(
        (source.fingerprint + ":validated:" + ",".join(map(str, removed))).encode()).hexdigest()
    counts = replace(source.counts, pairs=len(kept), skipped=skipped)
    out = replace(source, records=kept, counts=counts, fingerprint=fingerprint)
    logger.warning("%s: %d pairs with unreadable images skipped (on_error=skip)", source.name, len(removed))
    _require_pairs(out)
    return out


# --------------------------------------------------------------------------------------------
# Torch dataset


_TENSOR_KEYS = ("pixels_w", "pixels_l", "original_size_w", "original_size_l", "crop_top_left")
_SCORE_KEYS = ("score_w", "score_l")  # present only when the source was read with score columns



def dataset_key(key: int | tuple[int, int], n: int, unit: str) -> tuple[int, int]:
    """(index, epoch) of a dataset key: an index (epoch 0) or the batch sampler's (index, epoch); negative
    indices count from the end, anything else out of [0, n) is an IndexError naming ``unit``."""
    index, epoch = (key if isinstance(key, tuple) else (key, 0))
    index, epoch = int(index), int(epoch)
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for {n} {unit}")
    return index, epoch


class PreferencePairDataset(torch.utils.data.Dataset):
    """On-the-fly decoding + joint augmentation of a :class:`PreferenceSource`.

    ``dataset[i]`` or ``dataset[(i, epoch)]`` returns a dict with ``pixels_w``/``pixels_l``
    (float ``[3, R, R]`` in [-1, 1]), ``caption``, ``row`` and the SDXL micro-conditioning
    ``original_size_w``/``original_size_l``/``crop_top_left`` (LongTensor[2], (h, w) / (top, left)), and
    ``score_w``/``score_l`` (float32 scalars) when the source carries per-image scores.
    Augmentation is seeded by :func:`pair_generator` ``(seed, i, epoch)``. Video pairs (``num_frames`` set and
    video files) give ``pixels_w``/``pixels_l`` float ``[3, F, R, R]``: F = ``num_frames`` frames sampled by time at
    ``fps`` (:func:`decode_video`), every frame of both clips with the same crop and flip
    (:meth:`JointTransform.videos`). A pair whose image or video does not decode raises :class:`DataError` (``on_error='raise'``) or gives ``None`` (``'skip'``), which
    :func:`collate_pairs` drops and counts.
    """

    def __init__(self, source: PreferenceSource, transform: JointTransform, seed: int = 0,
                 on_error: str = "raise", num_frames: int | None = None, fps: float | None = None) -> None:
        if on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        if num_frames is not None and (int(num_frames) < 1 or fps is None or not float(fps) > 0):
            raise DataError(f"video pairs need data.num_frames >= 1 and data.fps > 0, got {num_frames!r} and {fps!r}")
        self.num_frames = None if num_frames is None else int(num_frames)
        self.fps = None if fps is None else float(fps)
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.source.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, epoch = dataset_key(key, len(self.source.records), "pairs")
        rec = self.source.records[index]
        where = self.source.describe(rec.row)
        video_w, video_l = is_video_ref(rec.image_w), is_video_ref(rec.image_l)
        if video_w and self.num_frames is None:  # a config problem, not a bad row: never skipped
            raise DataError(f"{where}: row {rec.row}: {rec.image_w} is a video but data.num_frames is null; "
                            "set data.num_frames (and data.fps) to train on video pairs.")
        try:
            if video_w != video_l:
                raise DataError(f"{where}: row {rec.row}: the winner is {'a video' if video_w else 'an image'} "
                                f"({rec.image_w}) but the loser is {'a video' if video_l else 'an image'} "
                                f"({rec.image_l}); both must be videos or both images. {_FIX}")
            if video_w:
                frames_w = decode_video(rec.image_w, source=where, row=rec.row, num_frames=self.num_frames,
                                        fps=self.fps, file_fps=rec.fps_w, source_frames=rec.source_frames)
                frames_l = decode_video(rec.image_l, source=where, row=rec.row, num_frames=self.num_frames,
                                        fps=self.fps, file_fps=rec.fps_l, source_frames=rec.source_frames)
            else:
                image_w = decode_image(rec.image_w, source=where, row=rec.row)
                image_l = decode_image(rec.image_l, source=where, row=rec.row)
        except DataError as exc:
            if self.on_error == "raise":
                raise
            logger.warning("skipping pair (data.on_error=skip): %s", exc)
            return None
        if video_w:
            pixels_w, pixels_l, meta = self.transform.videos(frames_w, frames_l, pair_generator(self.seed, index, epoch))
        else:
            pixels_w, pixels_l, meta = self.transform(image_w, image_l, pair_generator(self.seed, index, epoch))
        return {
            "pixels_w": pixels_w,
            "pixels_l": pixels_l,
            "caption": rec.caption,
            "row": rec.row,
            "original_size_w": torch.tensor(meta.original_size_w, dtype=torch.long),
            "original_size_l": torch.tensor(meta.original_size_l, dtype=torch.long),
            "crop_top_left": torch.tensor(meta.crop_top_left, dtype=torch.long),
            **({"score_w": torch.tensor(rec.score_w, dtype=torch.float32),
                "score_l": torch.tensor(rec.score_l, dtype=torch.float32)} if rec.score_w is not None else {}),
        }


def collate_pairs(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch dataset items: tensors stacked (``score_w``/``score_l`` [B] when present), ``caption``/``row`` as
    lists, ``skipped`` = number of ``None`` items dropped. If every item was skipped:
    ``{"skipped": n, "pixels_w": None}``."""
    kept = [item for item in items if item is not None]
    skipped = len(items) - len(kept)
    if not kept:
        return {"skipped": skipped, "pixels_w": None}
    batch: dict[str, Any] = {key: torch.stack([item[key] for item in kept]) for key in _TENSOR_KEYS}
    for key in _SCORE_KEYS:  # [B] float32 rewards, oriented like the pixels
        if all(key in item for item in kept):
            batch[key] = torch.stack([item[key] for item in kept])
    batch["caption"] = [item["caption"] for item in kept]
    batch["row"] = [item["row"] for item in kept]
    batch["skipped"] = skipped
    return batch
