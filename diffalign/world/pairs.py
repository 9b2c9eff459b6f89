"""Sampling world generators and turning samples into oracle-labelled preference pairs.

`diffalign world pairs`: for each training prompt, sample the generator K times, score every sample
with the oracle, and pair the oracle-best against the oracle-worst. Written in the Pick-a-Pic format
(jpg_0, jpg_1 as PNG bytes, label_0, caption) plus the oracle scores of both images, so it flows
through the normal data and cache path.

Reward-model training needs per-dimension preferences, which best-vs-worst by ``overall`` alone
under-samples (the two images of such a pair mostly differ on whichever dimension fails most), so
``make_pairs(..., pairing="all")`` keeps every within-prompt pair instead, and :func:`render_pairs` /
:func:`make_render_pairs` build pairs from renders of the prompt's scene with randomly changed
attributes (every dimension varies, independently). Both write the same columns.

The video world's generator (a WanPipeline, ``world:video``) goes through the same functions: its
samples are clips uint8 [F, H, W, 3] scored by :mod:`diffalign.world.video_oracle`, and since the data
path reads videos from files, :func:`make_pairs` then writes each paired clip as a GIF beside a
``.jsonl`` table of relative paths (GIF at ``VIDEO_GEN_FPS`` = 10 is lossless here: a 16x16 frame has
at most 256 colours and 10 fps is a whole number of 1/100 s delays).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm


def world_kind(pipe) -> str:
    """'unet', 'flow' or 'video': which world generator ``pipe`` is, from its pipeline class."""
    name = type(pipe).__name__
    if name.startswith("Wan"):
        return "video"
    return "flow" if name.startswith("StableDiffusion3") else "unet"


def world_sample_kwargs(kind: str) -> dict:
    """Extra pipeline arguments a world generator of ``kind`` must be sampled with (what it was trained with)."""
    if kind == "video":
        from diffalign.world.generators import VIDEO_GEN_FRAMES, VIDEO_TEXT_LEN
        from diffalign.world.video import VIDEO_SIZE

        return {"num_frames": VIDEO_GEN_FRAMES, "height": VIDEO_SIZE, "width": VIDEO_SIZE,
                "max_sequence_length": VIDEO_TEXT_LEN}
    return {"max_sequence_length": 1} if kind == "flow" else {}


def generator_family(model: str) -> str:
    """The adapter family ('sd15', 'sd3' or 'wan') of a world generator given as ``world:<kind>`` or a
    pipeline folder, read from its model_index.json (not guessed from the name)."""
    from diffalign.models import ADAPTERS, ModelLoadError, resolve_pretrained
    from diffalign.world.pretrain import KIND_FAMILY

    families = {ADAPTERS[f].pipeline_class_name: f for f in KIND_FAMILY.values()}  # the world generators' pipelines
    index = Path(resolve_pretrained(model)) / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{model}: no model_index.json at {index}; give world:unet, world:flow, world:video "
                             "or a folder written by `diffalign world pretrain`")
    name = json.loads(index.read_text()).get("_class_name", "")
    if name not in families:
        raise ModelLoadError(f"{model}: a {name or 'unknown'} pipeline is not a world generator "
                             f"(expected one of {', '.join(families)})")
    return families[name]


def world_oracle(kind: str):
    """(score function, its dimensions) of the oracle that judges ``kind``'s samples. The video scores
    also carry VideoReward's VQ / MQ / TA (``videoreward_scores``), so video pairs can train reward models."""
    if kind == "video":
        from diffalign.world.video_oracle import VIDEO_DIMENSIONS, score_clips_videoreward

        return score_clips_videoreward, VIDEO_DIMENSIONS
    from diffalign.world.oracle import DIMENSIONS, score

    return score, DIMENSIONS


@torch.no_grad()
def generate(pipe, captions: list[str], seeds: list[int], *, steps: int = 20, guidance_scale: float = 3.0,
             batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
    """Sample ``pipe`` once per (caption, seed); sample i depends only on its own seed.

    Returns uint8 images [N, H, W, 3], or clips [N, F, H, W, 3] for the video world's WanPipeline.
    """
    kind = world_kind(pipe)
    pipe.set_progress_bar_config(disable=True)  # one bar over batches here, not one per batch from diffusers
    out = []
    for start in tqdm(range(0, len(captions), batch_size), desc="sampling", disable=not show_progress):
        caps = captions[start:start + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        result = pipe(prompt=caps, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                      output_type="np", **world_sample_kwargs(kind))
        media = result.frames if kind == "video" else result.images
        out.append((np.clip(media, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


PAIRINGS: tuple[str, ...] = ("best-worst", "all", "random")


def _select_pairs(overall: np.ndarray, pairing: str, min_gap: float, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(caption index, sample index in slot 0, sample index in slot 1) for each kept pair.

    ``overall`` is [captions, k]. Slots are shuffled so neither slot is biased towards the better image.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is not one of {PAIRINGS}")
    out = []
    for i in range(overall.shape[0]):
        if pairing == "best-worst":
            best, worst = int(overall[i].argmax()), int(overall[i].argmin())
            if overall[i, best] - overall[i, worst] < min_gap or best == worst:
                continue
            candidates = [(best, worst)]
        elif pairing == "all":
            k = overall.shape[1]
            candidates = [(a, b) for a in range(k) for b in range(a + 1, k)]
        else:
            candidates = [tuple(int(j) for j in rng.choice(overall.shape[1], size=2, replace=False))]
        for a, b in candidates:
            if pairing != "best-worst" and abs(overall[i, a] - overall[i, b]) < min_gap:
                continue
            out.append((i, a, b) if rng.random() < 0.5 else (i, b, a))
    return out


def _pair_table(media, scores: dict[str, np.ndarray], captions: list[str],
                pairs: list[tuple[int, int, int]]) -> dict[str, list]:
    """Pick-a-Pic columns (+ per-dimension oracle scores ``{dim}_0``/``{dim}_1``) for flat sample indices.

    ``media(flat)`` gives what goes in ``jpg_*`` for a sample (PNG bytes, or a video file's path);
    ``pairs`` holds (caption index, flat index of slot 0, flat index of slot 1); label_0 is 1 when slot 0
    has the higher overall score, 0 when slot 1 has, 0.5 on an exact tie.
    """
    dims = [d for d in scores if d != "overall"]
    rows: dict[str, list] = {"jpg_0": [], "jpg_1": [], "label_0": [], "caption": [], "score_0": [], "score_1": []}
    for d in dims:
        rows[f"{d}_0"], rows[f"{d}_1"] = [], []
    for i, f0, f1 in pairs:
        for slot, flat in enumerate((f0, f1)):
            rows[f"jpg_{slot}"].append(media(flat))
            rows[f"score_{slot}"].append(float(scores["overall"][flat]))
            for d in dims:
                rows[f"{d}_{slot}"].append(float(scores[d][flat]))
        s0, s1 = float(scores["overall"][f0]), float(scores["overall"][f1])
        rows["label_0"].append(1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5)
        rows["caption"].append(captions[i])
    return rows


def _write_table(rows: dict[str, list], out_path: str | Path) -> Path:
    """A .parquet, or a .jsonl (one JSON object per row; bytes columns are not allowed there)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".jsonl":
        names = list(rows)
        with open(out_path, "w") as fh:
            for values in zip(*(rows[n] for n in names)):
                fh.write(json.dumps(dict(zip(names, values))) + "\n")
        return out_path
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(rows), out_path)
    return out_path


def _require_jsonl(out_path: Path) -> None:
    if out_path.suffix != ".jsonl":
        raise ValueError(f"{out_path}: video pairs are written as a .jsonl table of clip files (the data path reads "
                         f"videos from files, not from parquet bytes); give an out path ending in .jsonl")


def _media_writer(samples: np.ndarray, kind: str, out_path: Path):
    """flat index -> the ``jpg_*`` value of that sample: PNG bytes for images; for clips, a GIF written
    to ``<out_path stem>-clips/`` and its path relative to the table (the data path reads video files)."""
    if kind != "video":
        return lambda flat: png_bytes(samples[flat])
    from diffalign.rewards.media import write_video
    from diffalign.world.generators import VIDEO_GEN_FPS

    _require_jsonl(out_path)
    folder = out_path.with_name(out_path.stem + "-clips")

    def write(flat: int) -> str:
        path = write_video(folder / f"{flat:06d}.gif", samples[flat], VIDEO_GEN_FPS)
        return str(path.relative_to(out_path.parent))

    return write


def _sample_k(pipe, captions: list[str], k: int, seed: int, steps: int, guidance_scale: float,
              show_progress: bool) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """k samples per caption (caption-major; sample i seeded ``seed * 1_000_003 + i``) and their oracle scores."""
    all_caps = [c for c in captions for _ in range(k)]
    seeds = [seed * 1_000_003 + i for i in range(len(all_caps))]
    samples = generate(pipe, all_caps, seeds, steps=steps, guidance_scale=guidance_scale, show_progress=show_progress)
    score, _ = world_oracle(world_kind(pipe))
    return all_caps, samples, score(samples, all_caps)


def make_pairs(pipe, captions: list[str], out_path: str | Path, *, k: int = 8, seed: int = 0, steps: int = 20,
               guidance_scale: float = 3.0, min_gap: float = 0.0, show_progress: bool = True,
               pairing: str = "best-worst") -> dict:
    """Sample k images (or clips) per caption, pair them, write a Pick-a-Pic table with per-dimension oracle scores.

    ``pairing``: "best-worst" (default; oracle-best vs oracle-worst by overall, one pair per caption),
    "all" (every one of the k(k-1)/2 within-caption pairs: per-dimension preferences for reward-model
    training) or "random" (one random within-caption pair). Pairs whose overall gap is below
    ``min_gap`` are left out (no real preference). Images go into a parquet as PNG bytes; clips of the
    video generator into GIF files beside a ``.jsonl`` ``out_path``. Returns counts and mean scores.
    """
    out_path, kind = Path(out_path), world_kind(pipe)
    if kind == "video":  # fail before sampling, not after
        _require_jsonl(out_path)
    all_caps, samples, scores = _sample_k(pipe, captions, k, seed, steps, guidance_scale, show_progress)
    overall = scores["overall"].reshape(len(captions), k)
    rng = np.random.default_rng(seed)
    pairs = [(i, i * k + a, i * k + b) for i, a, b in _select_pairs(overall, pairing, min_gap, rng)]
    _write_table(_pair_table(_media_writer(samples, kind, out_path), scores, captions, pairs), out_path)
    return {"prompts": len(captions), "pairs": len(pairs), "samples_per_prompt": k, "pairing": pairing,
            "mean_overall": float(scores["overall"].mean()),
            "mean_best": float(overall.max(1).mean()), "mean_worst": float(overall.min(1).mean())}



def make_labelled(pipe, captions: list[str], out_path: str | Path, *, k: int = 6, seed: int = 0, steps: int = 20,
                  guidance_scale: float = 3.0, threshold: float = 0.6, show_progress: bool = True) -> dict:
    """Unpaired labelled images for Diffusion-KTO: sample k images per caption and label each one ALONE,
    "desirable" when its oracle overall score is >= ``threshold``, else "undesirable" (a thumbs up/down per
    image, no pairs). Writes a parquet with ``image`` (PNG bytes), ``caption``, ``label``, ``score`` and
    the per-dimension oracle scores; the same seeds as :func:`make_pairs` with equal arguments.
    Returns counts and mean scores."""
    from diffalign.world.oracle import DIMENSIONS

    if world_kind(pipe) == "video":
        raise ValueError("make_labelled writes images; unpaired labels for the video world are not built yet "
                         "(use make_pairs for video preference pairs)")
    all_caps, images, scores = _sample_k(pipe, captions, k, seed, steps, guidance_scale, show_progress)
    desirable = scores["overall"] >= threshold
    rows = {"image": [png_bytes(im) for im in images], "caption": all_caps,
            "label": ["desirable" if d else "undesirable" for d in desirable],
            "score": [float(v) for v in scores["overall"]]}
    rows.update({d: [float(v) for v in scores[d]] for d in DIMENSIONS})
    _write_table(rows, out_path)
    return {"prompts": len(captions), "images": len(all_caps), "samples_per_prompt": k, "threshold": threshold,
            "desirable": int(desirable.sum()), "undesirable": int((~desirable).sum()),
            "mean_overall": float(scores["overall"].mean())}

_ATTRIBUTES = ("shape", "color", "size", "position", "background")


def _vocab() -> dict[str, tuple[str, ...]]:
    from diffalign.world.scenes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES

    return {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "position": POSITIONS,
            "background": tuple(BACKGROUNDS)}


def _change(scene, attributes: list[str], rng: np.random.Generator):
    """``scene`` with each named attribute replaced by a different random value."""
    from diffalign.world.scenes import Scene

    vocab = _vocab()
    attrs = {f: getattr(scene, f) for f in _ATTRIBUTES}
    for f in attributes:
        others = [v for v in vocab[f] if v != attrs[f]]
        attrs[f] = others[int(rng.integers(len(others)))]
    return Scene(**attrs)


def perturb_scenes(scenes: list, rng: np.random.Generator, change_prob: float = 0.35) -> list:
    """Each scene with every attribute (shape, colour, size, position, background) independently replaced by
    a different random value with probability ``change_prob``."""
    return [_change(s, [f for f in _ATTRIBUTES if rng.random() < change_prob], rng) for s in scenes]


def gaussian_blur(images: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """float [N, H, W, C] blurred per image with a Gaussian of std ``sigmas[i]`` pixels (0 = unchanged),
    separable, reflect padding, kernel radius ceil(3 sigma_max)."""
    import torch
    import torch.nn.functional as F

    sigmas = np.asarray(sigmas, dtype=np.float64)
    radius = int(np.ceil(3.0 * sigmas.max())) if len(sigmas) else 0
    if radius == 0:
        return images
    n, h, w, c = images.shape
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    safe = np.maximum(sigmas, 1e-6)[:, None]
    kernel = np.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernel[sigmas == 0] = (offsets == 0).astype(np.float64)   # sigma 0: the identity kernel
    kernel /= kernel.sum(1, keepdims=True)
    k = torch.from_numpy(np.repeat(kernel, c, axis=0))                       # [N*C, K]
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).reshape(1, n * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w).permute(0, 2, 3, 1).numpy()


def elastic_warp(images: np.ndarray, amplitudes: np.ndarray, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    """float [N, H, W, C] resampled through a smooth random displacement field per image: a ``grid`` x ``grid``
    field of Gaussian offsets, bicubically upsampled, of RMS ``amplitudes[i]`` pixels (0 = unchanged).
    Bilinear sampling, border padding (the background extends)."""
    import torch
    import torch.nn.functional as F

    n, h, w, c = images.shape
    coarse = torch.from_numpy(rng.standard_normal((n, 2, grid, grid)))
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    field = field / field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-8)
    field = field * torch.from_numpy(np.asarray(amplitudes, dtype=np.float64)).view(n, 1, 1, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64),
                            indexing="ij")
    # pixels -> normalised coordinates (align_corners=True: 2 / (size - 1) per pixel)
    gx = xs[None] + field[:, 0] * 2.0 / (w - 1)
    gy = ys[None] + field[:, 1] * 2.0 / (h - 1)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    out = F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border", align_corners=True)
    return out.permute(0, 2, 3, 1).numpy()


def render_scenes_noisy(scenes: list, rng: np.random.Generator, *, jitter: float = 0.04, noise_std: float = 12.0,
                        size: int = 32, blur: float = 0.0, warp: float = 0.0) -> np.ndarray:
    """uint8 [N, size, size, 3]: renders with placement jitter up to ``jitter``, a Gaussian blur of a per-image
    std drawn from [0, ``blur``] pixels (generator samples are soft; crisp renders alone teach a reward model
    a shape sense that does not transfer to them) and Gaussian pixel noise of a per-image std drawn from
    [0, ``noise_std``] (0-255 units). ``warp`` > 0 first bends each render through a smooth random displacement
    field of RMS drawn from [0, ``warp``] pixels (:func:`elastic_warp`), giving the irregular blobs generators
    draw, which the oracle then scores. ``blur = warp = 0`` draw nothing from ``rng`` (older seeds reproduce)."""
    from diffalign.world.render import render_batch_rng

    images = render_batch_rng(scenes, size, jitter, rng).astype(np.float64)
    if warp > 0:
        images = elastic_warp(images, rng.uniform(0.0, warp, size=len(scenes)), rng)
    if blur > 0:
        images = gaussian_blur(images, rng.uniform(0.0, blur, size=len(scenes)))
    sigma = rng.uniform(0.0, noise_std, size=(len(scenes), 1, 1, 1))
    images = images + sigma * rng.standard_normal(images.shape)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def render_variants(scenes: list, rng: np.random.Generator, *, change_prob: float = 0.35, jitter: float = 0.04,
                    noise_std: float = 12.0, size: int = 32) -> np.ndarray:
    """uint8 [N, size, size, 3]: :func:`perturb_scenes` rendered by :func:`render_scenes_noisy`. Scored against
    the ORIGINAL scene's caption, a changed attribute lowers exactly its oracle dimension (layout for size
    and position)."""
    return render_scenes_noisy(perturb_scenes(scenes, rng, change_prob), rng, jitter=jitter, noise_std=noise_std,
                               size=size)


def render_pairs(captions: list[str], *, per_caption: int = 4, seed: int = 0, change_prob: float = 0.35,
                 jitter: float = 0.04, noise_std: float = 12.0, size: int = 32, minimal: float = 0.0,
                 blur: float = 0.0, warp: float = 0.0) -> dict:
    """In-memory render pairs: ``per_caption`` pairs per caption.

    Image 0 renders the caption's scene perturbed by :func:`perturb_scenes`. Image 1 is, for a fraction
    ``minimal`` of the pairs, a MINIMAL pair: image 0's scene with exactly one more attribute changed
    (independent jitter and noise), so the pair differs in one dimension only, a contrast that tells a
    reward model which dimension a preference is about; otherwise an independent perturbation.
    Returns {"images_0", "images_1": uint8 [N, size, size, 3], "captions": list[str] (N),
    "scores_0", "scores_1": {dimension or "overall": float64 [N]}} with oracle scores against each caption.
    Deterministic from ``seed``.
    """
    from diffalign.world.oracle import score
    from diffalign.world.scenes import parse_caption

    if not 0.0 <= minimal <= 1.0:
        raise ValueError(f"minimal must lie in [0, 1], got {minimal}")
    rng = np.random.default_rng(seed)
    caps = [c for c in captions for _ in range(per_caption)]
    scenes = [parse_caption(c) for c in caps]
    first = perturb_scenes(scenes, rng, change_prob)
    independent = perturb_scenes(scenes, rng, change_prob)
    is_minimal = rng.random(len(scenes)) < minimal
    second = [_change(a, [_ATTRIBUTES[int(rng.integers(len(_ATTRIBUTES)))]], rng) if m else b
              for a, b, m in zip(first, independent, is_minimal)]
    kw = dict(jitter=jitter, noise_std=noise_std, size=size, blur=blur, warp=warp)
    images_0 = render_scenes_noisy(first, rng, **kw)
    images_1 = render_scenes_noisy(second, rng, **kw)
    return {"images_0": images_0, "images_1": images_1, "captions": caps,
            "scores_0": score(images_0, caps), "scores_1": score(images_1, caps)}


def make_render_pairs(captions: list[str], out_path: str | Path, **kw) -> dict:
    """:func:`render_pairs` written as a Pick-a-Pic parquet with the same columns as :func:`make_pairs`."""
    pairs = render_pairs(captions, **kw)
    n = len(pairs["captions"])
    images = np.concatenate([pairs["images_0"], pairs["images_1"]])
    scores = {k: np.concatenate([pairs["scores_0"][k], pairs["scores_1"][k]]) for k in pairs["scores_0"]}
    rows = _pair_table(_media_writer(images, "image", Path(out_path)), scores, pairs["captions"],
                       [(i, i, n + i) for i in range(n)])
    _write_table(rows, out_path)
    return {"prompts": len(captions), "pairs": n}
