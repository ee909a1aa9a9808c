"""Reward plugins: registry resolution (name, import string, file, entry point), options, column checks."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from vlreason.registry import PluginError
from vlreason.rewards import RewardScorer, check_columns, get_reward, list_rewards, parsed_columns, register_reward
from vlreason.rewards.answers import ChoiceReward
from vlreason.rewards.api import REWARDS, required_columns
from vlreason.rewards.grounding import IoUReward

PLUGIN = """
def length_reward(completions, **columns):
    return [float(len(c)) for c in completions]


class Scaled:
    required_columns = ("answer",)

    def __init__(self, factor=1.0):
        self.factor = factor

    def __call__(self, completions, **columns):
        return [self.factor * len(c) for c in completions]


NOT_CALLABLE = 3
"""


def write_plugin(folder: Path, name: str = "my_reward.py", source: str = PLUGIN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group="vlreason.rewards")


def accuracy_reward(completions, solution, **kwargs):
    """A reward written for TRL: conversational completions, a ``solution`` column, ``**kwargs``."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if s in c else 0.0 for c, s in zip(contents, solution, strict=True)]


# ---------------------------------------------------------------------------- names


def test_builtins_are_listed() -> None:
    assert {"format", "iou", "multi_box_iou", "detection_map", "classification", "numeric", "choice"} <= set(
        list_rewards())


def test_resolve_registered_name() -> None:
    assert REWARDS.resolve("iou") is IoUReward
    assert isinstance(get_reward("choice"), ChoiceReward)


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(PluginError, match=r"did you mean .*\bclassification\b") as info:
        get_reward("clasification")
    assert "available:" in str(info.value) and "multi_box_iou" in str(info.value)


def test_unknown_name_without_close_match_lists_what_exists() -> None:
    with pytest.raises(PluginError, match="unknown reward 'zzzz'") as info:
        get_reward("zzzz")
    assert "did you mean" not in str(info.value)
    assert "numeric" in str(info.value)


# ---------------------------------------------------------------------------- import strings


def test_resolve_import_string() -> None:
    assert REWARDS.resolve("vlreason.rewards.answers:ChoiceReward") is ChoiceReward
    reward = get_reward("vlreason.rewards.answers:ChoiceReward")
    assert isinstance(reward, ChoiceReward)


def test_import_string_missing_module() -> None:
    with pytest.raises(PluginError, match="cannot import 'vlreason.no_such_module'"):
        get_reward("vlreason.no_such_module:Thing")


def test_import_string_missing_attribute_suggests() -> None:
    with pytest.raises(PluginError, match="did you mean ChoiceReward") as info:
        get_reward("vlreason.rewards.answers:ChoiceRewrd")
    assert "vlreason.rewards.answers" in str(info.value)


# ---------------------------------------------------------------------------- files


def test_resolve_absolute_file(tmp_path: Path) -> None:
    path = write_plugin(tmp_path)
    reward = get_reward(f"{path}:length_reward")
    assert reward(["ab", "abcd"]) == [2.0, 4.0]


def test_resolve_file_relative_to_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(tmp_path / "config" / "plugins")
    monkeypatch.chdir(tmp_path)  # the file is not relative to the working directory
    reward = get_reward("plugins/my_reward.py:length_reward", base_dir=tmp_path / "config")
    assert reward(["abc"]) == [3.0]


def test_resolve_file_relative_to_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(tmp_path / "plugins")
    monkeypatch.chdir(tmp_path)
    assert get_reward("plugins/my_reward.py:length_reward")(["a"]) == [1.0]
    # a base_dir that lacks the file falls back to the working directory
    assert get_reward("plugins/my_reward.py:length_reward", base_dir=tmp_path / "elsewhere")(["a"]) == [1.0]


def test_loading_the_same_file_twice_gives_the_same_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_plugin(tmp_path)
    first = REWARDS.resolve(f"{path}:length_reward")
    assert REWARDS.resolve(f"{path}:length_reward") is first
    monkeypatch.chdir(tmp_path)
    assert REWARDS.resolve("my_reward.py:length_reward") is first  # same file by a relative path
    assert type(get_reward(f"{path}:Scaled")) is type(get_reward("my_reward.py:Scaled"))


def test_plugin_file_class_with_options(tmp_path: Path) -> None:
    path = write_plugin(tmp_path)
    reward = get_reward(f"{path}:Scaled", factor=2.0)
    assert reward(["abc"]) == [6.0]
    assert required_columns(reward) == ("answer",)


def test_plugin_file_that_raises(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "broken.py", "import math\nVALUE = 1 / 0\n")
    for _ in range(2):  # the failure is not cached as a half-loaded module
        with pytest.raises(PluginError, match="broken.py") as info:
            get_reward(f"{path}:VALUE")
        assert "ZeroDivisionError" in str(info.value)


def test_plugin_file_missing_attribute(tmp_path: Path) -> None:
    path = write_plugin(tmp_path)
    with pytest.raises(PluginError) as info:
        get_reward(f"{path}:length_rewad")
    message = str(info.value)
    assert "my_reward.py" in message and "'length_rewad'" in message
    assert "did you mean length_reward" in message
    assert "length_reward" in message.split("it defines:")[1] and "Scaled" in message.split("it defines:")[1]


def test_plugin_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="not found"):
        get_reward(f"{tmp_path / 'missing.py'}:reward")


def test_plugin_attribute_that_is_not_callable(tmp_path: Path) -> None:
    path = write_plugin(tmp_path)
    with pytest.raises(PluginError, match="not callable"):
        get_reward(f"{path}:NOT_CALLABLE")


# ---------------------------------------------------------------------------- entry points


def test_entry_point_reward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(REWARDS, "_entry_points",
                        lambda: [entry_point("ep_choice", "vlreason.rewards.answers:ChoiceReward")])
    assert "ep_choice" in list_rewards()
    assert isinstance(get_reward("ep_choice"), ChoiceReward)
    with pytest.raises(PluginError, match="did you mean ep_choice"):
        get_reward("ep_choise")


def test_entry_point_that_fails_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(REWARDS, "_entry_points", lambda: [entry_point("ep_bad", "vlreason.no_such_module:Reward")])
    with pytest.raises(PluginError, match="ep_bad.*failed to load"):
        get_reward("ep_bad")


# ---------------------------------------------------------------------------- options


def test_options_instantiate_classes() -> None:
    assert get_reward("iou", threshold=0.5).threshold == 0.5
    assert get_reward("iou").threshold is None
    reward = get_reward("multi_box_iou", matching="hungarian", confidence_weight=1.0)
    assert reward.matching.value == "hungarian" and reward.confidence_weight == 1.0


def test_options_to_a_function_are_an_error(clean_registry) -> None:
    register_reward("plain_fn_for_test")(accuracy_reward)
    with pytest.raises(PluginError, match="function and takes no options"):
        get_reward("plain_fn_for_test", scale=2)
    assert get_reward("plain_fn_for_test") is accuracy_reward


def test_bad_option_names_list_the_accepted_ones() -> None:
    with pytest.raises(PluginError) as info:
        get_reward("multi_box_iou", treshold=0.3)
    message = str(info.value)
    assert "treshold" in message
    accepted = message.split("accepted:")[1]
    for name in ("matching", "iou_threshold", "confidence_weight", "match_labels"):
        assert name in accepted
    with pytest.raises(PluginError, match="accepted: none"):
        get_reward("choice", strict=True)


# ---------------------------------------------------------------------------- registration


def test_register_reward_and_duplicates(clean_registry) -> None:
    @register_reward("test_length")
    def length(completions, **columns):
        return [float(len(c)) for c in completions]

    assert get_reward("test_length") is length
    assert "test_length" in list_rewards()
    register_reward("test_length")(length)  # the same object again is fine
    with pytest.raises(ValueError, match="'test_length' is already registered"):
        register_reward("test_length")(lambda completions, **columns: [])
    with pytest.raises(ValueError, match="already registered"):
        register_reward("iou")(lambda completions, **columns: [])


def test_registry_cleanup_fixture_restores_entries() -> None:
    # runs after the registration tests in file order: nothing they registered is left behind
    assert "test_length" not in list_rewards()
    assert "plain_fn_for_test" not in list_rewards()
    assert REWARDS.resolve("iou") is IoUReward


# ---------------------------------------------------------------------------- columns


def test_required_columns_from_signature() -> None:
    def trl(completions, solution, **kwargs):
        return []

    def many(completions, prompts, solution, image_sizes, pred_boxes, difficulty, threshold=0.5, *, mode="x",
             **kwargs):
        return []

    assert required_columns(trl) == ("solution",)
    assert required_columns(many) == ("solution", "difficulty")  # reserved and defaulted ones left out
    assert required_columns(accuracy_reward) == ("solution",)


def test_required_columns_of_classes() -> None:
    assert required_columns(get_reward("iou")) == ("boxes",)
    assert required_columns(get_reward("multi_box_iou")) == ("boxes",)  # labels are optional
    assert required_columns(get_reward("detection_map")) == ("boxes",)
    assert required_columns(get_reward("choice")) == ("answer", "choices")
    assert required_columns(get_reward("classification")) == ("label",)
    assert required_columns(get_reward("numeric")) == ("answer",)
    assert required_columns(get_reward("numeric", column="count")) == ("count",)
    assert required_columns(get_reward("format")) == ()


def test_check_columns_names_reward_and_column() -> None:
    rewards = {"acc": accuracy_reward, "grounding": get_reward("iou"), "fmt": get_reward("format")}
    with pytest.raises(ValueError) as info:
        check_columns(rewards, ["answer", "id"], "train.jsonl")
    message = str(info.value)
    assert "train.jsonl" in message
    assert "reward 'acc' needs column(s) solution" in message
    assert "reward 'grounding' needs column(s) boxes" in message
    assert "'fmt'" not in message
    check_columns(rewards, ["answer", "solution", "boxes"], "train.jsonl")  # all present: no error


# ---------------------------------------------------------------------------- TRL drop-in


def test_trl_reward_function_drops_in(clean_registry) -> None:
    register_reward("trl_accuracy")(accuracy_reward)
    completions = [[{"role": "assistant", "content": "<think>r</think><answer>42</answer>"}],
                   [{"role": "assistant", "content": "<answer>41</answer>"}]]
    columns = {"solution": ["42", "42"], **parsed_columns(completions, [[(10, 10)], [(10, 10)]])}
    scorer = RewardScorer({"acc": get_reward("trl_accuracy"), "format": get_reward("format")})
    table = scorer(completions, columns)
    assert table.names == ["acc", "format"]
    assert table.column("acc").tolist() == [1.0, 0.0]
    assert table.column("format").tolist() == [1.0, 0.0]
