"""`diffalign filter`: FiFA-style selection of the most useful preference pairs of a dataset.

Plugged into ``diffalign.cli`` (HELP, configure(parser), run(args) -> exit code); heavy imports happen
inside :func:`filter_dataset`, so ``diffalign --help`` stays fast. The math lives in
:mod:`diffalign.data.filter`; this module reads the data, runs the proxy reward and the text encoder,
and writes the kept rows in the input's own format.

Flow:
1. Read the source with :func:`~diffalign.data.preference.load_preference_source` (the same rules as
   training: ties dropped and counted, bad rows an error naming the row or skipped with
   ``--on-error skip``). Only the pairs training would use are scored and can be kept.
2. margin_i = |r(jpg_0) - r(jpg_1)| from a registered reward on the decoded images, or from two score
   columns already in the data (``--margin-from-columns score_0,score_1``: no model, no image decoding).
3. q(c_i): the word-count proxy :func:`~diffalign.data.filter.word_count_quality` (NOT the paper's LLM
   score) or a user column (``--quality column:NAME``, higher = better).
4. log rho_k(c_i): prompts are embedded with a text encoder (the generator's own via its family adapter,
   a CLIP text tower from a folder, or a weight-free hashed bag of words); the cosine distance to the
   k-th nearest other DISTINCT prompt (pairs that share a prompt share its value).
5. s_i = margin_i + alpha q(c_i) + gamma log rho_k(c_i); keep the top K (ties -> lower source row).
6. Write the kept rows in source order with every input column plus ``fifa_*`` columns and
   ``source_row``; beside it ``<stem>.filter.json`` (options, resolved choices, counts, quantiles) and
   ``<stem>.filter.png`` (histograms). Same input and options -> byte-identical files.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from diffalign.data.preference import PreferenceSource

HELP = "FiFA data selection: keep the pairs with the best margin + alpha*q(prompt) + gamma*log(kNN distance)"

EPILOG = """score (per usable pair i; ties and bad rows are never kept):
  s_i = margin_i + alpha * q(c_i) + gamma * log(rho_k(c_i))
  margin_i   |r(jpg_0) - r(jpg_1)| with --reward (on the images), or |A - B| from --margin-from-columns A,B;
             --signed-margin uses r(winner) - r(loser) instead (pairs the proxy disagrees with rank last)
  q(c)       prompt quality. FiFA asks an LLM for a harmfulness/quality score; offline there is none, so the
             default "words" is a weight-free PROXY that differs from the paper: 0 for prompts of
             --min-words..--max-words words, falling linearly to -1 for empty or twice-too-long prompts.
             It knows nothing about harm or meaning. --quality column:NAME uses a score you computed.
  rho_k(c)   cosine distance from the prompt's embedding to its k-th nearest other distinct prompt
             (kNN entropy-estimator term: larger = a rarer prompt), floored at --knn-eps before the log.

auto choices (recorded in the JSON sidecar):
  --reward auto         oracle when every caption is an embedded-world caption, else pickscore
  --text-encoder auto   world:unet when every caption is an embedded-world caption; otherwise name one

text encoders (--text-encoder):
  world:unet, world:flow, tiny:FAMILY, FAMILY:PATH_OR_ID (FAMILY in sd15 sdxl sd3 flux): the generator's own
      text conditioning (encode_prompts of its family adapter): pooled_prompt_embeds where the family has
      them (SDXL, SD3, FLUX), else the mean of the token states from the first word to the end token (SD1.5)
  clip:PATH   a CLIP text tower: a transformers CLIP folder (projected text embedding) or a diffusers
              pipeline folder (its text_encoder + tokenizer, pooled end-token state)
  words       weight-free hashed bag of words (lexical: synonyms count as different words)

outputs (OUT's format follows the input: parquet for parquet files/folders, datasets folders and toy:pairs;
.jsonl and .csv for those, with relative image paths made absolute when OUT is in another folder):
  OUT                      kept rows in source order: every input column + fifa_score, fifa_margin,
                           fifa_quality, fifa_log_knn (for computed terms), fifa_rank (1 = best), source_row
  <OUT stem>.filter.json   options, resolved choices, counts and score quantiles
  <OUT stem>.filter.png    histograms of the score and its terms, all pairs vs kept pairs

examples:
  diffalign filter runs/demo-unet/pairs.parquet --out runs/filter/top25.parquet --top-fraction 0.25
  diffalign filter pairs.parquet --margin-from-columns score_0,score_1 --top-k 100 --out top100.parquet
  diffalign filter /data/pickapic_v2 --reward pickscore --text-encoder clip:/models/PickScore_v1 \\
      --top-fraction 0.005 --out /data/pickapic_fifa.parquet
  diffalign train sd15-diffusion-dpo data.path=/data/pickapic_fifa.parquet
"""

FIFA_COLUMNS: tuple[str, ...] = ("fifa_score", "fifa_margin", "fifa_quality", "fifa_log_knn", "fifa_rank",
                                 "source_row")
_IMAGE_COLUMN_PAIRS = (("jpg_0", "jpg_1"), ("image_0", "image_1"))  # the loader's own choice order
_MISSING = object()


@dataclass
class FilterOptions:
    """Every option of `diffalign filter` (the CLI flags, one to one); recorded in the JSON sidecar."""

    data: str
    out: str
    top_k: int | None = None
    top_fraction: float | None = None
    reward: str = "auto"
    reward_dimension: str | None = None
    margin_from_columns: str | None = None
    signed_margin: bool = False
    alpha: float = 1.0
    quality: str = "words"
    min_words: int = 3
    max_words: int = 60
    gamma: float = 0.1
    text_encoder: str = "auto"
    knn_k: int = 5
    knn_eps: float = 1e-6
    split: str = "train"
    caption_column: str = "caption"
    on_error: str = "raise"
    device: str = "auto"
    batch_size: int = 64
    show_progress: bool = True  # display only: not recorded in the sidecar


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `filter` arguments to its subparser (no heavy imports here)."""
    d = FilterOptions("", "")
    parser.epilog = EPILOG
    parser.add_argument("data", help="preference data: Pick-a-Pic parquet file or folder, datasets save_to_disk folder, "
                                     ".jsonl, .csv or toy:pairs?n=N")
    parser.add_argument("--out", required=True, help="output file (.parquet, or .jsonl/.csv for those inputs)")
    keep = parser.add_mutually_exclusive_group(required=True)
    keep.add_argument("--top-k", type=int, metavar="K", help="keep the K best pairs (all of them if fewer)")
    keep.add_argument("--top-fraction", type=float, metavar="F", help="keep ceil(F * pairs) best pairs, 0 < F <= 1 "
                                                                      "(FiFA kept < 0.5%% of Pick-a-Pic)")
    g = parser.add_argument_group("margin")
    g.add_argument("--reward", default=d.reward, metavar="SPEC",
                   help="proxy reward for the margin (a `diffalign score --list` name, NAME:CHECKPOINT or a "
                        "train-reward folder); default auto: oracle for world captions, else pickscore")
    g.add_argument("--reward-dimension", default=None, metavar="DIM",
                   help="which dimension of a multi-dimensional reward (default: 'overall' if it has one, "
                        "else its only dimension)")
    g.add_argument("--margin-from-columns", default=None, metavar="A,B",
                   help="margin from two numeric columns already in the data (scores of jpg_0 and jpg_1), "
                        "e.g. score_0,score_1; no reward model, no image decoding")
    g.add_argument("--signed-margin", action="store_true",
                   help="margin = r(winner) - r(loser) instead of |r0 - r1| (not FiFA's: also demotes pairs the "
                        "proxy reward disagrees with)")
    g = parser.add_argument_group("prompt quality q(c)")
    g.add_argument("--alpha", type=float, default=d.alpha, help=f"weight of q(c) (default {d.alpha})")
    g.add_argument("--quality", default=d.quality, metavar="words|column:NAME",
                   help="'words': weight-free word-count proxy (NOT FiFA's LLM score; see below); 'column:NAME': "
                        "a numeric column, higher = better")
    g.add_argument("--min-words", type=int, default=d.min_words, help=f"words: shorter prompts are penalised "
                                                                      f"(default {d.min_words})")
    g.add_argument("--max-words", type=int, default=d.max_words, help=f"words: longer prompts are penalised "
                                                                      f"(default {d.max_words}, ~CLIP's 77 tokens)")
    g = parser.add_argument_group("prompt diversity log rho_k(c)")
    g.add_argument("--gamma", type=float, default=d.gamma, help=f"weight of log kNN distance (default {d.gamma}; "
                                                                "0 skips the text encoder)")
    g.add_argument("--text-encoder", default=d.text_encoder, metavar="SPEC",
                   help="auto | world:unet | world:flow | tiny:FAMILY | FAMILY:PATH | clip:PATH | words (see below)")
    g.add_argument("--knn-k", type=int, default=d.knn_k, help=f"k of the k-th nearest neighbour (default {d.knn_k})")
    g.add_argument("--knn-eps", type=float, default=d.knn_eps,
                   help=f"floor of the distance before the log (default {d.knn_eps:g})")
    g = parser.add_argument_group("data and running")
    g.add_argument("--split", default=d.split, help="split of a datasets folder or parquet snapshot (default train)")
    g.add_argument("--caption-column", default=d.caption_column, help="column holding the prompt (default caption)")
    g.add_argument("--on-error", choices=("raise", "skip"), default=d.on_error,
                   help="bad rows: stop naming the row (default) or skip and count them")
    g.add_argument("--device", default=d.device, help="torch device for the reward and text encoder: auto (cuda if "
                                                      "available), cpu, cuda, ...")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs / prompts per model call "
                                                                        f"(default {d.batch_size})")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """The verb: build :class:`FilterOptions` from the parsed flags, filter, print the summary."""
    opts = FilterOptions(
        data=args.data, out=args.out, top_k=args.top_k, top_fraction=args.top_fraction, reward=args.reward,
        reward_dimension=args.reward_dimension, margin_from_columns=args.margin_from_columns,
        signed_margin=args.signed_margin, alpha=args.alpha, quality=args.quality, min_words=args.min_words,
        max_words=args.max_words, gamma=args.gamma, text_encoder=args.text_encoder, knn_k=args.knn_k,
        knn_eps=args.knn_eps, split=args.split, caption_column=args.caption_column, on_error=args.on_error,
        device=args.device, batch_size=args.batch_size, show_progress=not args.no_progress)
    from diffalign.cli import _quiet_libraries

    _quiet_libraries()  # pipeline-loading chatter would bury the summary
    result = filter_dataset(opts)
    print(result["summary"])
    return 0


# ============================================================================================ raw rows


class _RawRows:
    """The input's rows with ALL their columns, numbered like the loader numbers them (0-based, source
    order), so that ``PairRecord.row`` indexes them. Subclasses per format."""

    kind: str  # output format: "parquet" | "jsonl" | "csv"
    names: list[str]
    n_rows: int

    def column(self, name: str) -> list[Any]:
        """Every row's value of ``name`` (``_MISSING`` where a row lacks it)."""
        raise NotImplementedError

    def write(self, rows: np.ndarray, extra: dict[str, np.ndarray], out: Path) -> None:
        """Write source rows ``rows`` (ascending) with the ``extra`` columns ([len(rows)] each) to ``out``."""
        raise NotImplementedError


class _ArrowRows(_RawRows):
    """Parquet files (or one in-memory arrow table from a datasets folder), read part by part."""

    kind = "parquet"

    def __init__(self, parts: list[tuple[str, Any]], names: list[str], sizes: list[int]) -> None:
        self.parts = parts  # (label for messages, parquet path or pa.Table)
        self.names = names
        self.sizes = sizes
        self.n_rows = sum(sizes)

    def _read(self, part: Any, columns: list[str] | None = None) -> "pa.Table":
        import pyarrow.parquet as pq

        if isinstance(part, Path):
            return pq.read_table(str(part), columns=columns)
        return part if columns is None else part.select(columns)

    def column(self, name: str) -> list[Any]:
        values: list[Any] = []
        for (_, part), size in zip(self.parts, self.sizes):
            names = _parquet_names(part) if isinstance(part, Path) else part.column_names
            if name not in names:
                values.extend([_MISSING] * size)  # a file without the column: every row lacks it
                continue
            values.extend(self._read(part, [name]).column(name).to_pylist())
        return values

    def write(self, rows: np.ndarray, extra: dict[str, np.ndarray], out: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        start = 0
        for (_, part), size in zip(self.parts, self.sizes):
            local = rows[(rows >= start) & (rows < start + size)] - start
            if local.size:  # read a part only if it holds kept rows
                tables.append(self._read(part).take(pa.array(local, type=pa.int64())))
            start += size
        # several files may differ slightly (e.g. one lacks label_1): promote to one schema, nulls where absent
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        for name in extra:  # re-filtering a filtered file replaces its selection columns
            if name in table.column_names:
                table = table.drop_columns([name])
        for name, values in extra.items():
            table = table.append_column(name, pa.array(values))
        _atomic(out, lambda tmp: pq.write_table(table, str(tmp)))


def _parquet_names(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.ParquetFile(str(path)).schema_arrow.names)


class _TextRows(_RawRows):
    """A .jsonl (one object per non-blank line) or .csv (header + records) file of image paths."""

    def __init__(self, kind: str, file: Path, records: list[dict[str, Any] | None], names: list[str]) -> None:
        self.kind = kind
        self.file = file
        self.records = records  # None: a .jsonl line that is not a JSON object (a bad row)
        self.names = names
        self.n_rows = len(records)

    def column(self, name: str) -> list[Any]:
        return [_MISSING if r is None else r.get(name, _MISSING) for r in self.records]

    def _rebased(self, rec: dict[str, Any], out: Path) -> dict[str, Any]:
        # Relative image paths resolve against the data file's folder; written elsewhere they must
        # become absolute or the subset would point at nothing.
        if out.parent.resolve() == self.file.parent.resolve():
            return dict(rec)
        rec = dict(rec)
        cols = next((p for p in _IMAGE_COLUMN_PAIRS if p[0] in rec and p[1] in rec), ())
        for c in cols:
            v = rec[c]
            if isinstance(v, str) and v.strip() and not Path(v).expanduser().is_absolute():
                rec[c] = os.path.abspath(self.file.parent / Path(v).expanduser())
        return rec

    def write(self, rows: np.ndarray, extra: dict[str, np.ndarray], out: Path) -> None:
        kept = []
        for j, r in enumerate(rows.tolist()):
            rec = self._rebased(self.records[r] or {}, out)
            for name in extra:
                rec.pop(name, None)
            for name, values in extra.items():
                v = values[j].item() if hasattr(values[j], "item") else values[j]
                rec[name] = v if self.kind == "jsonl" else repr(v)
            kept.append(rec)
        if self.kind == "jsonl":
            text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in kept)
        else:
            buf = io.StringIO()
            names = [n for n in self.names if n not in extra] + list(extra)
            writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            text = buf.getvalue()
        _atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _atomic(out: Path, write) -> None:
    """Write through a temporary sibling and rename it into place: no torn output on interruption."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    write(tmp)
    os.replace(tmp, out)


def _open_rows(spec: str, split: str) -> _RawRows:
    """The raw rows of a local source, numbered as load_preference_source numbers them."""
    from diffalign.data.preference import DataError, _parquet_files, is_saved_dataset_folder, load_saved_dataset

    p = Path(spec).expanduser()
    if p.is_dir():
        if is_saved_dataset_folder(p):
            obj = load_saved_dataset(p, split)
            table = obj.with_format("arrow")[:]  # honours any select()/shuffle() index mapping
            return _ArrowRows([(str(p), table)], list(table.column_names), [table.num_rows])
        files = _parquet_files(p, split)
        return _ArrowRows([(str(f), f) for f in files], _parquet_names(files[0]) if files else [],
                          [_parquet_rows(f) for f in files])
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _ArrowRows([(str(p), p)], _parquet_names(p), [_parquet_rows(p)])
    if suffix == ".jsonl":
        records: list[dict[str, Any] | None] = []
        names: list[str] = []
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue  # the loader does not count blank lines as rows
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                obj = obj if isinstance(obj, dict) else None
                if obj is not None and not names:
                    names = list(obj)
                records.append(obj)
        return _TextRows("jsonl", p, records, names)
    if suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = [dict(r) for r in reader]
            names = [c for c in (reader.fieldnames or []) if c is not None]
        return _TextRows("csv", p, rows, names)
    raise DataError(f"{spec}: diffalign filter reads local data only (a .parquet file or folder, a datasets "
                    "save_to_disk folder, .jsonl, .csv or toy:pairs); save a hub dataset locally first.")


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(str(path)).metadata.num_rows)


# ============================================================================================ terms


def _is_world(captions: Sequence[str]) -> bool:
    from diffalign.world.scenes import parse_caption

    try:
        for c in captions:
            parse_caption(c)
    except ValueError:
        return False
    return True


def _numeric_column(raw: _RawRows, name: str, rows: Sequence[int], where: "PreferenceSource", what: str) -> np.ndarray:
    """float64 [len(rows)] from column ``name``; DataError naming the row for a missing/non-numeric value."""
    from diffalign.data.preference import DataError

    values = raw.column(name)
    if all(v is _MISSING for v in values):
        raise DataError(f"{where.name}: {what} column {name!r} not found; columns present: {', '.join(raw.names)}")
    out = np.empty(len(rows), dtype=np.float64)
    for j, r in enumerate(rows):
        v = values[r]
        try:
            x = float(v) if v is not _MISSING and v is not None and not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            shown = "missing" if v is _MISSING else repr(v)
            raise DataError(f"{where.describe(r)}: row {r}: {what} column {name!r} must be a finite number, got {shown}")
        out[j] = x
    return out


def _winner_is_slot_0(raw: _RawRows, rows: Sequence[int]) -> np.ndarray:
    """bool [len(rows)]: label_0 == 1 (the loader has already checked every used label is 0 or 1)."""
    labels = raw.column("label_0")
    return np.array([float(labels[r]) == 1.0 for r in rows], dtype=bool)


def _device(spec: str):
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)


def _reward_margins(source: "PreferenceSource", opts: FilterOptions, reward_spec: str,
                    ) -> tuple[np.ndarray, np.ndarray, str, list[int]]:
    """(r_w [P'], r_l [P'], dimension used, indices into source.records of the P' pairs scored).

    Images are decoded per batch and scored with the reward; pairs whose image does not decode are an
    error naming the row, or left out (``--on-error skip``) and reported by the caller.
    """
    import torch
    from tqdm.auto import tqdm

    from diffalign.data.preference import DataError, decode_image
    from diffalign.rewards.base import RewardError
    from diffalign.rewards.registry import build_reward

    device = _device(opts.device)
    try:
        reward = build_reward(reward_spec, device)
    except RewardError:
        raise
    except Exception as e:  # providers raise OSError, ValueError, ...: all mean "cannot build it"
        raise RewardError(f"cannot build reward '{reward_spec}': {type(e).__name__}: {e}") from e
    if reward.input_kind != "image":
        raise RewardError(f"reward '{reward_spec}' scores {reward.input_kind} inputs; the margin needs an image reward")
    dims = tuple(reward.dimensions)
    dim = opts.reward_dimension or ("overall" if "overall" in dims else dims[0] if len(dims) == 1 else None)
    if dim is None or dim not in dims:
        raise RewardError(f"reward '{reward_spec}' has dimensions {', '.join(dims)}: pick one with --reward-dimension"
                          + (f" (got {opts.reward_dimension!r})" if opts.reward_dimension else ""))

    records = source.records
    r_w = np.full(len(records), np.nan)
    r_l = np.full(len(records), np.nan)
    bad: set[int] = set()
    bar = tqdm(total=len(records), desc="scoring pairs", unit="pair", disable=not opts.show_progress)
    for start in range(0, len(records), opts.batch_size):
        # (pair index, slot 0 = winner / 1 = loser, image [3, H, W] in [0, 1]); grouped by size below
        items: list[tuple[int, int, torch.Tensor]] = []
        for i in range(start, min(start + opts.batch_size, len(records))):
            rec = records[i]
            try:
                pics = [decode_image(ref, source=source.describe(rec.row), row=rec.row)
                        for ref in (rec.image_w, rec.image_l)]
            except DataError:
                if opts.on_error == "raise":
                    raise
                bad.add(i)
                continue
            for slot, pic in enumerate(pics):
                arr = torch.from_numpy(np.asarray(pic, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
                items.append((i, slot, arr))
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, (_, _, img) in enumerate(items):
            groups.setdefault(tuple(img.shape), []).append(j)
        for members in groups.values():  # dict keeps first-seen order: deterministic
            x = torch.stack([items[j][2] for j in members]).to(device)
            prompts = [records[items[j][0]].caption for j in members]
            with torch.no_grad():
                scores = reward(x, prompts)[dim].detach().to("cpu", torch.float64).numpy()
            for j, value in zip(members, scores):
                i, slot, _ = items[j]
                (r_w if slot == 0 else r_l)[i] = value
        bar.update(min(opts.batch_size, len(records) - start))
    bar.close()
    kept = [i for i in range(len(records)) if i not in bad]
    return r_w[kept], r_l[kept], dim, kept


def _family_spec(spec: str) -> tuple[str, str]:
    """(family, pretrained) for a model text-encoder spec; DataError listing the accepted forms."""
    from diffalign.data.preference import DataError
    from diffalign.models import ADAPTERS

    head, _, rest = spec.partition(":")
    if head == "world" and rest in ("unet", "flow"):
        return ("sd15" if rest == "unet" else "sd3"), spec
    if head == "tiny" and rest.split("-")[0] in ADAPTERS:
        return rest.split("-")[0], spec
    if head in ADAPTERS and rest:
        return head, rest
    raise DataError(f"--text-encoder {spec!r}: expected world:unet, world:flow, tiny:FAMILY, FAMILY:PATH_OR_ID "
                    f"(FAMILY in {', '.join(ADAPTERS)}), clip:PATH or words")


def embed_prompts(captions: Sequence[str], spec: str, device: str = "cpu", batch_size: int = 64,
                  show_progress: bool = False) -> np.ndarray:
    """Prompt embeddings float64 [N, D] for the kNN term, from the text encoder named by ``spec``.

    * ``words``: :func:`~diffalign.data.filter.hashed_bag_of_words` (weight-free, lexical).
    * ``clip:PATH``: a transformers CLIP folder -> its projected text embedding (what CLIP compares
      with images); a diffusers pipeline folder -> ``text_encoder`` + ``tokenizer``, pooled end-token state.
    * a model spec (world:unet, tiny:sd15, sdxl:PATH, ...): the family adapter's ``encode_prompts``:
      ``pooled_prompt_embeds`` when present; otherwise the token states [N, L, D] averaged over the
      positions from the first word to the end token. The start token is left out because under CLIP's
      causal mask its state is the same for every prompt; padding is left out because its states
      mostly repeat the end token's.
    """
    import torch
    from tqdm.auto import tqdm

    from diffalign.data.filter import hashed_bag_of_words

    if spec == "words":
        return hashed_bag_of_words(captions)
    dev = _device(device)
    if spec.startswith("clip:"):
        encode = _clip_encoder(spec[len("clip:"):], dev)
    else:
        from diffalign.config import ModelConfig
        from diffalign.models import load_adapter

        family, pretrained = _family_spec(spec)
        adapter = load_adapter(ModelConfig(family=family, pretrained=pretrained), device=dev)
        encode = _adapter_encoder(adapter)
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(captions), batch_size), desc="embedding prompts", disable=not show_progress):
            out.append(encode(list(captions[start:start + batch_size])).to("cpu", torch.float64).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1))


def _adapter_encoder(adapter):
    import torch

    tokenizer = getattr(adapter.pipe, "tokenizer", None)

    def encode(batch: list[str]) -> torch.Tensor:
        enc = adapter.encode_prompts(batch)
        if "pooled_prompt_embeds" in enc:
            return enc["pooled_prompt_embeds"].float()
        states = enc["prompt_embeds"].float()  # [B, L, D]
        if tokenizer is None:
            return states.mean(dim=1)
        ids = tokenizer(batch, padding="max_length", max_length=states.shape[1], truncation=True,
                        return_tensors="pt").input_ids
        positions = torch.arange(ids.shape[1])
        is_end = (ids == tokenizer.eos_token_id) & (positions >= 1)
        # the first end token after the start token (pad == eos in CLIP tokenizers, so take the first)
        end = torch.where(is_end.any(1), is_end.float().argmax(1), torch.full((ids.shape[0],), ids.shape[1] - 1))
        mask = ((positions[None] >= 1) & (positions[None] <= end[:, None])).to(states.device, states.dtype)
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    return encode


def _clip_encoder(path: str, device):
    import torch
    from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.models import ModelLoadError

    root = Path(path).expanduser()
    if not root.exists():
        raise ModelLoadError(f"--text-encoder clip:{path}: no such folder (give a CLIP model folder or a diffusers "
                             "pipeline folder with text_encoder/ and tokenizer/)")
    try:
        if (root / "text_encoder").is_dir():  # a diffusers pipeline: its (first) text tower
            tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
            model = CLIPTextModel.from_pretrained(str(root / "text_encoder"))
            projected = False
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(root))
            config = AutoConfig.from_pretrained(str(root))
            if config.model_type == "clip":  # a full CLIP: load only the text tower and its projection
                text_config = config.text_config
                text_config.projection_dim = config.projection_dim
                model = CLIPTextModelWithProjection.from_pretrained(str(root), config=text_config)
                projected = True
            else:
                projected = "CLIPTextModelWithProjection" in (config.architectures or [])
                cls = CLIPTextModelWithProjection if projected else CLIPTextModel
                model = cls.from_pretrained(str(root))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--text-encoder clip:{path}: could not load a CLIP text tower: {e}") from e
    model = model.to(device).eval()
    max_len = min(int(getattr(tokenizer, "model_max_length", 77) or 77), int(model.config.max_position_embeddings))

    def encode(batch: list[str]) -> torch.Tensor:
        ids = tokenizer(batch, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        out = model(input_ids=ids.input_ids.to(device))
        return (out.text_embeds if projected else out.pooler_output).float()

    return encode


# ============================================================================================ the verb


def _check_options(opts: FilterOptions) -> None:
    from diffalign.data.filter import top_count
    from diffalign.data.preference import DataError

    try:
        top_count(1, opts.top_k, opts.top_fraction)
    except ValueError as e:
        raise DataError(f"--top-k/--top-fraction: {e}") from None
    for name in ("alpha", "gamma", "knn_eps"):
        if not math.isfinite(getattr(opts, name)):
            raise DataError(f"--{name.replace('_', '-')} must be finite, got {getattr(opts, name)}")
    if opts.knn_eps <= 0:
        raise DataError(f"--knn-eps must be > 0, got {opts.knn_eps}")
    if opts.knn_k < 1:
        raise DataError(f"--knn-k must be >= 1, got {opts.knn_k}")
    if opts.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.quality != "words" and not (opts.quality.startswith("column:") and opts.quality[len("column:"):]):
        raise DataError(f"--quality must be 'words' or 'column:NAME', got {opts.quality!r}")
    if opts.quality == "words" and not 1 <= opts.min_words <= opts.max_words:
        raise DataError(f"need 1 <= --min-words <= --max-words, got {opts.min_words} and {opts.max_words}")
    if opts.margin_from_columns is not None and (opts.reward != "auto" or opts.reward_dimension is not None):
        raise DataError("--margin-from-columns takes the margin from the data; drop --reward/--reward-dimension "
                        "(or drop --margin-from-columns to score the images with the reward)")
    if opts.margin_from_columns is not None and len([c for c in opts.margin_from_columns.split(",") if c.strip()]) != 2:
        raise DataError(f"--margin-from-columns takes two column names A,B (scores of jpg_0 and jpg_1), "
                        f"got {opts.margin_from_columns!r}")


def _sidecar_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.stem + ".filter.json"), out.with_name(out.stem + ".filter.png")


def filter_dataset(opts: FilterOptions) -> dict[str, Any]:
    """Run the whole filter (see the module docstring); returns the sidecar record plus ``summary`` text."""
    from diffalign.data.filter import (distinct, fifa_scores, knn_log_distance, pair_margins, quantiles,
                                       select_top, top_count, word_count_quality)
    from diffalign.data.loading import resolve_data_path
    from diffalign.data.preference import DataError, load_preference_source

    _check_options(opts)
    spec = resolve_data_path(opts.data)
    out = Path(opts.out)
    source = load_preference_source(spec, split=opts.split, caption_column=opts.caption_column, ties="drop",
                                    on_error=opts.on_error)
    raw = _open_rows(spec, opts.split)
    if raw.n_rows != source.counts.rows:  # the row numbers would not point at the same rows
        raise DataError(f"{spec}: read {raw.n_rows} raw rows but the preference loader counted {source.counts.rows}; "
                        "cannot map pairs back to rows")
    suffix = {"parquet": ".parquet", "jsonl": ".jsonl", "csv": ".csv"}[raw.kind]
    if out.suffix.lower() != suffix:
        raise DataError(f"--out {opts.out}: the input is {raw.kind} data, so the output is written as {raw.kind}; "
                        f"give a path ending in {suffix}")
    inputs = {Path(f).resolve() for f, _ in getattr(raw, "parts", [])} | (
        {raw.file.resolve()} if isinstance(raw, _TextRows) else set())
    if out.resolve() in inputs:
        raise DataError(f"--out {opts.out} is the input file; write the subset somewhere else")

    records = list(source.records)
    resolved: dict[str, Any] = {}
    # ---- margin
    world = None
    if opts.margin_from_columns is not None:
        col_0, col_1 = (c.strip() for c in opts.margin_from_columns.split(","))
        rows = [r.row for r in records]
        s0 = _numeric_column(raw, col_0, rows, source, "margin")
        s1 = _numeric_column(raw, col_1, rows, source, "margin")
        slot0 = _winner_is_slot_0(raw, rows)
        r_w, r_l = np.where(slot0, s0, s1), np.where(slot0, s1, s0)
        resolved["margin"] = f"columns {col_0},{col_1}"
        skipped_images: list[int] = []
    else:
        reward_spec = opts.reward
        if reward_spec == "auto":
            world = _is_world([r.caption for r in records])
            reward_spec = "oracle" if world else "pickscore"
        r_w, r_l, dim, kept_idx = _reward_margins(source, opts, reward_spec)
        skipped_images = [records[i].row for i in sorted(set(range(len(records))) - set(kept_idx))]
        records = [records[i] for i in kept_idx]
        resolved["margin"] = f"reward {reward_spec} ({dim})"
    if not records:
        raise DataError(f"{spec}: no pair could be scored ({len(skipped_images)} skipped for unreadable images)")
    rows = np.array([r.row for r in records], dtype=np.int64)
    captions = [r.caption for r in records]
    margin = pair_margins(r_w, r_l, signed=opts.signed_margin)
    resolved["margin"] += ", signed r(winner) - r(loser)" if opts.signed_margin else ", |r0 - r1|"

    # ---- quality
    if opts.quality == "words":
        quality = word_count_quality(captions, opts.min_words, opts.max_words)
        resolved["quality"] = f"word-count proxy, 0 inside [{opts.min_words}, {opts.max_words}] words (not an LLM score)"
    elif opts.alpha != 0:
        quality = _numeric_column(raw, opts.quality[len("column:"):], rows.tolist(), source, "quality")
        resolved["quality"] = f"column {opts.quality[len('column:'):]}"
    else:
        quality = None
        resolved["quality"] = "not used (alpha = 0)"

    # ---- diversity, over distinct prompts
    unique, inverse = distinct(captions)
    log_knn = None
    if opts.gamma != 0:
        encoder = opts.text_encoder
        if encoder == "auto":
            world = _is_world(captions) if world is None else world
            if not world:
                raise DataError("--text-encoder auto picks world:unet only for embedded-world captions; for other data "
                                "name one: FAMILY:PATH (e.g. sd15:/models/sd15, the generator you will train), "
                                "clip:PATH (a CLIP folder) or words (weight-free bag of words); or --gamma 0")
            encoder = "world:unet"
        if len(unique) <= opts.knn_k:
            raise DataError(f"{spec}: {len(unique)} distinct prompts among the scored pairs, but the kNN term needs more "
                            f"than --knn-k={opts.knn_k}; lower --knn-k or use --gamma 0")
        emb = embed_prompts(unique, encoder, opts.device, opts.batch_size, opts.show_progress)
        try:
            log_knn = knn_log_distance(emb, opts.knn_k, opts.knn_eps)[inverse]
        except ValueError as e:
            raise DataError(f"--text-encoder {encoder}: {e}") from None
        resolved["text_encoder"] = encoder
        resolved["diversity"] = f"log cosine distance to the {opts.knn_k}-th nearest distinct prompt, floor {opts.knn_eps:g}"
    else:
        resolved["diversity"] = "not used (gamma = 0)"

    # ---- score and select
    scores = fifa_scores(margin, quality if opts.alpha != 0 else None, log_knn, alpha=opts.alpha, gamma=opts.gamma)
    n_keep = top_count(len(scores), opts.top_k, opts.top_fraction)
    order = select_top(scores, n_keep)
    rank = np.zeros(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, n_keep + 1)
    keep = np.sort(order)  # write in source order; fifa_rank holds the ranking
    extra: dict[str, np.ndarray] = {"fifa_score": scores[keep], "fifa_margin": margin[keep]}
    if quality is not None:
        extra["fifa_quality"] = quality[keep]
    if log_knn is not None:
        extra["fifa_log_knn"] = log_knn[keep]
    extra["fifa_rank"] = rank[keep]
    extra["source_row"] = rows[keep]
    raw.write(rows[keep], extra, out)

    # ---- sidecar, plot, summary
    json_path, png_path = _sidecar_paths(out)
    kept_mask = np.zeros(len(scores), dtype=bool)
    kept_mask[order] = True
    threshold = float(scores[order[-1]])
    terms = {"score": scores, "margin": margin}
    if quality is not None:
        terms["quality"] = quality
    if log_knn is not None:
        terms["log_knn"] = log_knn
    counts = {"rows": source.counts.rows, "ties_dropped": source.counts.ties_dropped,
              "bad_rows_skipped": len(source.counts.skipped) + len(skipped_images), "pairs_scored": len(scores),
              "distinct_prompts": len(unique), "kept": int(n_keep)}
    record: dict[str, Any] = {
        "tool": "diffalign filter (FiFA-style selection)",
        "formula": "s = margin + alpha * q(c) + gamma * log(max(rho_k(c), eps))",
        "input": opts.data, "input_fingerprint": source.fingerprint, "output": str(out),
        "options": {k: v for k, v in asdict(opts).items() if k != "show_progress"},
        "resolved": resolved, "counts": counts, "threshold_score": threshold,
        "quantiles": {f"{name}_{which}": quantiles(v if which == "all" else v[kept_mask])
                      for name, v in terms.items() for which in ("all", "kept")},
        "means": {f"{name}_{which}": float((v if which == "all" else v[kept_mask]).mean())
                  for name, v in terms.items() for which in ("all", "kept")},
    }
    _atomic(json_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    _plot(png_path, terms, kept_mask, threshold, opts)
    record["summary"] = _summary(record, out, json_path, png_path, opts)
    return record


def _summary(record: dict[str, Any], out: Path, json_path: Path, png_path: Path, opts: FilterOptions) -> str:
    c, r, q = record["counts"], record["resolved"], record["quantiles"]
    how = f"top {opts.top_k}" if opts.top_k is not None else f"top {opts.top_fraction:g} fraction"
    lines = ["", "== diffalign filter (FiFA) ==",
             f"input      {record['input']}: {c['rows']} rows read, {c['pairs_scored']} pairs scored, "
             f"{c['ties_dropped']} ties dropped, {c['bad_rows_skipped']} bad rows skipped, "
             f"{c['distinct_prompts']} distinct prompts",
             f"score      s = margin + {opts.alpha:g} * q + {opts.gamma:g} * log rho_{opts.knn_k}",
             f"  margin   {r['margin']}", f"  q        {r['quality']}",
             f"  rho_k    {r['diversity']}" + (f"; encoder {r['text_encoder']}" if "text_encoder" in r else ""),
             f"kept       {c['kept']} of {c['pairs_scored']} pairs ({how}); lowest kept score {record['threshold_score']:.4g}",
             f"{'quantiles':20s}" + "".join(f"{k:>9s}" for k in q["score_all"])]
    for name, values in q.items():
        lines.append(f"  {name:18s}" + "".join(f"{v:9.4g}" for v in values.values()))
    lines += [f"outputs    {out}  {json_path.name}  {png_path.name}",
              f"train      diffalign train RECIPE data.path={out}"]
    return "\n".join(lines)


def _plot(path: Path, terms: dict[str, np.ndarray], kept: np.ndarray, threshold: float, opts: FilterOptions) -> None:
    """Histograms (all pairs vs kept pairs) of the score and each computed term, one panel each."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also the only backend whose PNG bytes we rely on being stable
    import matplotlib.pyplot as plt

    labels = {"score": "selection score s", "margin": "margin", "quality": f"q(c) (x alpha={opts.alpha:g})",
              "log_knn": f"log rho_{opts.knn_k} (x gamma={opts.gamma:g})"}
    fig, axes = plt.subplots(1, len(terms), figsize=(3.4 * len(terms), 2.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], terms.items()):
        lo, hi = float(values.min()), float(values.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
        ax.hist(values, bins=bins, color="0.7", label=f"all ({values.size})")
        ax.hist(values[kept], bins=bins, color="tab:orange", label=f"kept ({int(kept.sum())})")
        if name == "score":
            ax.axvline(threshold, color="tab:red", lw=1)
        ax.set_title(labels[name], fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(str(tmp), format="png", dpi=80, metadata={"Software": None}))
    plt.close(fig)
