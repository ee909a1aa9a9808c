"""Training configuration: typed dataclasses merged from YAML and ``key=value`` overrides.

A config file lists the stages to run and the sections they share::

    seed: 0
    output_dir: runs/grounding
    model: {name_or_path: tiny-qwen2.5-vl}
    data: {train: data/grounding/train.jsonl, eval: data/grounding/eval.jsonl}
    stages:
      - kind: sft
        optim: {learning_rate: 1.0e-3, max_steps: 300}
      - kind: grpo
        rewards: {format: {weight: 0.2}, iou: {}}

Each stage is the shared sections deep-merged with the stage's own entry. A stage after the first
starts from the previous stage's final checkpoint unless it names ``model.name_or_path`` itself,
and writes into ``output_dir/<stage name>``.

Overrides on the command line are applied last: ``optim.learning_rate=1e-4`` changes every
stage, ``grpo.optim.learning_rate=1e-4`` only the stage named ``grpo``, ``seed=1`` the top level.
Values are read as YAML (``true``, ``[1, 2]``, ``{a: 1}``).

Relative paths follow one rule, in the file as on the command line: they are relative to the
working directory ``vlreason`` runs in (data, eval, a data source's paths, reward and metric
plugin files, output folders, a local model, a DeepSpeed config). ``load_config`` makes them
absolute, so the resolved config (saved as ``output_dir/config.yaml``) means the same from
anywhere.

``load_config`` validates everything once: unknown keys (with the closest match), wrong types
and values outside the allowed choices fail with the full key path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlreason.choices import Choice
from vlreason.data.convert import FORMATS, PATH_OPTIONS, format_options
from vlreason.data.jsonl import OnBadSample
from vlreason.data.sources import split_source
from vlreason.rewards.scoring import OnRewardError
from vlreason.rl import AdvantageScale, ImportanceLevel, LossAggregation
from vlreason.vision.video import FrameSampling


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the key."""


class StageKind(Choice):
    SFT = "sft"
    GRPO = "grpo"


class Scheduler(Choice):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | None = None  # regex; default: the family's language-model projections


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-qwen2.5-vl"  # hub id, local checkpoint or tiny preset
    # compute dtype: auto (the checkpoint's) | float32 | bfloat16 | float16; in training, trainable
    # weights (and so the optimizer state) stay float32 and half-precision compute runs under autocast
    dtype: str = "auto"
    device: str = "auto"  # auto (the GPU when there is one, else the CPU) | cpu | cuda | cuda:N
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2
    min_pixels: int | None = None  # image resize bounds (pixels per image); default: the processor's
    max_pixels: int | None = None
    freeze_vision: bool = True  # keep the vision tower (and its merger) fixed
    freeze_patch_embed: bool = False  # with freeze_vision false: keep only the tower's pixel projection fixed
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SourceConfig:
    """Data in another format, converted on the fly (``vlreason.data.sources``)."""

    format: str  # one of vlreason data convert's formats: coco, lvis, refcoco, hf, llava, mis
    path: str  # the source file (hf: also a dataset folder or a hub id)
    image_root: str | None = None  # folder the source's image paths start from (default: the source's)
    options: dict[str, Any] = field(default_factory=dict)  # the format's options, e.g. {split: val}


@dataclass
class DataConfig:
    # a JSONL file in the vlreason schema, FORMAT:PATH (coco:instances.json), or a SourceConfig mapping
    train: str | SourceConfig = ""
    eval: str | SourceConfig | None = None  # held-out data for evaluation after the stage, in the same forms
    # the evaluation's metrics (vlreason.eval.metric_spec): built-in names, or {name: {reward: SPEC, ...}}
    # for any reward plugin; default: the metrics data.eval's ground truth supports
    eval_metrics: list[Any] | None = None
    on_bad_sample: OnBadSample = OnBadSample.ERROR  # error: stop at the first bad line; skip: count and log
    max_samples: int | None = None  # use only the first N training samples
    # longest input in tokens, image tokens included: the prompt (GRPO, eval) or the whole
    # conversation (SFT); longer samples are a data problem (on_bad_sample decides: stop or skip)
    max_tokens: int | None = 8192
    thought_dropout: float = 0.0  # SFT (TON): replace the <think> block with an empty one at this rate


@dataclass
class VideoConfig:
    """How a sample's videos become model inputs (training and evaluation)."""

    fps: float = 2.0  # frames taken per second of the clip, spread from its first frame to its last
    min_frames: int = 4  # at least this many (never more than the clip has); counts are rounded down to even
    max_frames: int = 16
    max_pixels: int | None = None  # per frame; default: the image maximum, at most 768 merged patches
    total_pixels: int | None = None  # all frames of a clip together (qwen-vl-utils' budget); null: no total
    backend: str | None = None  # pyav | decord | opencv; null: the first installed of those, in that order
    shuffle_frames: bool = False  # a control run: each video's frames in a fixed random order (times kept)

    def sampling(self) -> FrameSampling:
        """The frames each video gives, as ``vision.video`` takes them.

        Raises:
            ConfigError: the frame counts or rate are out of range (naming the keys).
        """
        try:
            return FrameSampling(fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames)
        except ValueError as exc:
            raise ConfigError(f"video: {exc} (keys video.fps, video.min_frames, video.max_frames)") from exc


@dataclass
class RolloutConfig:
    engine: str = "hf"  # registered rollout engine (name, module:attr or file.py:attr)
    engine_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the engine
    num_generations: int = 8  # G samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64  # per model turn


class AgentMode(Choice):
    NONE = "none"  # one model turn: the answer
    TOOLS = "tools"  # the model calls agent.tools (<tool_call>{json}</tool_call>) and reads their replies
    GROUNDING = "grounding"  # MGPO: turn 1 writes a box, turn 2 sees its crop of the original image and answers


@dataclass
class AgentConfig:
    """Multi-turn rollouts (GRPO, evaluation) and the tool schemas prompts list (SFT too)."""

    mode: AgentMode = AgentMode.NONE
    tools: list[str] = field(default_factory=list)  # tool specs: names (crop), module:attr or file.py:attr
    max_turns: int = 3  # model turns per trajectory (grounding: always 2)
    max_images: int = 4  # images all observations of a trajectory may show
    max_tokens: int = 1024  # tokens after the prompt: model turns and observations together
    grounding_prompt: str = "Here is the region you selected. Answer the question."
    # tool images in view at once (VR-Thinker's visual memory window): older calls' images leave the
    # view with a note (their tokens stay, unattended); null: all stay in view
    memory_window: int | None = None


@dataclass
class RewardConfig:
    weight: float = 1.0
    fn: str | None = None  # reward spec (name, module:attr, file.py:attr relative to the config); default: the key
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a reward class
    # where this reward scores <= veto, every other reward scores 0 (safety: a harmful answer
    # earns nothing for format or accuracy); null: no veto
    veto: float | None = None


@dataclass
class AlgorithmConfig:
    epsilon_low: float = 0.2  # ratio clipped to [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float = 0.2  # > epsilon_low is DAPO's clip-higher
    beta: float = 0.0  # weight of the k3 KL to the frozen reference (0: no reference is kept)
    scale_rewards: AdvantageScale = AdvantageScale.GROUP  # group | batch | none (Dr. GRPO)
    loss_aggregation: LossAggregation = LossAggregation.TOKEN_MEAN
    importance_level: ImportanceLevel = ImportanceLevel.TOKEN  # token | sequence (GSPO)
    num_iterations: int = 1  # mu: policy updates per sampled batch (old log-probs stored)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and refill the batch
    max_refill_tries: int = 4  # extra prompt batches drawn per step when dynamic sampling filters
    mask_truncated: bool = False  # leave completions that hit max_new_tokens out of the loss
    # truncated importance sampling for the sampler/trainer mismatch (vLLM's numerics differ from
    # the trained model's): each token's policy loss is weighted by min(pi_train / pi_sampler,
    # sampler_is_cap), as verl and TRL offer (null: off; the mismatch is logged either way)
    sampler_is_cap: float | None = None
    # DAPO's soft overlong punishment: over the last overlong_buffer tokens of max_new_tokens the
    # total reward loses up to overlong_penalty, linearly (0: off)
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # Video-R1's T-GRPO: every prompt is sampled a second time (G completions) with each video's
    # frames shuffled; when a group's accuracy in order p >= temporal_mu * p~ on shuffled frames,
    # its correct ordered completions gain temporal_alpha (logged as reward/temporal). Correct: the
    # reward named here (a key of rewards) scores 1. null: off
    temporal_reward: str | None = None
    temporal_alpha: float = 0.3
    temporal_mu: float = 0.8
    # VideoP2R's PA-GRPO: the tokens of a completion's <perception_tag>...</perception_tag> span
    # learn from the advantage of perception_rewards alone (the rewards that judge that span), all
    # other tokens from the advantage of the other rewards, each normalised within its group.
    # null: one advantage per completion
    perception_tag: str | None = None
    perception_rewards: list[str] = field(default_factory=list)
    on_reward_error: OnRewardError = OnRewardError.SKIP  # skip: score n/a, count and log; raise: stop
    reward_timeout_s: float | None = 600.0  # a reward call running longer fails (on_reward_error decides)


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    scheduler: Scheduler = Scheduler.CONSTANT
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8  # SFT: sequences per step; GRPO: prompts per step
    max_steps: int = 100
    time_budget_s: float | None = None  # also stop (and save) after this much training time (not reproducible)
    max_bad_steps: int = 5  # stop after this many non-finite losses or gradients in a row
    # GRPO memory: token positions whose [positions, vocabulary] logits exist at once in a
    # log-prob pass (recomputed chunk by chunk in backward); null: 2**26 logits (256 MB in
    # float32), 441 positions at Qwen's vocabulary
    logprob_chunk: int | None = None
    # GRPO memory: completions per forward/backward pass (gradients accumulate to the same update);
    # null: all of a batch at once. A multiple or a divisor of rollout.num_generations
    micro_batch_size: int | None = None
    # recompute each decoder layer's activations in backward (less memory, about a third more
    # compute); GRPO's gradient pass then runs prompt + completion per completion (no KV cache)
    gradient_checkpointing: bool = False
    # several processes: a DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json) for ZeRO;
    # null: plain data parallelism (see README, "Several GPUs")
    deepspeed: str | None = None


@dataclass
class LoggingConfig:
    log_every: int = 1  # steps between log lines (JSONL + TensorBoard)
    tensorboard: bool = True
    rollouts_every: int = 1  # GRPO: steps between rollout dumps to rollouts.jsonl (0: never)
    progress: bool = True  # progress bar
    # also log to Weights & Biases under this project (pip install 'vlreason[wandb]';
    # WANDB_MODE=offline works without an account); null: off
    wandb_project: str | None = None


@dataclass
class SaveConfig:
    every: int = 50  # steps between checkpoints (0: only at the end)
    keep: int = 2  # newest checkpoints kept


@dataclass
class StageConfig:
    """One stage, fully resolved."""

    kind: StageKind
    name: str
    output_dir: str
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    rewards: dict[str, RewardConfig] = field(default_factory=dict)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    save: SaveConfig = field(default_factory=SaveConfig)


@dataclass
class PipelineConfig:
    output_dir: str
    stages: list[StageConfig]
    seed: int = 0


SECTIONS = ("model", "data", "video", "rollout", "agent", "rewards", "algorithm", "optim", "logging", "save")
TOP_LEVEL = ("seed", "output_dir", "stages", *SECTIONS)


def load_config(path: str | Path | None, overrides: list[str] = (), raw: dict[str, Any] | None = None
                ) -> PipelineConfig:
    """Read, merge, convert and validate a pipeline config.

    Args:
        path: the YAML file (or None with ``raw``).
        overrides: ``key=value`` strings (see the module docstring).
        raw: the config as a dict instead of a file.
    """
    if raw is None:
        if path is None:
            raise ConfigError("give a config file or a dict")
        raw = _read_yaml(Path(path))
    raw = copy.deepcopy(raw)
    _check_keys(raw, TOP_LEVEL, "")
    entries = _stage_entries(raw.get("stages"))
    names = [entry["name"] for entry in entries]
    shared, every_stage, per_stage = _split_overrides(raw, names, overrides)
    output_dir = _absolute(str(shared.get("output_dir") or "runs/vlreason"))
    seed = _convert(shared.get("seed", 0), int, "seed")
    stages: list[StageConfig] = []
    for entry in entries:
        own = _deep_merge(_deep_merge(entry, every_stage), per_stage.get(entry["name"], {}))
        if stages and "name_or_path" not in _deep_merge(entry, per_stage.get(entry["name"], {})).get("model", {}):
            # a later stage starts from the previous stage's model (a shared model.name_or_path, in
            # the file or on the command line, names the pipeline's starting model)
            own = _deep_merge(own, {"model": {"name_or_path": final_checkpoint(stages[-1].output_dir)}})
        merged = _deep_merge({k: shared[k] for k in SECTIONS if k in shared}, own)
        merged.setdefault("output_dir", str(Path(output_dir) / entry["name"]))
        merged.setdefault("seed", seed)
        stage = _build(StageConfig, merged, f"stages[{entry['name']}]")
        stages.append(_with_absolute_paths(stage))
    config = PipelineConfig(output_dir=output_dir, stages=stages, seed=seed)
    validate(config)
    return config


def final_checkpoint(stage_output_dir: str | Path) -> str:
    """Where a stage saves its final model (a standard Hugging Face checkpoint)."""
    return str(Path(stage_output_dir) / "final")


def validate(config: PipelineConfig) -> None:
    """Checks of values and of fields together (types and choices are checked while converting)."""
    for stage in config.stages:
        where = f"stages[{stage.name}]"
        if not stage.data.train:
            raise ConfigError(f"{where}.data.train: no training data; set it to a JSONL file")
        if stage.data.eval_metrics and not stage.data.eval:
            raise ConfigError(f"{where}.data.eval_metrics: there is no data.eval to score; set data.eval")
        for key, check, rule in RULES:
            value = _get(stage, key)
            if value is not None and not check(value):
                raise ConfigError(f"{where}.{key}: {rule} (got {value})")
        for name, reward in stage.rewards.items():
            if not math.isfinite(reward.weight):
                raise ConfigError(f"{where}.rewards.{name}.weight: must be a finite number (got {reward.weight})")
        _validate_agent(stage.agent, f"{where}.agent")
        if stage.kind is StageKind.GRPO:
            _validate_grpo(stage, where)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


# (key, check, rule) for values that are not None; each rule says what is allowed
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("optim.batch_size", _positive, "must be >= 1"),
    ("optim.max_steps", _positive, "must be >= 1"),
    ("optim.max_bad_steps", _positive, "must be >= 1"),
    ("optim.logprob_chunk", _positive, "must be >= 1, or null for 2**26 logits per chunk"),
    ("optim.micro_batch_size", _positive, "must be >= 1, or null for the whole batch at once"),
    ("optim.learning_rate", _positive, "must be > 0"),
    ("optim.warmup_steps", _non_negative, "must be >= 0"),
    ("optim.weight_decay", _non_negative, "must be >= 0"),
    ("optim.max_grad_norm", _positive, "must be > 0"),
    ("optim.time_budget_s", _positive, "must be > 0 seconds, or null for no time limit"),
    ("data.max_samples", _positive, "must be >= 1, or null for all samples"),
    ("data.max_tokens", _positive, "must be >= 1, or null for no limit"),
    ("data.thought_dropout", lambda v: 0.0 <= v <= 1.0, "a rate in [0, 1]"),
    ("rollout.max_new_tokens", _positive, "must be >= 1"),
    ("rollout.top_p", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    ("agent.max_turns", _positive, "must be >= 1"),
    ("agent.max_images", _non_negative, "must be >= 0"),
    ("agent.max_tokens", _positive, "must be >= 1"),
    ("agent.memory_window", _positive, "must be >= 1 image, or null to keep every image in view"),
    ("algorithm.num_iterations", _positive, "must be >= 1"),
    ("algorithm.max_refill_tries", _non_negative, "must be >= 0"),
    ("algorithm.reward_timeout_s", _positive, "must be > 0 seconds, or null for no limit"),
    ("algorithm.overlong_buffer", _non_negative, "must be >= 0 tokens (0: no overlong penalty)"),
    ("algorithm.overlong_penalty", _non_negative, "must be >= 0"),
    ("algorithm.sampler_is_cap", lambda v: v >= 1.0, "must be >= 1 (e.g. 2.0), or null for no correction"),
    ("algorithm.temporal_alpha", _non_negative, "must be >= 0"),
    ("algorithm.temporal_mu", _non_negative, "must be >= 0"),
    ("logging.log_every", _positive, "must be >= 1"),
    ("logging.rollouts_every", _non_negative, "must be >= 0 (0: never)"),
    ("save.every", _non_negative, "must be >= 0 (0: only at the end)"),
    ("save.keep", _positive, "must be >= 1"),
    ("model.lora.r", _positive, "must be >= 1"),
    ("model.lora.alpha", _positive, "must be > 0"),
    ("model.lora.dropout", lambda v: 0.0 <= v < 1.0, "a rate in [0, 1)"),
    ("model.device", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
)


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _validate_agent(agent: AgentConfig, where: str) -> None:
    if agent.mode is AgentMode.TOOLS and not agent.tools:
        raise ConfigError(f"{where}.tools: mode tools needs at least one tool, e.g. tools: [crop]")
    if agent.mode is not AgentMode.TOOLS and agent.tools:
        raise ConfigError(f"{where}.mode: tools {agent.tools} are listed but mode is {agent.mode.value}; set "
                          "agent.mode: tools (or remove agent.tools)")
    if agent.mode is AgentMode.GROUNDING and agent.max_images < 1:
        raise ConfigError(f"{where}.max_images: grounding shows one crop; use >= 1")
    if agent.memory_window is not None and agent.mode is not AgentMode.TOOLS:
        raise ConfigError(f"{where}.memory_window: the visual memory window holds tool images; it needs agent.mode: "
                          f"tools (mode is {agent.mode.value}), or set memory_window: null")


def _validate_grpo(stage: StageConfig, where: str) -> None:
    if not stage.rewards:
        raise ConfigError(f"{where}.rewards: GRPO needs at least one reward, e.g. rewards: {{format: {{}}, iou: {{}}}}")
    if stage.rollout.num_generations < 2:
        raise ConfigError(f"{where}.rollout.num_generations: GRPO compares samples of a prompt; use >= 2 "
                          f"(got {stage.rollout.num_generations})")
    if not _positive(stage.rollout.temperature):
        raise ConfigError(f"{where}.rollout.temperature: sampling needs a temperature > 0")
    algorithm = stage.algorithm
    if not (0 <= algorithm.epsilon_low < 1 and _non_negative(algorithm.epsilon_high)):
        raise ConfigError(f"{where}.algorithm.epsilon_low/high: need 0 <= epsilon_low < 1 and epsilon_high >= 0")
    if not _non_negative(algorithm.beta):
        raise ConfigError(f"{where}.algorithm.beta: must be >= 0 (got {algorithm.beta})")
    if algorithm.overlong_buffer > stage.rollout.max_new_tokens:
        raise ConfigError(f"{where}.algorithm.overlong_buffer: {algorithm.overlong_buffer} tokens exceed "
                          f"rollout.max_new_tokens ({stage.rollout.max_new_tokens})")
    if algorithm.temporal_reward is not None and algorithm.temporal_reward not in stage.rewards:
        raise ConfigError(f"{where}.algorithm.temporal_reward: {algorithm.temporal_reward!r} is not one of the stage's "
                          f"rewards ({', '.join(stage.rewards)}); name the reward that scores 1 for a correct answer")
    _validate_perception(algorithm, stage, where)
    micro, group = stage.optim.micro_batch_size, stage.rollout.num_generations
    if micro is not None and micro % group and group % micro:
        raise ConfigError(f"{where}.optim.micro_batch_size: {micro} completions must be a multiple or a divisor of "
                          f"rollout.num_generations ({group}), so that a micro-batch holds whole groups or part of one")
    if stage.model.dtype == "float16":
        raise ConfigError(f"{where}.model.dtype: GRPO computes in float32 or bfloat16 (float16 gradients need "
                          "loss scaling, which it does not do); use bfloat16")


def _validate_perception(algorithm: AlgorithmConfig, stage: StageConfig, where: str) -> None:
    """PA-GRPO's settings: a tag and the rewards that judge its span, leaving others for the rest."""
    tag, names = algorithm.perception_tag, algorithm.perception_rewards
    if tag is None and not names:
        return
    if tag is None or not re.fullmatch(r"\w+", tag) or not names:
        raise ConfigError(f"{where}.algorithm.perception_tag/perception_rewards: PA-GRPO needs both, a tag name "
                          "(e.g. perception, for <perception>...</perception>) and the rewards that judge its span")
    unknown = [name for name in names if name not in stage.rewards]
    if unknown:
        raise ConfigError(f"{where}.algorithm.perception_rewards: {unknown} are not rewards of the stage "
                          f"({', '.join(stage.rewards)})")
    if set(names) >= set(stage.rewards):
        raise ConfigError(f"{where}.algorithm.perception_rewards: every reward judges the perception span; keep at "
                          "least one (e.g. choice or format) for the reasoning and answer tokens")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (``[a, b, c]``, YAML-parsed value)."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: write key=value, e.g. optim.learning_rate=1e-4")
    return key.split("."), yaml.safe_load(value) if value else ""


def as_dict(config: Any) -> Any:
    """A config (or part of one) as plain YAML-able data."""
    if dataclasses.is_dataclass(config):
        return {f.name: as_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: as_dict(v) for k, v in config.items()}
    if isinstance(config, list):
        return [as_dict(v) for v in config]
    if isinstance(config, Choice):
        return config.value
    return config


# ---- reading and merging ----------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level (seed, output_dir, stages, sections)")
    return data


def _stage_entries(stages: Any) -> list[dict[str, Any]]:
    if not isinstance(stages, list) or not stages:
        raise ConfigError("stages: list the stages to run, e.g. stages: [sft, grpo] or [{kind: sft, ...}]")
    entries = []
    for index, stage in enumerate(stages):
        entry = {"kind": stage} if isinstance(stage, str) else stage
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ConfigError(f"stages[{index}]: a stage is 'sft', 'grpo' or a mapping with 'kind'")
        _check_keys(entry, ("kind", "name", "seed", "output_dir", *SECTIONS), f"stages[{index}]")
        kind = _convert(entry["kind"], StageKind, f"stages[{index}].kind")
        entries.append({**entry, "kind": kind.value, "name": str(entry.get("name", kind.value))})
    names = [entry["name"] for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"stages: names must be unique; give 'name:' to the stages called {', '.join(duplicates)}")
    clashing = sorted(set(names) & set(TOP_LEVEL))
    if clashing:
        raise ConfigError(f"stages: a stage may not be named like a config key ({', '.join(clashing)})")
    return entries


def _split_overrides(raw: dict[str, Any], stage_names: list[str], overrides: list[str]
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """The file's top level with ``seed=`` / ``output_dir=`` applied, the section overrides for
    every stage, and the overrides per stage name (both win over the file's stage entries)."""
    shared = {k: v for k, v in raw.items() if k != "stages"}
    every_stage: dict[str, Any] = {}
    per_stage: dict[str, dict[str, Any]] = {}
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] in stage_names and len(keys) > 1:
            _set(per_stage.setdefault(keys[0], {}), keys[1:], value)
        elif keys[0] in ("seed", "output_dir") and len(keys) == 1:
            shared[keys[0]] = value
        elif keys[0] in SECTIONS:
            _set(every_stage, keys, value)
        else:
            allowed = [*TOP_LEVEL[:2], *SECTIONS, *stage_names]
            raise ConfigError(f"override {item!r}: {_unknown(keys[0], allowed)}")
    return shared, every_stage, per_stage


def _with_absolute_paths(stage: StageConfig) -> StageConfig:
    """Resolve the stage's relative paths against the working directory (the one rule, see the
    module docstring): data files and sources, output folder, reward and metric plugin files, a
    local model folder and a DeepSpeed config."""
    stage.output_dir = _absolute(stage.output_dir)
    stage.data.train = _absolute_data(stage.data.train, f"stages[{stage.name}].data.train")
    if stage.data.eval:
        stage.data.eval = _absolute_data(stage.data.eval, f"stages[{stage.name}].data.eval")
    if Path(stage.model.name_or_path).exists():  # else a hub id or a tiny preset
        stage.model.name_or_path = _absolute(stage.model.name_or_path)
    if stage.optim.deepspeed:
        stage.optim.deepspeed = _absolute(stage.optim.deepspeed)
    for name, reward in stage.rewards.items():
        if _absolute_plugin(reward.fn or name) != (reward.fn or name):
            reward.fn = _absolute_plugin(reward.fn or name)
    stage.agent.tools = [_absolute_plugin(spec) for spec in stage.agent.tools]
    for entry in stage.data.eval_metrics or []:  # {name: {reward: SPEC, ...}}: a plugin file's path
        for spec in entry.values() if isinstance(entry, dict) else []:
            if isinstance(spec, dict) and isinstance(spec.get("reward"), str):
                spec["reward"] = _absolute_plugin(spec["reward"])
    stage.rollout.engine = _absolute_plugin(stage.rollout.engine)
    return stage


def _absolute_data(value: str | SourceConfig, key: str) -> str | SourceConfig:
    """A data file made absolute; a source (``FORMAT:PATH`` or a mapping) as a ``SourceConfig``
    with absolute paths and its format and options checked."""
    if isinstance(value, str) and split_source(value) is None:
        return _absolute(value)
    if isinstance(value, str):
        fmt, path = split_source(value)
        value = SourceConfig(format=fmt, path=path)
    if value.format not in FORMATS:
        raise ConfigError(f"{key}.format: {value.format!r} is not a data format; choose one of {', '.join(FORMATS)}")
    unknown = sorted(set(value.options) - set(format_options(value.format)))
    if unknown:
        raise ConfigError(f"{key}.options.{unknown[0]}: {_unknown(unknown[0], format_options(value.format))}")
    value.path = value.path if value.format == "hf" and not Path(value.path).exists() else _absolute(value.path)
    value.image_root = _absolute(value.image_root) if value.image_root else None
    value.options = {k: _absolute(v) if k in PATH_OPTIONS else v for k, v in value.options.items()}
    return value


def _absolute_plugin(spec: str) -> str:
    """A plugin spec with a ``file.py`` part made absolute (names and ``module:attr`` unchanged)."""
    target, sep, attr = spec.rpartition(":")
    return f"{_absolute(target)}:{attr}" if sep and target.endswith(".py") else spec


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _set(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ---- typed conversion ---------------------------------------------------------------------------


def _build(cls: type, data: Any, path: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, converting and checking every field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _check_keys(data, names, path)
    values = {name: _convert(value, hints[name], f"{path}.{name}".lstrip(".")) for name, value in data.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    return cls(**values)


def _convert(value: Any, hint: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # str | SomeConfig: a mapping builds the dataclass, anything else is the scalar
            inner = [a for a in inner if dataclasses.is_dataclass(a) == isinstance(value, dict)] or inner
        return _convert(value, inner[0], path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        if dataclasses.is_dataclass(args[1]):
            return {str(k): _build(args[1], v if v is not None else {}, f"{path}.{k}") for k, v in value.items()}
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(item, args[0], f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(hint, type) and issubclass(hint, Choice):
        try:
            return hint(value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return _scalar(value, hint, path)


def _scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{path}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _check_keys(data: dict[str, Any], allowed: tuple[str, ...] | list[str], path: str) -> None:
    for key in data:
        if key not in allowed:
            where = f"{path}." if path else ""
            raise ConfigError(f"{where}{key}: {_unknown(str(key), allowed)}")


def _unknown(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed: {', '.join(allowed)}"
