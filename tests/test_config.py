import pytest

from diffalign.config import ConfigError, all_keys, load_config, recipe_names


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny-sd15-dpo", ["objective.beta=2500", "lora.enabled=false", "optim.max_grad_norm=null",
                                        "lora.target_modules=[to_q,to_k]"])
    assert cfg.objective.beta == 2500.0 and cfg.lora.enabled is False
    assert cfg.optim.max_grad_norm is None and cfg.lora.target_modules == ["to_q", "to_k"]
    assert cfg.name == "tiny-sd15-dpo" and str(cfg.output_dir) == "runs/tiny-sd15-dpo"


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'objective.betta'.*Did you mean 'objective.beta'"):
        load_config("tiny-sd15-dpo", ["objective.betta=1"])
    with pytest.raises(ConfigError, match=r"Did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  familly: sd15\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown config key 'model.familly'.*'model.family'"):
        load_config(str(p))


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match="objective.loss_type='sigmoidd' is not one of"):
        load_config(None, ["objective.loss_type=sigmoidd"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="neither a YAML file nor a shipped recipe. Did you mean the recipe .tiny-sd15-dpo."):
        load_config("tiny-sd15-dp")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["objective.beta"])


def test_every_shipped_recipe_loads_and_keys_have_help():
    names = recipe_names()
    for required in ("sd15-diffusion-dpo", "sdxl-diffusion-dpo", "sd3-flow-dpo", "flux-flow-dpo",
                     "tiny-sd15-dpo", "tiny-sdxl-dpo", "tiny-sd3-flow-dpo", "tiny-flux-flow-dpo"):
        assert required in names
    for n in recipe_names(task="train"):  # train-reward recipes load with their own config (test_rewards_trained)
        load_config(n)
    assert all(h for h in all_keys().values())


def test_real_recipes_carry_the_papers_settings():
    sd15 = load_config("sd15-diffusion-dpo")
    assert sd15.objective.beta == 5000 and sd15.lora.enabled and sd15.model.family == "sd15"
    flux = load_config("flux-flow-dpo")
    assert flux.objective.time_weighting == "constant" and flux.lora.rank == 32 and flux.lora.alpha == 64
    assert flux.optim.lr == 1e-5 and flux.optim.max_grad_norm == 1.0 and flux.train.ema
