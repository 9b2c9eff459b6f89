"""The `diffalign` command line: help, train end to end, cache, and clear errors for bad input."""
import json
import os
import subprocess
import sys

import pytest

from diffalign.cli import main


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("train", "cache", "config", "recipes"):
        assert verb in out


def test_unknown_key_is_a_clear_error(capsys):
    assert main(["train", "tiny-sd15-dpo", "objective.betta=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'objective.betta'" in err and "Did you mean 'objective.beta'" in err


def test_missing_data_file_is_a_clear_error(capsys, tiny_model, tmp_path):
    code = main(["train", "tiny-sd15-dpo", f"model.pretrained={tiny_model('sd15')}",
                 f"data.path={tmp_path / 'nope.parquet'}", f"train.output_dir={tmp_path / 'o'}", "train.log_with=none"])
    assert code == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(capsys, tmp_path):
    code = main(["train", "tiny-sd15-dpo", f"model.pretrained={tmp_path}", f"train.output_dir={tmp_path / 'o'}"])
    assert code == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_cache_then_train_from_cache(capsys, tiny_model, tmp_path):
    common = [f"model.pretrained={tiny_model('sd15')}", "data.path=toy:pairs?n=8", f"cache.dir={tmp_path / 'cache'}"]
    assert main(["cache", "tiny-sd15-dpo", *common]) == 0
    cache_out = capsys.readouterr().out
    assert "8 encoded" in cache_out
    # the printed train command repeats the overrides the cache was built with (the cache stands in for data.path)
    use_it = next(line for line in cache_out.splitlines() if line.startswith("use it"))
    assert use_it.split()[2:] == ["diffalign", "train", "tiny-sd15-dpo", common[0], common[2]], use_it
    out_dir = tmp_path / "run"
    assert main(["train", "tiny-sd15-dpo", *common, "train.max_steps=3", "train.checkpoint_every=0",
                 f"train.output_dir={out_dir}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "== diffalign train: summary ==" in out and "pipe.load_lora_weights" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["pairs"] == 8
    assert (out_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert list((out_dir / "logs").rglob("events.out.tfevents*")), "tensorboard tracker wrote nothing"
    # a cache built for another resolution is refused, naming the key
    assert main(["train", "tiny-sd15-dpo", *common, "data.resolution=16", f"train.output_dir={out_dir}"]) == 2
    assert "data.resolution: cache has 32, config wants 16" in capsys.readouterr().err


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "sdxl-diffusion-dpo", "objective.beta=2500"]) == 0
    out = capsys.readouterr().out
    assert "beta: 2500.0" in out and "madebyollin/sdxl-vae-fp16-fix" in out


@pytest.mark.slow
def test_accelerate_launch_two_processes_end_with_identical_weights(tiny_model, tmp_path):
    out_dir = tmp_path / "ddp"
    # accelerate 1.x forks several CPU processes with `--cpu` only through MPI; torchrun's launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU gives two gloo processes on any CPU-only machine.
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffalign", "train", "tiny-flux-flow-dpo",
           f"model.pretrained={tiny_model('flux')}", "data.path=toy:pairs?n=8", "train.batch_size=2",
           "train.max_steps=3", "train.checkpoint_every=2", "train.log_with=none", f"train.output_dir={out_dir}",
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    checksums = summary["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert "2 process(es)" in proc.stdout
