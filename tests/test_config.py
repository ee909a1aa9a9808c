"""load_config: YAML + overrides merging, stage chaining, typed conversion and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlreason.config import (
    ConfigError,
    PipelineConfig,
    Scheduler,
    StageKind,
    as_dict,
    final_checkpoint,
    load_config,
    parse_override,
)
from vlreason.data.jsonl import OnBadSample
from vlreason.rl import AdvantageScale

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def two_stages(**shared) -> dict:
    """A shared-sections config with an SFT stage and a GRPO stage, like the module docstring's."""
    return {
        "seed": 0,
        "output_dir": "runs/grounding",
        "model": {"name_or_path": "tiny-qwen2-vl"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl"},
        "optim": {"batch_size": 4, "warmup_steps": 3},
        "stages": [
            {"kind": "sft", "optim": {"learning_rate": 1.0e-3, "max_steps": 300}},
            {"kind": "grpo", "rewards": {"format": {"weight": 0.2}, "iou": {}},
             "optim": {"learning_rate": "1e-6"}},
        ],
        **shared,
    }


def load(raw: dict, *overrides: str) -> PipelineConfig:
    return load_config(None, list(overrides), raw=raw)


def by_name(config: PipelineConfig) -> dict:
    return {stage.name: stage for stage in config.stages}


# ---- merging ------------------------------------------------------------------------------------


def test_yaml_file_shared_sections_and_stage_entries(tmp_path):
    path = tmp_path / "cfg" / "pipeline.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(two_stages()))
    config = load_config(path)
    sft, grpo = config.stages
    assert (sft.kind, grpo.kind) == (StageKind.SFT, StageKind.GRPO)
    assert (sft.name, grpo.name) == ("sft", "grpo")
    assert config.output_dir == str(Path.cwd() / "runs/grounding")
    assert sft.output_dir == str(Path.cwd() / "runs/grounding" / "sft")
    assert grpo.output_dir == str(Path.cwd() / "runs/grounding" / "grpo")
    # shared sections reach every stage; stage entries are deep-merged over them
    assert sft.data.train == grpo.data.train == str(Path.cwd() / "data/train.jsonl")
    assert sft.optim.batch_size == grpo.optim.batch_size == 4
    assert sft.optim.warmup_steps == grpo.optim.warmup_steps == 3
    assert sft.optim.learning_rate == 1e-3 and sft.optim.max_steps == 300
    assert grpo.optim.learning_rate == 1e-6 and grpo.optim.max_steps == 100  # the default
    assert set(grpo.rewards) == {"format", "iou"}
    assert grpo.rewards["format"].weight == 0.2 and grpo.rewards["iou"].weight == 1.0
    assert sft.rewards == {}


def test_stage_two_starts_from_stage_one_final():
    sft, grpo = load(two_stages()).stages
    assert sft.model.name_or_path == "tiny-qwen2-vl"
    assert grpo.model.name_or_path == final_checkpoint(sft.output_dir)
    assert grpo.model.name_or_path == str(Path.cwd() / "runs/grounding" / "sft" / "final")


def test_stage_naming_its_own_model_keeps_it():
    raw = two_stages()
    raw["stages"][1]["model"] = {"name_or_path": "tiny-qwen3-vl"}
    sft, grpo = load(raw).stages
    assert grpo.model.name_or_path == "tiny-qwen3-vl"
    assert sft.model.name_or_path == "tiny-qwen2-vl"


def test_three_stages_chain():
    raw = two_stages()
    raw["stages"].append({"kind": "sft", "name": "polish"})
    sft, grpo, polish = load(raw).stages
    assert polish.model.name_or_path == final_checkpoint(grpo.output_dir)
    assert polish.output_dir == str(Path.cwd() / "runs/grounding" / "polish")


def test_other_shared_model_fields_still_reach_later_stages():
    raw = two_stages(model={"name_or_path": "tiny-qwen2-vl", "dtype": "float32", "lora": {"enabled": True}})
    _, grpo = load(raw).stages
    assert grpo.model.dtype == "float32" and grpo.model.lora.enabled
    assert grpo.model.name_or_path.endswith("final")


def test_section_override_applies_to_all_stages_and_wins_over_stage_entries():
    config = load(two_stages(), "optim.learning_rate=5e-4", "optim.max_steps=7", "data.thought_dropout=0.5")
    for stage in config.stages:
        assert stage.optim.learning_rate == 5e-4
        assert stage.optim.max_steps == 7
        assert stage.data.thought_dropout == 0.5
        assert stage.optim.batch_size == 4  # untouched siblings survive the deep merge


def test_stage_override_applies_to_one_stage_and_wins_over_section_override():
    for order in (("optim.max_steps=7", "grpo.optim.max_steps=9"), ("grpo.optim.max_steps=9", "optim.max_steps=7")):
        config = by_name(load(two_stages(), *order))
        assert config["sft"].optim.max_steps == 7
        assert config["grpo"].optim.max_steps == 9
    config = by_name(load(two_stages(), "sft.optim.scheduler=cosine", "grpo.rollout.num_generations=4"))
    assert config["sft"].optim.scheduler is Scheduler.COSINE
    assert config["grpo"].optim.scheduler is Scheduler.CONSTANT
    assert config["grpo"].rollout.num_generations == 4
    assert config["sft"].rollout.num_generations == 8


def test_stage_override_by_custom_name():
    raw = two_stages()
    raw["stages"][0]["name"] = "warmup"
    config = by_name(load(raw, "warmup.optim.max_steps=11"))
    assert config["warmup"].optim.max_steps == 11
    assert config["grpo"].optim.max_steps == 100
    assert config["grpo"].model.name_or_path == final_checkpoint(config["warmup"].output_dir)


def test_seed_and_output_dir_overrides():
    raw = two_stages()
    raw["stages"][1]["seed"] = 42
    config = load(raw, "seed=7", "output_dir=elsewhere")
    sft, grpo = config.stages
    assert config.seed == 7 and sft.seed == 7
    assert grpo.seed == 42  # a stage's own seed is kept
    assert config.output_dir == str(Path.cwd() / "elsewhere")
    assert sft.output_dir == str(Path.cwd() / "elsewhere" / "sft")
    assert grpo.model.name_or_path == str(Path.cwd() / "elsewhere" / "sft" / "final")


def test_override_values_are_yaml():
    config = load(two_stages(), "logging.tensorboard=false", "grpo.rewards.iou.options={min_iou: 0.5}",
                  "model.max_pixels=1024", "algorithm.scale_rewards=none", "data.on_bad_sample=skip")
    sft, grpo = config.stages
    assert sft.logging.tensorboard is False
    assert grpo.rewards["iou"].options == {"min_iou": 0.5}
    assert grpo.rewards["format"].options == {}
    assert sft.model.max_pixels == 1024 and grpo.model.max_pixels == 1024
    assert grpo.algorithm.scale_rewards is AdvantageScale.NONE
    assert sft.data.on_bad_sample is OnBadSample.SKIP


def test_model_override_keeps_stage_chaining():
    sft, grpo = load(two_stages(), "model.name_or_path=tiny-qwen3-vl").stages
    assert sft.model.name_or_path == "tiny-qwen3-vl"
    assert grpo.model.name_or_path == final_checkpoint(sft.output_dir)


def test_string_stages_and_numbers_as_strings():
    raw = {"data": {"train": "t.jsonl"}, "optim": {"learning_rate": "1e-4", "time_budget_s": "3e2"},
           "rewards": {"iou": None}, "stages": ["sft", "grpo"]}
    config = load(raw)
    sft, grpo = config.stages
    assert config.output_dir == str(Path.cwd() / "runs/vlreason") and config.seed == 0
    assert sft.optim.learning_rate == 1e-4 and isinstance(sft.optim.learning_rate, float)
    assert sft.optim.time_budget_s == 300.0
    assert grpo.rewards["iou"].weight == 1.0  # `iou:` with no value is an entry with defaults
    # YAML 1.1 reads 1e-4 (no dot) as a string: from a file and from an override
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    assert load(raw, "optim.learning_rate=2e-5").stages[0].optim.learning_rate == 2e-5


def test_int_fields_accept_ints_floats_take_ints():
    config = load({"data": {"train": "t"}, "optim": {"learning_rate": 1, "max_grad_norm": 2}, "stages": ["sft"]})
    assert config.stages[0].optim.learning_rate == 1.0 and isinstance(config.stages[0].optim.learning_rate, float)
    assert isinstance(config.stages[0].optim.max_grad_norm, float)


def test_raw_dict_is_not_modified():
    raw = two_stages()
    snapshot = yaml.safe_dump(raw)
    load(raw, "optim.max_steps=3", "grpo.optim.max_steps=4")
    assert yaml.safe_dump(raw) == snapshot


# ---- as_dict --------------------------------------------------------------------------------------


def test_as_dict_is_plain_yaml():
    config = load(two_stages())
    data = as_dict(config)
    text = yaml.safe_dump(data, sort_keys=False)  # fails on enums or dataclasses
    assert yaml.safe_load(text) == data
    assert data["stages"][0]["kind"] == "sft"
    assert data["stages"][0]["optim"]["scheduler"] == "constant"
    assert data["stages"][1]["rewards"]["format"] == {"weight": 0.2, "fn": None, "options": {}, "veto": None}


def test_as_dict_round_trip():
    config = load(two_stages(), "optim.max_steps=12", "grpo.algorithm.beta=0.04")
    again = load_config(None, raw=as_dict(config))
    assert again == config
    assert as_dict(again) == as_dict(config)


def test_saved_config_yaml_reloads(tmp_path):
    """What run_pipeline writes (yaml of as_dict) loads again to the same stages."""
    config = load(two_stages())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(as_dict(config), sort_keys=False))
    assert load_config(path).stages == config.stages


def test_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    """One rule for data, eval, plugin files, output folders and local models, in the file and
    on the command line; the resolved config is absolute, so it means the same from anywhere."""
    config_dir, work = tmp_path / "configs", tmp_path / "work"
    config_dir.mkdir()
    (work / "models" / "mine").mkdir(parents=True)
    path = config_dir / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": "runs/x", "model": {"name_or_path": "models/mine"},
        "data": {"train": "data/t.jsonl", "eval": "data/e.jsonl"},
        "stages": [{"kind": "grpo", "rewards": {"mine": {"fn": "rewards/my_reward.py:score"}, "iou": {}}}]}))
    monkeypatch.chdir(work)
    stage = load_config(path, ["data.eval=other/e.jsonl"]).stages[0]
    assert stage.output_dir == str(work / "runs/x/grpo")
    assert stage.data.train == str(work / "data/t.jsonl") and stage.data.eval == str(work / "other/e.jsonl")
    assert stage.rewards["mine"].fn == f"{work / 'rewards/my_reward.py'}:score"
    assert stage.rewards["iou"].fn is None
    assert stage.model.name_or_path == str(work / "models/mine")
    assert load(two_stages(), "model.name_or_path=Qwen/Qwen2.5-VL-3B-Instruct").stages[0].model.name_or_path == \
        "Qwen/Qwen2.5-VL-3B-Instruct"  # not a local folder: a hub id


# ---- errors ---------------------------------------------------------------------------------------


def error(raw: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(raw, *overrides)
    return str(info.value)


def test_unknown_top_level_key_suggests():
    message = error({**two_stages(), "sed": 1})
    assert message.startswith("sed: unknown key; did you mean 'seed'?")
    assert "allowed: seed, output_dir, stages" in message


def test_unknown_section_key_names_the_path():
    raw = two_stages()
    raw["optim"]["learning_rat"] = 1e-3
    message = error(raw)
    assert message.startswith("stages[sft].optim.learning_rat: unknown key; did you mean 'learning_rate'?")


def test_unknown_nested_key_in_stage_entry():
    raw = two_stages()
    raw["stages"][1]["model"] = {"lora": {"rr": 4}}
    assert error(raw).startswith("stages[grpo].model.lora.rr: unknown key; did you mean 'r'?")
    raw = two_stages()
    raw["stages"][0]["optimm"] = {}
    assert error(raw).startswith("stages[0].optimm: unknown key; did you mean 'optim'?")


def test_unknown_reward_entry_key():
    raw = two_stages()
    raw["stages"][1]["rewards"]["iou"] = {"wieght": 2}
    assert error(raw).startswith("stages[grpo].rewards.iou.wieght: unknown key; did you mean 'weight'?")


def test_unknown_key_without_close_match():
    message = error({**two_stages(), "zzzzzz": 1})
    assert "did you mean" not in message and message.startswith("zzzzzz: unknown key; allowed:")


def test_bad_choice_lists_allowed_values():
    message = error(two_stages(), "optim.scheduler=cosin")
    assert message.startswith("stages[sft].optim.scheduler:")
    assert "choose one of: constant, linear, cosine" in message
    message = error(two_stages(), "grpo.algorithm.scale_rewards=groups")
    assert message.startswith("stages[grpo].algorithm.scale_rewards:")
    assert "group" in message and "batch" in message and "none" in message
    raw = two_stages()
    raw["stages"][1]["kind"] = "rl"
    message = error(raw)
    assert message.startswith("stages[1].kind:") and "choose one of: sft, grpo" in message


@pytest.mark.parametrize("override, path, expected", [
    ("optim.max_steps=ten", "stages[sft].optim.max_steps", "expected int, got 'ten'"),
    ("optim.max_steps=2.5", "stages[sft].optim.max_steps", "expected int, got 2.5"),
    ("optim.max_steps=true", "stages[sft].optim.max_steps", "expected int, got True"),
    ("optim.learning_rate=fast", "stages[sft].optim.learning_rate", "expected float, got 'fast'"),
    ("optim.learning_rate=true", "stages[sft].optim.learning_rate", "expected float, got True"),
    ("logging.tensorboard=maybe", "stages[sft].logging.tensorboard", "expected bool, got 'maybe'"),
    ("model.name_or_path=[a, b]", "stages[sft].model.name_or_path", "expected str, got ['a', 'b']"),
    ("optim=3", "stages[sft].optim", "expected a mapping"),
    ("grpo.rewards=[iou]", "stages[grpo].rewards", "expected a mapping"),
])
def test_wrong_type_names_the_key(override, path, expected):
    message = error(two_stages(), override)
    assert message.startswith(path + ":")
    assert expected in message


def test_wrong_type_top_level_seed():
    assert error(two_stages(), "seed=abc").startswith("seed: expected int, got 'abc'")


def test_grpo_needs_rewards():
    raw = two_stages()
    del raw["stages"][1]["rewards"]
    message = error(raw)
    assert message.startswith("stages[grpo].rewards: GRPO needs at least one reward")


def test_grpo_needs_two_generations():
    message = error(two_stages(), "grpo.rollout.num_generations=1")
    assert message.startswith("stages[grpo].rollout.num_generations:") and "got 1" in message
    # an SFT stage does not care
    assert load(two_stages(), "sft.rollout.num_generations=1").stages[0].rollout.num_generations == 1


@pytest.mark.parametrize("override, key", [
    ("grpo.rollout.temperature=0", "stages[grpo].rollout.temperature"),
    ("grpo.algorithm.beta=-0.1", "stages[grpo].algorithm.beta"),
    ("grpo.algorithm.epsilon_low=1.0", "stages[grpo].algorithm.epsilon_low/high"),
    ("optim.batch_size=0", "stages[sft].optim.batch_size"),
    ("sft.optim.max_steps=0", "stages[sft].optim.max_steps"),
    ("grpo.rollout.max_new_tokens=0", "stages[grpo].rollout.max_new_tokens"),
    ("data.thought_dropout=1.5", "stages[sft].data.thought_dropout"),
    ("optim.learning_rate=0", "stages[sft].optim.learning_rate"),
    ("data.train=", "stages[sft].data.train"),
])
def test_value_checks_name_the_key(override, key):
    assert error(two_stages(), override).startswith(key + ":")


@pytest.mark.parametrize("override, key", [
    # values that used to pass and then misbehave: -1 dropped a sample, saved every step, 0 crashed at step 1
    ("data.max_samples=-1", "stages[sft].data.max_samples"),
    ("data.max_samples=0", "stages[sft].data.max_samples"),
    ("save.every=-1", "stages[sft].save.every"),
    ("save.keep=0", "stages[sft].save.keep"),
    ("logging.log_every=0", "stages[sft].logging.log_every"),
    ("logging.rollouts_every=-2", "stages[sft].logging.rollouts_every"),
    ("optim.learning_rate=.nan", "stages[sft].optim.learning_rate"),
    ("optim.warmup_steps=-1", "stages[sft].optim.warmup_steps"),
    ("optim.max_grad_norm=0", "stages[sft].optim.max_grad_norm"),
    ("optim.time_budget_s=0", "stages[sft].optim.time_budget_s"),
    ("grpo.rollout.top_p=0", "stages[grpo].rollout.top_p"),
    ("grpo.algorithm.max_refill_tries=-1", "stages[grpo].algorithm.max_refill_tries"),
    ("grpo.algorithm.reward_timeout_s=0", "stages[grpo].algorithm.reward_timeout_s"),
    ("grpo.rewards.iou.weight=.inf", "stages[grpo].rewards.iou.weight"),
    ("data.max_tokens=0", "stages[sft].data.max_tokens"),
    ("model.lora.dropout=1.0", "stages[sft].model.lora.dropout"),
    ("agent.memory_window=0", "stages[sft].agent.memory_window"),
])
def test_out_of_range_values_name_the_key_and_the_value(override, key):
    message = error(two_stages(), override)
    assert message.startswith(key + ":") and "(got " in message


def test_optional_limits_accept_null():
    sft = load(two_stages(), "data.max_samples=null", "data.max_tokens=null", "algorithm.reward_timeout_s=null",
               "save.every=0", "logging.rollouts_every=0").stages[0]
    assert sft.data.max_samples is None and sft.data.max_tokens is None and sft.save.every == 0


def test_the_memory_window_needs_tool_mode():
    assert error(two_stages(), "agent.memory_window=2").startswith(
        "stages[sft].agent.memory_window: the visual memory window holds tool images; it needs agent.mode: tools")
    tools = load(two_stages(), "agent.mode=tools", "agent.tools=[select_frames]", "agent.memory_window=2")
    assert tools.stages[1].agent.memory_window == 2


def test_duplicate_stage_names():
    message = error({"data": {"train": "t"}, "stages": ["sft", "sft"]})
    assert message.startswith("stages: names must be unique") and "called sft" in message
    raw = {"data": {"train": "t"}, "stages": [{"kind": "sft", "name": "a"}, {"kind": "grpo", "name": "a"}]}
    assert "called a" in error(raw)


def test_stage_named_like_a_config_key():
    message = error({"data": {"train": "t"}, "stages": [{"kind": "sft", "name": "optim"}]})
    assert message.startswith("stages: a stage may not be named like a config key (optim)")


@pytest.mark.parametrize("stages", [None, [], "sft", {"kind": "sft"}])
def test_missing_stages(stages):
    raw = {"data": {"train": "t"}}
    if stages is not None:
        raw["stages"] = stages
    assert error(raw).startswith("stages: list the stages to run")


@pytest.mark.parametrize("entry", [3, {"name": "x"}, ["sft"]])
def test_malformed_stage_entry(entry):
    assert error({"data": {"train": "t"}, "stages": ["sft", entry]}).startswith("stages[1]: a stage is")


@pytest.mark.parametrize("override", ["optim.learning_rate", "=3", "optim..lr=1", ".seed=1", "optim.=2"])
def test_bad_override_syntax(override):
    message = error(two_stages(), override)
    assert message.startswith(f"override {override!r}: write key=value")


def test_override_of_unknown_key_suggests():
    message = error(two_stages(), "optm.learning_rate=1")
    assert message.startswith("override 'optm.learning_rate=1': unknown key; did you mean 'optim'?")
    assert "grpo" in message  # stage names are allowed first keys too
    assert "did you mean 'grpo'" in error(two_stages(), "gpro.optim.max_steps=2")
    assert error(two_stages(), "seed.x=1").startswith("override 'seed.x=1': unknown key")
    assert error(two_stages(), "stages=[sft]").startswith("override 'stages=[sft]': unknown key")


def test_override_into_unknown_stage_key_names_the_stage():
    assert error(two_stages(), "grpo.optimm.max_steps=3").startswith("stages[grpo].optimm: unknown key; did you mean")


def test_parse_override():
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("seed=1") == (["seed"], 1)
    assert parse_override("x=") == (["x"], "")
    assert parse_override("x=a=b") == (["x"], "a=b")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [sft\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- sft\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="give a config file or a dict"):
        load_config(None)


# ---- shipped configs ------------------------------------------------------------------------------


def shipped_configs() -> list[Path]:
    return sorted(CONFIGS.glob("**/*.yaml")) if CONFIGS.is_dir() else []


@pytest.mark.skipif(not shipped_configs(), reason="no configs/ folder with YAML files in this checkout")
@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_load(path):
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert len(config.stages) == len(raw["stages"])
    for index, stage in enumerate(config.stages):
        assert stage.data.train
        entry = raw["stages"][index]
        names_model = isinstance(entry, dict) and "name_or_path" in (entry.get("model") or {})
        if index > 0 and not names_model:
            assert stage.model.name_or_path == final_checkpoint(config.stages[index - 1].output_dir)
