"""`diffalign demo`: alignment on the embedded default, end to end, with numbers that can be checked.

1. sample the bundled generator K times per training prompt; oracle-best vs oracle-worst pairs;
2. cache latents; 3. train a LoRA with Diffusion-DPO (unet) or Flow-DPO (flow, video) through the normal loop;
   with ``rounds`` > 1 (iterated DPO; the unet default is 2), fuse that LoRA into the model, save it as a pipeline
   folder and repeat 1-3 from it: new pairs sampled from the improved model, a new LoRA whose DPO reference is
   the improved model. Round 1 writes into DIR, round r >= 2 into DIR/round<r> (its start model in
   DIR/round<r>/start-model);
4. sample base (adapters disabled) and aligned (enabled) on held-out prompts with the SAME seeds and score
   both with the oracle: mean scores, per-dimension gains, paired win rate and a paired sign-flip
   permutation test, also on held-out prompts whose attribute combination never appears in training
   (a (colour, shape) pair; for video also a (shape, direction) pair).
Writes report.json, samples.png (base row above aligned row, same seeds) and reward_curve.png; for video,
samples.png holds frame strips (each base clip above its aligned clip) and samples.gif plays them.

The three families differ only in their :class:`WorldSpec` (prompt split, oracle, recipe); the pairs,
the cache, the loop and the evaluation are one code path.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BUNDLED = Path(__file__).parent / "bundled"
RECIPES = {"unet": "world-unet-dpo", "flow": "world-flow-dpo", "video": "world-video-dpo"}
FULL = {"train_prompts": 192, "k": 6, "heldout_seeds": 2, "sample_steps": 15, "rounds": 1}
# per-family settings measured in BENCHMARKS.md: the continued UNet gained most from twice the pairs and from
# a second round of DPO on pairs sampled from the first round's model (win rate 0.63 -> 0.69);
# the video world's held-out split is large (432 scenes), so the demo evaluates a fixed random 160 of them
FULL_BY_FAMILY = {"unet": {"train_prompts": 384, "rounds": 2}, "flow": {}, "video": {"heldout_prompts": 160}}
QUICK = {"train_prompts": 12, "k": 4, "heldout_seeds": 1, "max_steps": 4, "heldout_prompts": 8, "sample_steps": 6,
         "batch_size": 4}
# the video oracle's motion dimensions; the report also tests their mean ("motion") on its own
MOTION_DIMENSIONS: tuple[str, ...] = ("direction", "speed", "smoothness")


@dataclass(frozen=True)
class WorldSpec:
    """What the demo needs to know about one world: its prompt split, which held-out scenes are unseen
    combinations, and its oracle (``score(samples, captions) -> {dimension: [N], 'overall'}``)."""

    splits: Callable[[], tuple[list, list]]
    unseen: Callable[[object], bool]
    score: Callable
    dimensions: tuple[str, ...]
    unseen_what: str


def world_spec(kind: str) -> WorldSpec:
    from diffalign.world.pairs import world_oracle
    from diffalign.world.scenes import UNSEEN_COMBOS, prompt_splits

    score, dims = world_oracle(kind)
    if kind == "video":
        from diffalign.world.video import UNSEEN_MOTIONS, video_prompt_splits

        return WorldSpec(lambda: video_prompt_splits(0),
                         lambda s: (s.color, s.shape) in UNSEEN_COMBOS or (s.shape, s.direction) in UNSEEN_MOTIONS,
                         score, dims, "unseen colour-shape or shape-direction combinations")
    return WorldSpec(lambda: prompt_splits(0), lambda s: (s.color, s.shape) in UNSEEN_COMBOS, score, dims,
                     "unseen colour-shape combinations")


def demo_prompts(spec: WorldSpec, plan: dict, seed: int = 0) -> tuple[list[str], list]:
    """(training prompts, held-out scenes) exactly as the demo draws them from ``spec``'s splits with ``plan``
    (``train_prompts``, optional ``heldout_prompts``): one generator, training prompts drawn first, so a bench
    script that calls this scores on the demo's own held-out set."""
    train_scenes, heldout = spec.splits()
    rng = np.random.default_rng(seed)
    train_prompts = [train_scenes[i].caption() for i in rng.permutation(len(train_scenes))[:plan["train_prompts"]]]
    heldout = list(heldout)
    if "heldout_prompts" in plan:
        heldout = [heldout[i] for i in rng.permutation(len(heldout))[:plan["heldout_prompts"]]]
    return train_prompts, heldout


def heldout_samples(spec: WorldSpec, heldout: list, per_prompt: int, seed_stride: int = 1
                    ) -> tuple[list[str], list[int], np.ndarray]:
    """The paired evaluation samples: captions [N] (each held-out scene ``per_prompt`` times), their seeds
    10_000 + seed_stride * i, and the bool mask [N] of samples whose scene is an unseen combination."""
    captions = [s.caption() for s in heldout for _ in range(per_prompt)]
    seeds = [10_000 + seed_stride * i for i in range(len(captions))]
    unseen = np.array([spec.unseen(s) for s in heldout for _ in range(per_prompt)], dtype=bool)
    return captions, seeds, unseen


def bundled_generator(kind: str) -> Path:
    path = BUNDLED / kind
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no bundled world generator at {path}: rebuild it with "
                                f"`diffalign world pretrain --kind {kind} --out {path}`")
    return path


def paired_permutation_p(diff: np.ndarray, n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of mean(diff) != 0 under random sign flips of the paired differences."""
    diff = np.asarray(diff, dtype=np.float64)
    if len(diff) == 0 or np.all(diff == 0):
        return 1.0
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_perm, len(diff)))
    null = np.abs((signs * diff).mean(axis=1))
    return float((1 + np.sum(null >= abs(diff.mean()) - 1e-15)) / (n_perm + 1))


def win_rate(after: np.ndarray, before: np.ndarray) -> float:
    """Fraction of paired samples where the aligned model scores higher; exact ties count 0.5."""
    return float(np.mean((after > before) + 0.5 * (after == before)))


def compare(before: dict[str, np.ndarray], after: dict[str, np.ndarray], dimensions: tuple[str, ...] | None = None,
            mask: np.ndarray | None = None) -> dict:
    """Paired comparison of oracle scores of the same (prompt, seed) samples before and after alignment.

    ``before``/``after``: {dimension: [N], 'overall': [N]}; ``dimensions`` default to the image oracle's;
    ``mask`` (bool [N]) compares only those samples (e.g. the unseen combinations).
    Every dimension gets its mean before/after, gain and paired permutation p-value. When the scores have
    the video oracle's motion dimensions, ``motion`` (their mean per sample) is compared the same way.
    """
    from diffalign.world.oracle import DIMENSIONS

    dimensions = DIMENSIONS if dimensions is None else dimensions
    if mask is not None:
        before, after = ({k: v[mask] for k, v in scores.items()} for scores in (before, after))
    diff = after["overall"] - before["overall"]

    def one(b: np.ndarray, a: np.ndarray) -> dict:
        return {"before": float(b.mean()), "after": float(a.mean()), "gain": float((a - b).mean()),
                "p_value": paired_permutation_p(a - b)}

    out = {
        "n": int(len(diff)),
        "oracle_before": float(before["overall"].mean()), "oracle_after": float(after["overall"].mean()),
        "gain": float(diff.mean()), "win_rate": win_rate(after["overall"], before["overall"]),
        "p_value": paired_permutation_p(diff),
        "per_dimension": {d: one(before[d], after[d]) for d in dimensions},
    }
    if all(d in dimensions for d in MOTION_DIMENSIONS):
        b, a = (np.mean([s[d] for d in MOTION_DIMENSIONS], axis=0) for s in (before, after))
        out["motion"] = {**one(b, a), "win_rate": win_rate(a, b), "dimensions": list(MOTION_DIMENSIONS)}
    return out


def _tile(rows: np.ndarray, group: int = 2) -> np.ndarray:
    """[R, C, H, W, 3] uint8 tiles -> one image: 1 white px between tiles, 1 more after every ``group`` rows."""
    r, c, h, w = rows.shape[:4]
    grid = np.full((r * (h + 1) + (r - 1) // group, c * (w + 1), 3), 255, dtype=np.uint8)
    for i in range(r):
        y = i * (h + 1) + i // group
        for j in range(c):
            grid[y:y + h, j * (w + 1):j * (w + 1) + w] = rows[i, j]
    return grid


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(image, scale, axis=-3), scale, axis=-2)  # nearest neighbour: pixels stay pixels


def spread_indices(total: int, n: int) -> np.ndarray:
    """``min(n, total)`` indices spread evenly over ``range(total)``, first and last included: a grid that shows
    the whole held-out list (which is ordered by prompt) without picking samples."""
    n = min(n, total)
    return np.linspace(0, total - 1, n).round().astype(int) if n > 1 else np.zeros(n, dtype=int)


def score_label(score: float, reference: float | None = None) -> tuple[str, str]:
    """(text, colour) under a grid sample: its oracle score, and for an aligned sample the change against the base
    sample of the same prompt and seed, green when it went up, red when it went down, grey when it stayed."""
    if reference is None:
        return f"{score:.2f}", "black"
    delta = score - reference
    colour = "grey" if abs(delta) < 0.005 else ("tab:green" if delta > 0 else "tab:red")
    return f"{score:.2f} ({delta:+.2f})", colour


def _save_labelled_grid(base: np.ndarray, aligned: np.ndarray, captions: list[str], base_scores: np.ndarray,
                        aligned_scores: np.ndarray, path: Path) -> None:
    """Images [n, H, W, 3]: base row above aligned row, each column titled with its caption, each sample labelled
    with its oracle score (and the aligned one with its change), drawn pixel-exact (nearest neighbour)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(base)
    fig, axes = plt.subplots(2, n, figsize=(1.25 * n + 0.6, 3.6), dpi=110, squeeze=False)
    for j in range(n):
        axes[0, j].set_title(textwrap.fill(captions[j], 18), fontsize=6)
        for i, (images, label) in enumerate(((base, score_label(base_scores[j])),
                                             (aligned, score_label(aligned_scores[j], base_scores[j])))):
            ax = axes[i, j]
            ax.imshow(images[j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(label[0], fontsize=7, color=label[1])
    axes[0, 0].set_ylabel("base", fontsize=9)
    axes[1, 0].set_ylabel("aligned", fontsize=9)
    fig.suptitle("held-out prompts, same seed per column; oracle overall under each sample", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_grid(base: np.ndarray, aligned: np.ndarray, path: Path, columns: int = 12, scale: int = 3,
              captions: list[str] | None = None, base_scores: np.ndarray | None = None,
              aligned_scores: np.ndarray | None = None) -> None:
    """Base samples above aligned samples with the same seeds (``columns`` samples, not picked).

    Images [N, H, W, 3]: with ``captions`` and the per-sample oracle scores ([N] each), a labelled figure of
    ``columns`` samples spread evenly over the N (caption over each column, score under each sample, the aligned
    sample's change coloured); without them, the first ``columns`` as bare pixel tiles upscaled ``scale`` times.
    Clips [N, F, H, W, 3]: frame strips (frames left to right), each of the first ``columns // 2`` base clips above
    its aligned clip; and beside it ``path`` with suffix ``.gif`` plays the first ``columns`` clips as the image
    grid does.
    """
    from PIL import Image

    if base.ndim == 5:
        from diffalign.rewards.media import write_video
        from diffalign.world.generators import VIDEO_GEN_FPS

        n = min(max(1, columns // 2), len(base))
        strips = np.stack([clip for i in range(n) for clip in (base[i], aligned[i])])       # [2n, F, H, W, 3]
        Image.fromarray(_upscale(_tile(strips), scale)).save(path)
        c = min(columns, len(base))
        frames = [_upscale(_tile(np.stack([base[:c, f], aligned[:c, f]])), scale) for f in range(base.shape[1])]
        write_video(path.with_suffix(".gif"), np.stack(frames), VIDEO_GEN_FPS)
        return
    n = min(columns, len(base))
    if captions is not None and base_scores is not None and aligned_scores is not None:
        show = spread_indices(len(base), n)
        _save_labelled_grid(base[show], aligned[show], [captions[i] for i in show], base_scores[show],
                            aligned_scores[show], path)
        return
    Image.fromarray(_upscale(_tile(np.stack([base[:n], aligned[:n]])), scale)).save(path)


def save_curve(curve: list[tuple[int, float]], baseline: float, path: Path, title: str,
               round_starts: list[int] = ()) -> None:
    """Oracle score over optimizer steps (counted across rounds); a dotted line where each later round starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    if curve:
        steps, values = zip(*curve)
        ax.plot(steps, values, marker="o", label="aligned (LoRA)")
    ax.axhline(baseline, color="gray", linestyle="--", label="base")
    for i, start in enumerate(round_starts):
        ax.axvline(start, color="tab:orange", linestyle=":", label="next DPO round" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("oracle overall (held-out subset)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fuse_lora_into_folder(cfg, lora: str | Path, folder: str | Path) -> None:
    """Load ``cfg.model`` (a recipe's ModelConfig holder), fuse the LoRA at ``lora`` into its denoiser at scale 1
    and save the whole pipeline to ``folder`` (diffusers format, loadable with ``model.pretrained=folder``).

    Fusing through diffusers' ``load_lora_weights`` + ``fuse_lora`` reads the same exported file a user would
    sample with, so the saved model samples what ``--lora`` sampling gives (measured: <= 1/255 per pixel)."""
    from diffalign.models import load_adapter
    from diffalign.samplers.api import load_lora

    adapter = load_adapter(cfg.model)
    load_lora(adapter, str(lora))
    adapter.pipe.fuse_lora(adapter_names=["aligned"], lora_scale=1.0)
    adapter.pipe.unload_lora_weights()
    adapter.pipe.save_pretrained(str(folder))


def run_demo(kind: str = "unet", out_dir: str | Path = "runs/demo", *, quick: bool = False, overrides: list[str] = (),
             seed: int = 0, show_progress: bool = True, rounds: int | None = None) -> dict:
    from diffalign.config import load_config
    from diffalign.data.cache import build_cache
    from diffalign.models import load_adapter
    from diffalign.train.loop import Trainer, adapters_disabled
    from diffalign.world.pairs import generate, make_pairs

    if kind not in RECIPES:
        raise ValueError(f"unknown demo family {kind!r}: use one of {tuple(RECIPES)}")
    plan = {**FULL, **FULL_BY_FAMILY[kind], **(QUICK if quick else {}),
            **({"rounds": rounds} if rounds is not None else {})}
    rounds = int(plan["rounds"])
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: the demo needs at least one DPO round")
    spec = world_spec(kind)
    score = spec.score
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    train_prompts, heldout = demo_prompts(spec, plan, seed)

    extra = ([f"train.max_steps={plan['max_steps']}", f"train.batch_size={plan['batch_size']}"] if quick else []) \
        + list(overrides)
    sample_kw = dict(steps=plan.get("sample_steps", 20), guidance_scale=plan.get("guidance", 3.0))
    heldout_caps, heldout_seeds, unseen = heldout_samples(spec, heldout, plan["heldout_seeds"])
    curve_idx = np.arange(min(32, len(heldout_caps)))
    curve: list[tuple[int, float]] = []
    round_starts: list[int] = []
    round_records: list[dict] = []
    start_model: str | None = None  # None: the recipe's model (or the user's model.pretrained override)
    before = base_check = base_images = None
    for r in range(rounds):
        round_dir = out if r == 0 else out / f"round{r + 1}"
        pairs_path = round_dir / ("pairs.jsonl" if kind == "video" else "pairs.parquet")  # video pairs are clip files
        cfg = load_config(RECIPES[kind], [f"data.path={pairs_path}", f"cache.dir={round_dir / 'cache'}",
                                          f"train.output_dir={round_dir / 'train'}", "train.resume=none", *extra,
                                          *([f"model.pretrained={start_model}"] if start_model else [])])
        trainer = Trainer(cfg, show_progress=show_progress)
        adapter = load_adapter(cfg.model)
        pipe = adapter.pipe
        if r == 0:
            base_images = generate(pipe, heldout_caps, heldout_seeds, show_progress=show_progress, **sample_kw)
            before = score(base_images, heldout_caps)
        pair_stats = make_pairs(pipe, train_prompts, pairs_path, k=plan["k"], seed=seed, show_progress=show_progress,
                                pairing=plan.get("pairing", "best-worst"), min_gap=plan.get("min_gap", 0.0),
                                **sample_kw)
        build_cache(cfg, adapter, show_progress=show_progress)
        del adapter, pipe

        trainer.setup()
        offset = sum(rec["steps"] for rec in round_records)
        every = max(1, cfg.train.max_steps // 5)

        def evaluate(tr) -> None:
            if tr.step % every == 0 or tr.step == cfg.train.max_steps:
                imgs = generate(tr.adapter.pipe, [heldout_caps[i] for i in curve_idx],
                                [heldout_seeds[i] for i in curve_idx], **sample_kw)
                curve.append((offset + tr.step, float(score(imgs, [heldout_caps[i] for i in curve_idx])["overall"].mean())))

        result = trainer.train(callback=evaluate)
        if r == 0:
            with adapters_disabled(trainer.accelerator.unwrap_model(trainer.model)):
                base_check = generate(trainer.adapter.pipe, heldout_caps[:4], heldout_seeds[:4], **sample_kw)
        round_records.append({"round": r + 1, "model": cfg.model.pretrained, "steps": result.steps, "pairs": pair_stats,
                              "lora": str(result.export_path)})
        if r + 1 < rounds:
            start_model = str(out / f"round{r + 2}" / "start-model")
            fuse_lora_into_folder(cfg, result.export_path, start_model)
            round_starts.append(offset + result.steps)
            del trainer
    aligned_pipe = trainer.adapter.pipe
    aligned_images = generate(aligned_pipe, heldout_caps, heldout_seeds, show_progress=show_progress, **sample_kw)
    after = score(aligned_images, heldout_caps)

    overall = compare(before, after, spec.dimensions)
    unseen_stats = compare(before, after, spec.dimensions, mask=unseen) if unseen.any() else None
    save_grid(base_images, aligned_images, out / "samples.png", captions=heldout_caps,
              base_scores=before["overall"], aligned_scores=after["overall"])
    save_curve(curve, float(before["overall"][curve_idx].mean()), out / "reward_curve.png",
               f"{cfg.objective.name.upper()} on the world ({kind})", round_starts)
    report = {
        "objective": "diffusion-dpo" if kind == "unet" else "flow-dpo", "family": kind,
        "model": round_records[0]["model"], "model_family": cfg.model.family,
        "steps": sum(rec["steps"] for rec in round_records), "rounds": round_records,
        "beta": cfg.objective.beta, "lr": cfg.optim.lr, "lora_rank": cfg.lora.rank,
        "prompts_train": len(train_prompts), "prompts_heldout": len(heldout), "samples_heldout": len(heldout_caps),
        "pairs": round_records[0]["pairs"], "oracle_before": overall["oracle_before"], "oracle_after": overall["oracle_after"],
        "gain": overall["gain"], "win_rate": overall["win_rate"], "p_value": overall["p_value"],
        "per_dimension": overall["per_dimension"], "motion": overall.get("motion"),
        "unseen_combinations": unseen_stats, "unseen_what": spec.unseen_what,
        "base_reproduced_with_adapters_disabled": bool(np.array_equal(base_check, base_images[:4])),
        "reward_curve": curve, "final_train_metrics": result.final_metrics,
        "seconds": time.time() - start, "outputs": {"grid": str(out / "samples.png"), "curve": str(out / "reward_curve.png"),
                                                    "lora": str(result.export_path),
                                                    "lora_applies_to": cfg.model.pretrained},
    }
    if kind == "video":
        report["outputs"]["animation"] = str(out / "samples.gif")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
