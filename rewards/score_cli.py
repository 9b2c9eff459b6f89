"""`diffalign score`: score image and video files with any registered reward(s).

Plugged into ``diffalign.cli`` (HELP, configure(parser), run(args) -> exit code). Heavy imports
(torch, the rewards) happen inside ``run`` so ``diffalign --help`` stays fast.

Flow: build every reward first (an unknown name or bad option is exit 2 before any file is read),
read prompts, then load files one by one into buckets of equal kind and shape (a batch must stack),
score a bucket when it holds --batch-size files, and print every row in MEDIA order at the end. A
file that cannot be loaded or scored gets an "error" in its row and the batch goes on; the summary
on stderr names every failed file and the exit code is 1. If a whole batch fails, its files are
scored one at a time, so one bad input (e.g. an unparseable caption) costs only its own row.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

    from .base import Reward

HELP = "score images and videos with reward models (weight-free, CLIP-family, trained, world oracle)"

EPILOG = """columns:
  one reward       its dimension names, e.g. "brightness" or "color shape background layout overall"
  several rewards  REWARD.DIMENSION (e.g. "oracle.color"); a one-dimensional reward whose dimension is
                   its own name is just REWARD (e.g. "brightness"). REWARD is the reward's name, or the
                   spec as typed when two selected rewards share a name (e.g. "hps" and "hps:/path.pt").
  overall          with --weights: sum of W * column over the named columns ("weighted_overall" if a
                   reward already has a column called "overall", e.g. --reward oracle alone)
  error            why a file could not be loaded or scored (empty when it was)

prompts (--prompts FILE):
  *.json           a list of prompts in MEDIA order, or an object {"file": "prompt", ...}
  *.csv            a header row with columns "file" and "prompt"
  anything else    plain text, one prompt per line, in MEDIA order (line count must equal MEDIA count)
  Keys of a mapping may be the paths as given on the command line, absolute paths, paths relative to
  the prompts file, or bare file names (when unique).

media:
  images  .png .jpg .jpeg .webp .bmp .tif .tiff      float RGB in [0, 1]
  videos  .mp4 .m4v .mov .mkv .webm .avi .gif        at the file's real fps (GIF: from frame delays)
  Image rewards do not score videos (and video rewards not images): such a cell is an error.

exit codes: 0 all files scored; 1 some file failed (see the error column and the stderr summary);
  2 bad usage (unknown reward, bad --weights, missing prompts, ...).

examples:
  diffalign score --list
  diffalign score --reward brightness,colorfulness out/*.png
  diffalign score --reward oracle --prompts captions.txt --format json samples/*.png
  diffalign score --reward flicker,motion --format csv clips/*.mp4 > scores.csv
  diffalign score --reward brightness,saturation --weights brightness=1,saturation=0.5 out/*.png
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `score` arguments to its subparser (no heavy imports here)."""
    parser.epilog = EPILOG
    parser.add_argument("media", nargs="*", metavar="MEDIA", help="image and video files to score")
    parser.add_argument("--list", action="store_true", help="list every registered reward and exit")
    parser.add_argument("--reward", "-r", action="append", metavar="NAME[,NAME...]",
                        help="reward(s) to apply: registry names, NAME:CHECKPOINT, or a train-reward output "
                             "folder; comma-separated and/or repeated")
    parser.add_argument("--weights", metavar="COLUMN=W,...",
                        help="add an 'overall' column = sum of W * COLUMN (column names as printed)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", metavar="TEXT", help="one prompt for every file")
    group.add_argument("--prompts", metavar="FILE", help="per-file prompts: .txt (one per line, MEDIA order), "
                                                         ".json (list or {file: prompt}) or .csv (file,prompt)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table",
                        help="output on stdout (default: table)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="files per batch; files are batched with others of the same kind and size (default 16)")
    parser.add_argument("--device", default="auto", help="torch device for the rewards: auto (cuda if available), "
                                                         "cpu, cuda, cuda:1, ... (default auto)")
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument("--num-frames", type=int, metavar="K",
                        help="score each video on K frames picked evenly in TIME (default: every frame; use this "
                             "or --video-fps for long or large videos, which are otherwise held as float in full)")
    frames.add_argument("--video-fps", type=float, metavar="R",
                        help="score each video on the frames shown at R frames per second of video time")


# --------------------------------------------------------------------------------------------- parsing


@dataclass
class _Selected:
    """One reward of the run and where its dimensions go."""

    spec: str
    reward: "Reward"
    columns: dict[str, str] = field(default_factory=dict)  # dimension -> output column


def _build(spec: str, device) -> "Reward":
    """build_reward, with any failure (missing weights, offline hub, bad file) as a RewardError naming the spec."""
    from .base import RewardError
    from .registry import build_reward

    try:
        return build_reward(spec, device)
    except RewardError:
        raise
    except Exception as e:  # providers raise OSError, ValueError, ModelLoadError, ...: all mean "cannot build"
        raise RewardError(f"cannot build reward '{spec}': {type(e).__name__}: {e}") from e


def _split_specs(values: Sequence[str] | None) -> list[str]:
    from .base import RewardError

    specs = [s.strip() for v in values or () for s in v.split(",") if s.strip()]
    if not specs:
        raise RewardError("no reward given: use --reward NAME[,NAME...] (`diffalign score --list` lists them)")
    dupes = sorted({s for s in specs if specs.count(s) > 1})
    if dupes:
        raise RewardError(f"reward(s) given twice: {', '.join(dupes)}")
    return specs


def _parse_weights(text: str | None) -> dict[str, float] | None:
    from .base import RewardError

    if text is None:
        return None
    weights: dict[str, float] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, sep, value = item.rpartition("=")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not sep or not key.strip() or not math.isfinite(w):
            raise RewardError(f"--weights: '{item}' is not COLUMN=NUMBER (e.g. --weights VQ=1,MQ=0.5,TA=2)")
        if key.strip() in weights:
            raise RewardError(f"--weights: column '{key.strip()}' given twice")
        weights[key.strip()] = w
    if not weights:
        raise RewardError("--weights is empty; give COLUMN=NUMBER pairs")
    return weights


def _assign_columns(selected: list[_Selected]) -> list[str]:
    """Fill each reward's dimension -> column map (scheme in EPILOG); returns every column in order."""
    from .base import RewardError

    names = [s.reward.name for s in selected]
    columns: list[str] = []
    for s in selected:
        dims = tuple(s.reward.dimensions)
        if len(selected) == 1:
            s.columns = {d: d for d in dims}
        else:
            label = s.reward.name if names.count(s.reward.name) == 1 else s.spec
            if len(dims) == 1 and dims[0] == s.reward.name:
                s.columns = {dims[0]: label}
            else:
                s.columns = {d: f"{label}.{d}" for d in dims}
        columns.extend(s.columns.values())
    clash = sorted({c for c in columns if columns.count(c) > 1} | ({"file", "error"} & set(columns)))
    if clash:  # defensive: only a reward with duplicate or reserved dimension names gets here
        raise RewardError(f"the selected rewards give clashing column names {clash}")
    return columns


def _load_prompts(args: argparse.Namespace, media: list[str]) -> list[str] | None:
    """One prompt per MEDIA entry from --prompt / --prompts, or None when neither was given."""
    from .base import RewardError

    if args.prompt is not None:
        return [args.prompt] * len(media)
    if args.prompts is None:
        return None
    path = Path(args.prompts)
    if not path.is_file():
        raise RewardError(f"--prompts {path}: no such file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    mapping: dict[str, str] | None = None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RewardError(f"--prompts {path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            mapping = {str(k): v for k, v in data.items()}
        elif isinstance(data, list):
            prompts = data
        else:
            raise RewardError(f"--prompts {path}: expected a JSON list of prompts or an object {{file: prompt}}")
        bad = [k for k, v in (mapping.items() if mapping is not None else enumerate(prompts)) if not isinstance(v, str)]
        if bad:
            raise RewardError(f"--prompts {path}: prompts must be strings; entry {bad[0]!r} is not")
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"file", "prompt"} <= set(reader.fieldnames):
            raise RewardError(f"--prompts {path}: a CSV needs a header with columns 'file' and 'prompt'; "
                              f"got {reader.fieldnames}")
        mapping = {}
        for line, row in enumerate(reader, start=2):
            if row["file"] is None or row["prompt"] is None:
                raise RewardError(f"--prompts {path}, line {line}: missing the file or prompt field")
            mapping[row["file"]] = row["prompt"]
    else:
        prompts = text.splitlines()
    if mapping is None:
        if len(prompts) != len(media):
            raise RewardError(f"--prompts {path}: {len(prompts)} prompts for {len(media)} files; a list of prompts "
                              f"must have one per MEDIA file, in order (or use a JSON/CSV file -> prompt mapping)")
        return list(prompts)
    return _match_mapping(mapping, media, path)


def _match_mapping(mapping: dict[str, str], media: list[str], source: Path) -> list[str]:
    from .base import RewardError

    lookup: dict[str, str] = {}
    basenames: dict[str, list[str]] = {}
    for key, prompt in mapping.items():
        lookup[key] = prompt
        lookup[str(Path(key).resolve())] = prompt                 # relative to the working directory
        lookup.setdefault(str((source.parent / key).resolve()), prompt)  # relative to the prompts file
        basenames.setdefault(Path(key).name, []).append(prompt)
    out, missing = [], []
    for m in media:
        for candidate in (m, str(Path(m).resolve())):
            if candidate in lookup:
                out.append(lookup[candidate])
                break
        else:
            by_name = basenames.get(Path(m).name, [])
            if len(by_name) == 1:
                out.append(by_name[0])
            else:
                missing.append(m)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RewardError(f"--prompts {source}: no prompt for {len(missing)} file(s): {shown}")
    return out


# --------------------------------------------------------------------------------------------- scoring


@dataclass
class _Item:
    index: int
    path: str
    kind: str
    data: "torch.Tensor"     # [3, H, W] or [F, 3, H, W]
    fps: float | None


class _Scorer:
    """Buckets loaded files by (kind, shape), scores full buckets, collects rows and errors."""

    def __init__(self, selected: list[_Selected], prompts: list[str] | None, batch_size: int, device) -> None:
        self.selected = selected
        self.prompts = prompts
        self.batch_size = batch_size
        self.device = device
        self.values: dict[int, dict[str, float]] = {}
        self.errors: dict[int, list[str]] = {}
        self.buckets: dict[tuple, list[_Item]] = {}

    def fail(self, index: int, message: str) -> None:
        self.errors.setdefault(index, []).append(message)

    def add(self, item: _Item) -> None:
        key = (item.kind, tuple(item.data.shape))
        bucket = self.buckets.setdefault(key, [])
        bucket.append(item)
        if len(bucket) >= self.batch_size:
            self._score(self.buckets.pop(key))

    def flush(self) -> None:
        for key in list(self.buckets):
            self._score(self.buckets.pop(key))

    def _score(self, items: list[_Item]) -> None:
        import torch

        kind = items[0].kind
        x = None
        for s in self.selected:
            if s.reward.input_kind != kind:
                what = {"image": "images", "video": "videos"}.get(s.reward.input_kind, s.reward.input_kind)
                for it in items:
                    self.fail(it.index, f"{s.spec}: scores {what}, not {kind}s")
                continue
            if x is None:  # one stacked copy on the device per bucket, shared by every reward
                try:
                    x = torch.stack([it.data for it in items]).to(self.device)
                except Exception as e:  # e.g. out of device memory: these files fail, the run goes on
                    for it in items:
                        self.fail(it.index, f"cannot move the batch to {self.device}: {_describe(e)}")
                    return
            self._apply(s, items, x, torch)

    def _apply(self, s: _Selected, items: list[_Item], x: "torch.Tensor", torch) -> None:
        prompts = [self.prompts[it.index] for it in items] if self.prompts is not None else None
        kw = {"fps": [it.fps for it in items]} if items[0].kind == "video" else {}
        try:
            with torch.no_grad():
                out = s.reward(x, prompts, **kw)
            missing = [d for d in s.columns if d not in out]
            if missing:
                raise ValueError(f"returned no {missing} (it declares dimensions {list(s.columns)})")
            rows = {d: out[d].detach().float().reshape(-1).cpu().tolist() for d in s.columns}
            if any(len(v) != len(items) for v in rows.values()):
                raise ValueError(f"returned {[len(v) for v in rows.values()]} scores for {len(items)} inputs")
        except Exception as e:  # any failure of this batch: retry one by one to blame only the bad file(s)
            if len(items) > 1:
                for j, it in enumerate(items):
                    self._apply(s, [it], x[j:j + 1], torch)
            else:
                self.fail(items[0].index, f"{s.spec}: {_describe(e)}")
            return
        for j, it in enumerate(items):
            for d, col in s.columns.items():
                v = rows[d][j]
                if math.isfinite(v):
                    self.values.setdefault(it.index, {})[col] = v
                else:
                    self.fail(it.index, f"{s.spec}: {d} is {v} (not a finite score)")


def _describe(e: BaseException) -> str:
    from .base import RewardError

    text = str(e) or type(e).__name__
    return text if isinstance(e, RewardError) else f"{type(e).__name__}: {text}"


def _load(path: str, num_frames: int | None, video_fps: float | None):
    """(kind, tensor, fps) for one file; MediaError on any problem."""
    from .media import load_image, load_video, media_kind

    kind = media_kind(path)
    if kind == "image":
        return kind, load_image(path), None
    frames, fps = load_video(path, num_frames=num_frames, target_fps=video_fps)
    return kind, frames, fps


# --------------------------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_table(rows: list[dict[str, Any]], columns: list[str], out) -> None:
    show_error = any(r["error"] for r in rows)
    header = ["file", *columns] + (["error"] if show_error else [])
    cells = [[_fmt(r.get(c)) for c in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    numeric = [h not in ("file", "error") for h in header]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    print(line(header), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for c in cells:
        print(line(c), file=out)


def _print_list(fmt: str, out) -> None:
    from .registry import available

    entries = available()
    if fmt == "json":
        json.dump([{"name": e.name, "input_kind": e.input_kind, "dimensions": list(e.dimensions), "help": e.help}
                   for e in entries.values()], out, indent=1)
        print(file=out)
        return
    rows = [(e.name, e.input_kind, ",".join(e.dimensions), e.help) for e in entries.values()]
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["name", "input_kind", "dimensions", "help"])
        w.writerows(rows)
        return
    header = ("name", "input", "dimensions", "help")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header[:3])]
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3], file=out)
    print(f"\n{len(rows)} rewards. Use NAME or NAME:CHECKPOINT with --reward; a `diffalign train-reward` output "
          f"folder also works.", file=out)


# --------------------------------------------------------------------------------------------- entry


def run(args: argparse.Namespace) -> int:
    """Score MEDIA with --reward(s); print rows; 0 if every file scored, 1 if any failed."""
    from .base import RewardError, weighted_overall
    from .media import MediaError

    out = sys.stdout
    if args.list:
        _print_list(args.format, out)
        return 0
    specs = _split_specs(args.reward)
    if not args.media:
        raise RewardError("no MEDIA files given: diffalign score --reward NAME FILE [FILE ...]")
    if args.batch_size < 1:
        raise RewardError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_frames is not None and args.num_frames < 1:
        raise RewardError(f"--num-frames must be >= 1, got {args.num_frames}")
    if args.video_fps is not None and not (math.isfinite(args.video_fps) and args.video_fps > 0):
        raise RewardError(f"--video-fps must be a positive number, got {args.video_fps}")
    weights = _parse_weights(args.weights)

    import torch

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
    except RuntimeError as e:
        raise RewardError(f"--device {args.device}: {e}") from None
    selected = [_Selected(spec, _build(spec, device)) for spec in specs]
    latent = [s.spec for s in selected if s.reward.input_kind == "latent"]
    if latent:
        raise RewardError(f"reward(s) {', '.join(latent)} score noisy latents during sampling, not media files")
    columns = _assign_columns(selected)
    overall_col = None
    if weights is not None:
        unknown = sorted(set(weights) - set(columns))
        if unknown:
            raise RewardError(f"--weights names unknown column(s) {unknown}; the columns are {columns}")
        overall_col = "weighted_overall" if "overall" in columns else "overall"
    prompts = _load_prompts(args, args.media)
    needy = [s.spec for s in selected if s.reward.needs_prompt]
    if needy and prompts is None:
        raise RewardError(f"reward(s) {', '.join(needy)} score image-text agreement and need prompts: "
                          f"--prompt TEXT or --prompts FILE")

    scorer = _Scorer(selected, prompts, args.batch_size, device)
    for i, path in enumerate(args.media):
        try:
            kind, data, fps = _load(path, args.num_frames, args.video_fps)
        except MediaError as e:
            # the row already names the file; drop the "PATH: " prefix the message starts with
            message = str(e)
            for prefix in (f"{path}: ", f"{Path(path)}: "):
                if message.startswith(prefix):
                    message = message[len(prefix):]
                    break
            scorer.fail(i, message)
            continue
        except Exception as e:  # a decoder bug or odd file must not abort the other files either
            scorer.fail(i, f"cannot load ({_describe(e)})")
            continue
        scorer.add(_Item(i, path, kind, data, fps))
    scorer.flush()

    rows: list[dict[str, Any]] = []
    for i, path in enumerate(args.media):
        values = scorer.values.get(i, {})
        row: dict[str, Any] = {"file": path, **{c: values.get(c) for c in columns}}
        if overall_col is not None:
            have = all(c in values for c in weights)
            row[overall_col] = (float(weighted_overall({c: torch.tensor([values[c]], dtype=torch.float64)
                                                        for c in weights}, weights)[0]) if have else None)
        errors = scorer.errors.get(i)
        row["error"] = "; ".join(errors) if errors else None
        rows.append(row)
    all_columns = columns + ([overall_col] if overall_col else [])

    if args.format == "json":
        json.dump(rows, out, indent=1)
        print(file=out)
    elif args.format == "csv":
        w = csv.DictWriter(out, fieldnames=["file", *all_columns, "error"], lineterminator="\n")
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    else:
        _print_table(rows, all_columns, out)
    out.flush()

    failed = [r for r in rows if r["error"]]
    if failed:
        lines = [f"diffalign score: {len(failed)} of {len(rows)} file(s) failed:"]
        lines += [f"  {r['file']}: {r['error']}" for r in failed]
        print("\n".join(lines), file=sys.stderr)
        return 1
    print(f"diffalign score: {len(rows)} file(s) scored with {', '.join(specs)}", file=sys.stderr)
    return 0
