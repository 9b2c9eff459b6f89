"""Latent + text-embedding cache: encode a preference dataset ONCE, train from latents.

Layout of a cache folder::

    manifest.json            what was encoded and how (model, resolution, preprocessing, dataset identity,
                             counts, tensor shapes); written last, so a folder without it is incomplete
    empty_prompt.safetensors text.<key> [1, ...]: the empty-prompt embedding used for prompt dropout
    shard-00000.safetensors  latents_w, latents_l [N,C,h,w]; text.<key> [N,...]; original_size_w/l,
                             crop_top_left [N,2]; row [N] (row in the source, for messages); and, when
                             built with data.score_column, score_w, score_l [N] (float32 rewards, oriented)

Training compares the manifest with its own config and refuses a cache that differs, listing every
differing key with both values. Augmentation (crop, flip) is frozen at cache time with data seed 0
of the run that built it; prompt dropout stays a training-time choice.

Unpaired labelled images (Diffusion-KTO data, diffalign.data.unpaired) cache the same way, one image per row:
the manifest says ``"kind": "unpaired"`` (absent = ``"pairs"``) and its shards hold ``latents`` [N,C,h,w],
``desirable`` [N] (bool), ``text.<key>``, ``original_size``, ``crop_top_left`` [N,2] and ``row`` [N]; the counts are
rows, samples, desirable, undesirable and skipped, and ``data.label_column`` is a manifest key.

Per-image scores (GAPO, Flow-RWR) are part of the cache's identity: ``data.score_column`` is a manifest key,
so a cache built without scores is refused for a run that asks for them (and the other way round), with a
message saying to rebuild it with the score column.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffalign.config import RunConfig

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


CAPTIONS = "captions.json"


class CacheMismatchError(ValueError):
    """The cache was built for a different model/data/preprocessing than the run asks for."""


def data_identity(path: str, split: str) -> str:
    """Cheap, stable identity of a local dataset: file names, sizes and the hash of their first and last MiB.

    Hashing every byte of Pick-a-Pic (hundreds of GB) just to check a cache is not worth it; names, sizes
    and head/tail bytes change whenever the data is rewritten. A hub id hashes to its name and split.
    """
    p = Path(path)
    h = hashlib.sha256()
    if not p.exists():
        h.update(f"hub:{path}:{split}".encode())
        return h.hexdigest()[:16]
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if f != p else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_CHUNK))
            if size > 2 * _CHUNK:
                fh.seek(-_CHUNK, os.SEEK_END)
                h.update(fh.read(_CHUNK))
    return h.hexdigest()[:16]


def expected_manifest_keys(cfg: RunConfig) -> dict[str, Any]:
    """The part of a manifest that must equal the run's config for the cache to be usable."""
    from diffalign.data.loading import resolve_data_path

    from diffalign.data.loading import data_kind_of

    data_path = resolve_data_path(cfg.data.path)
    # unpaired data only: a key absent from pair caches (old ones included) must not make them mismatch
    unpaired = {"data.label_column": cfg.data.label_column} if data_kind_of(cfg.data) == "unpaired" else {}
    return {
        "model.family": cfg.model.family,
        "model.pretrained": cfg.model.pretrained,
        "model.revision": cfg.model.revision,
        "model.variant": cfg.model.variant,
        "model.vae": cfg.model.vae,
        "model.max_sequence_length": cfg.model.max_sequence_length,
        "data.resolution": cfg.data.resolution,
        "data.width": cfg.data.width,  # None (square) is also what caches written before it hold
        "data.center_crop": cfg.data.center_crop,
        "data.random_flip": cfg.data.random_flip,
        "data.path": cfg.data.path,
        "data.split": cfg.data.split,
        "data.caption_column": cfg.data.caption_column,
        "data.ties": cfg.data.ties,
        "data.max_pairs": cfg.data.max_pairs,
        "data.identity": data_identity(data_path, cfg.data.split),
        # absent from caches written before scores existed: get() gives None there, which equals the default
        "data.score_column": cfg.data.score_column,
        # video settings; None for image runs, which is also what caches written before video data hold
        "data.num_frames": cfg.data.num_frames,
        "data.fps": float(cfg.data.fps) if cfg.data.num_frames is not None else None,
        "data.dimension_weights": ({str(k): float(v) for k, v in cfg.data.dimension_weights.items()}
                                   if cfg.data.dimension_weights is not None else None),
        **unpaired,
    }


def check_manifest(cache_dir: str | Path, cfg: RunConfig) -> dict:
    """Load the manifest and raise CacheMismatchError listing every key that differs from ``cfg``."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise CacheMismatchError(f"cache.dir={str(cache_dir)!r} has no {MANIFEST}: it is missing or incomplete. "
                                 f"Build it with: diffalign cache <config> cache.dir={cache_dir}")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(f"{path}: cache format {manifest.get('format_version')} != {FORMAT_VERSION}; rebuild it")
    want = expected_manifest_keys(cfg)
    have = manifest["keys"]
    diffs = [f"  {k}: cache has {have.get(k)!r}, config wants {v!r}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        hint = ""
        video_keys = [k for k in ("data.num_frames", "data.fps") if have.get(k) != want[k]]
        if video_keys:
            hint += ("\nThe cache was built with other video settings (" + ", ".join(
                f"{k}={have.get(k)!r}" for k in video_keys) + "; this run wants " + ", ".join(
                f"{k}={want[k]!r}" for k in video_keys) + "): latents of other clips cannot be reused.")
        if have.get("data.score_column") != want["data.score_column"]:
            hint += ("\nThe cache was built " + ("without per-image scores" if have.get("data.score_column") is None
                                                 else f"with data.score_column={have.get('data.score_column')!r}")
                    + (f"; this run reads scores from data.score_column={want['data.score_column']!r} (objectives "
                       "gapo and rwr need them): rebuild the cache with that setting."
                       if want["data.score_column"] is not None else "; set data.score_column to match it."))
        raise CacheMismatchError(
            f"cache {cache_dir} does not match this run's config:\n" + "\n".join(diffs) + hint
            + "\nRebuild it (diffalign cache <config> cache.dir=NEW_DIR) or fix the config."
        )
    return manifest


def _encode_pairs(adapter, batch: dict, store: torch.dtype) -> dict[str, torch.Tensor]:
    """One collated pair batch -> the shard tensors of its pairs (latents of winners and losers in one VAE call)."""
    latents = adapter.encode_images(torch.cat([batch["pixels_w"], batch["pixels_l"]]))
    nb = batch["pixels_w"].shape[0]
    text = adapter.encode_prompts(batch["caption"])
    return {
        "latents_w": latents[:nb].to(store).cpu(), "latents_l": latents[nb:].to(store).cpu(),
        "original_size_w": batch["original_size_w"], "original_size_l": batch["original_size_l"],
        "crop_top_left": batch["crop_top_left"], "row": torch.tensor(batch["row"], dtype=torch.long),
        **{f"text.{k}": v.to(store).cpu() for k, v in text.items()},
        # rewards stay float32 whatever cache.dtype: bf16 would round a [0, 1] score to ~3 digits
        **{k: batch[k].float() for k in ("score_w", "score_l") if k in batch},
    }


def _encode_samples(adapter, batch: dict, store: torch.dtype) -> dict[str, torch.Tensor]:
    """One collated batch of labelled images -> the shard tensors of its images (labels stay bool)."""
    text = adapter.encode_prompts(batch["caption"])
    return {
        "latents": adapter.encode_images(batch["pixels"]).to(store).cpu(), "desirable": batch["desirable"].bool(),
        "original_size": batch["original_size"], "crop_top_left": batch["crop_top_left"],
        "row": torch.tensor(batch["row"], dtype=torch.long), **{f"text.{k}": v.to(store).cpu() for k, v in text.items()},
    }


def build_cache(cfg: RunConfig, adapter, out_dir: str | Path | None = None, *, show_progress: bool = True) -> dict:
    """Encode every usable pair (or, for unpaired data, every labelled image) of ``cfg.data`` with ``adapter`` into
    ``out_dir`` (default cfg.cache.dir).

    Written to a temporary sibling folder and renamed into place, so an interrupted run leaves no
    half-cache behind. Returns the manifest.
    """
    from diffalign.data.loading import collate_for, dataset_for, load_source_for
    from diffalign.data.preference import score_columns_from
    from diffalign.models.base import DTYPES

    out_dir = Path(out_dir or cfg.cache.dir or "")
    if not str(out_dir):
        raise ValueError("no cache folder: set cache.dir=PATH")
    source = load_source_for(cfg.data)
    dataset = dataset_for(cfg.data, source, seed=0)
    collate = collate_for(source)
    unpaired = source.kind == "unpaired"
    encode, unit = (_encode_samples, "samples") if unpaired else (_encode_pairs, "pairs")
    store = DTYPES[cfg.cache.dtype]
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({f"text.{k}": v.to(store).contiguous() for k, v in adapter.encode_prompts([""]).items()},
              str(tmp / "empty_prompt.safetensors"))

    shards: list[dict] = []
    buffer: dict[str, list[torch.Tensor]] = {}
    skipped_decode: list[tuple[int, str]] = []
    captions: list[str] = []  # in cache order: online pair providers score their samples against them
    n_written = 0
    n_desirable = 0  # unpaired data: desirable images written (decode failures excluded)

    def flush(limit: int | None = None) -> None:
        """Write the first ``limit`` buffered pairs (all if None) as one shard; keep the rest buffered."""
        nonlocal buffer
        if not buffer:
            return
        tensors = {k: torch.cat(v) for k, v in buffer.items()}
        n = tensors["row"].shape[0] if limit is None else limit
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({k: v[:n].contiguous() for k, v in tensors.items()}, str(tmp / name))
        shards.append({"file": name, unit: n})
        rest = tensors["row"].shape[0] - n
        buffer = {k: [v[n:]] for k, v in tensors.items()} if rest else {}

    bs = cfg.cache.batch_size
    bar = tqdm(total=len(dataset), desc=f"caching {unit}", unit=unit[:-1], disable=not show_progress)
    for start in range(0, len(dataset), bs):
        items = []
        for i in range(start, min(start + bs, len(dataset))):
            item = dataset[(i, 0)]
            if item is None:
                rec = source.records[i]
                skipped_decode.append((rec.row, "corrupt, unreadable or too short image/video"))
            items.append(item)
        bar.update(len(items))
        batch = collate(items)
        if "row" not in batch:  # every item of this batch failed to decode (skip mode)
            continue
        rows = encode(adapter, batch, store)
        nb = len(batch["row"])
        if unpaired:
            n_desirable += int(batch["desirable"].sum())
        for k, v in rows.items():
            buffer.setdefault(k, []).append(v)
        captions.extend(batch["caption"])
        n_written += nb
        while buffer and sum(t.shape[0] for t in buffer["row"]) >= cfg.cache.shard_size:
            flush(cfg.cache.shard_size)
    flush()
    bar.close()
    if n_written == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{cfg.data.path}: no usable {unit} to cache (all rows were " +
                         ("bad or unreadable)" if unpaired else "ties or bad)"))

    with safe_open(str(tmp / shards[0]["file"]), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()[1:]) for k in f.keys()}
    skipped = {"skipped": len(source.counts.skipped) + len(skipped_decode),
               "skipped_rows": [list(x) for x in (list(source.counts.skipped) + skipped_decode)][:100]}
    if unpaired:  # class counts of what was written (decode failures removed): kto_balance reads them
        counts = {"rows": source.counts.rows, "samples": n_written, "desirable": n_desirable,
                  "undesirable": n_written - n_desirable, **skipped}
    else:
        counts = {"rows": source.counts.rows, "pairs": n_written, "ties_dropped": source.counts.ties_dropped, **skipped}
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": source.kind,
        "keys": expected_manifest_keys(cfg),
        "preprocessing": {"vae_latent": "posterior mean, (z - shift) * scaling", "augmentation_seed": 0,
                          "pixel_range": "[-1, 1]", "dtype": cfg.cache.dtype},
        "scores": ({"columns": list(score_columns_from(cfg.data.score_column)), "dtype": "float32"}
                   if cfg.data.score_column is not None else None),
        "adapter": {"family": adapter.family, "text_keys": list(adapter.text_keys)},
        "counts": counts,
        "shapes": shapes,
        "shards": shards,
    }
    (tmp / CAPTIONS).write_text(json.dumps(captions))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return manifest


class CachedPairDataset(torch.utils.data.Dataset):
    """Pairs read lazily from a cache's shards; items match the on-the-fly dataset plus ``text``."""

    unit = "pairs"  # the manifest's per-shard count key

    def __init__(self, cache_dir: str | Path, manifest: dict):
        self.dir = Path(cache_dir)
        self.manifest = manifest
        self.text_keys = manifest["adapter"]["text_keys"]
        self.index: list[tuple[int, int]] = []
        for s, shard in enumerate(manifest["shards"]):
            self.index.extend((s, j) for j in range(shard[self.unit]))
        self._handles: dict[int, Any] = {}
        with safe_open(str(self.dir / "empty_prompt.safetensors"), "pt") as f:
            self.empty_text = {k[len("text."):]: f.get_tensor(k).float() for k in f.keys()}
        # caches written before captions were stored have none: batches then carry no "caption"
        captions_file = self.dir / CAPTIONS
        self.captions: list[str] | None = json.loads(captions_file.read_text()) if captions_file.is_file() else None

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, s: int):
        if s not in self._handles:  # opened lazily per worker process; safetensors memory-maps the file
            self._handles[s] = safe_open(str(self.dir / self.manifest["shards"][s]["file"]), "pt")
        return self._handles[s]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i = key[0] if isinstance(key, tuple) else key
        s, j = self.index[i]
        f = self._shard(s)
        item = {k: f.get_slice(k)[j:j + 1][0] for k in f.keys()}
        text = {k: item.pop(f"text.{k}").float() for k in self.text_keys}
        return {
            "latents_w": item["latents_w"].float(), "latents_l": item["latents_l"].float(), "text": text,
            "original_size_w": item["original_size_w"], "original_size_l": item["original_size_l"],
            "crop_top_left": item["crop_top_left"], "row": int(item["row"]),
            **{k: item[k].float() for k in ("score_w", "score_l") if k in item},
            **({"caption": self.captions[i]} if self.captions is not None else {}),
        }

    def scores(self) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
        """(score_w [N], score_l [N], source rows) of every cached pair, or None for a cache without scores."""
        parts: dict[str, list[torch.Tensor]] = {"score_w": [], "score_l": [], "row": []}
        for s in range(len(self.manifest["shards"])):
            f = self._shard(s)
            if "score_w" not in f.keys():
                return None
            for k in parts:
                parts[k].append(f.get_tensor(k))
        return torch.cat(parts["score_w"]).float(), torch.cat(parts["score_l"]).float(), torch.cat(parts["row"]).tolist()

    def __getstate__(self):  # safetensors handles do not pickle into DataLoader workers
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class CachedSampleDataset(CachedPairDataset):
    """Labelled images of an unpaired cache (``kind: unpaired``); items match the on-the-fly
    :class:`~diffalign.data.unpaired.LabelledImageDataset` with ``latents`` instead of ``pixels``, plus ``text``."""

    unit = "samples"

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i = key[0] if isinstance(key, tuple) else key
        s, j = self.index[i]
        f = self._shard(s)
        item = {k: f.get_slice(k)[j:j + 1][0] for k in f.keys()}
        return {
            "latents": item["latents"].float(), "desirable": item["desirable"].bool(),
            "text": {k: item[f"text.{k}"].float() for k in self.text_keys},
            "original_size": item["original_size"], "crop_top_left": item["crop_top_left"], "row": int(item["row"]),
            **({"caption": self.captions[i]} if self.captions is not None else {}),
        }

    def scores(self) -> None:
        """Unpaired caches hold labels, not reward scores."""
        return None


def cached_dataset(cache_dir: str | Path, manifest: dict) -> CachedPairDataset:
    """The cache's dataset for its manifest's kind (pairs, or unpaired labelled images)."""
    kind = manifest.get("kind", "pairs")
    return (CachedSampleDataset if kind == "unpaired" else CachedPairDataset)(cache_dir, manifest)


def collate_cached(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in ("text", "row", "caption")}
    out["text"] = {k: torch.stack([it["text"][k] for it in items]) for k in items[0]["text"]}
    out["row"] = [it["row"] for it in items]
    if "caption" in items[0]:
        out["caption"] = [it["caption"] for it in items]
    out["skipped"] = 0
    return out
