"""Everything a run needs, checked before any stage spends compute.

``check_pipeline`` runs before the first stage trains: the output folders (writable, not
holding an earlier run unless told to resume or overwrite it), and for every stage its
training data (read and validated once, then handed to the stage), its evaluation data, its
rewards with their options and plugin files, and the data columns each reward needs. A mistake
in the last stage is reported before the first one starts.

``fit_length`` runs once a stage's model is loaded (it needs the tokenizer): samples longer
than ``data.max_tokens`` are a data problem like any other (stop, or skip and count).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlreason.config import ConfigError, PipelineConfig, StageConfig, StageKind, final_checkpoint
from vlreason.data.jsonl import DataError, DataProblem, OnBadSample, read_jsonl
from vlreason.data.schema import Sample
from vlreason.eval.evaluate import metric_rewards, metric_spec
from vlreason.models.adapters import VideoPrompt
from vlreason.models.vlm import VLM, resolve_device
from vlreason.registry import PluginError
from vlreason.rewards.api import RewardFn, check_columns, get_reward
from vlreason.rollout.agent import Agent, build_agent
from vlreason.rollout.engine import ENGINES
from vlreason.training.checkpoints import checkpoint_step, checkpoints, read_stage_record
from vlreason.training.distributed import processes
from vlreason.training.run_dir import earlier_run_outputs, ensure_writable_dir, remove_run_outputs, stage_outputs
from vlreason.training.update import read_deepspeed_file
from vlreason.vision import video_backends
from vlreason.vision.video import ClipReader, VideoError

logger = logging.getLogger(__name__)


@dataclass
class StageInputs:
    """What a stage trains on, validated: the samples (``data.max_samples`` applied), the data's
    column names and, for GRPO, the reward functions by name."""

    samples: list[Sample]
    columns: set[str]
    rewards: dict[str, RewardFn] = field(default_factory=dict)
    agent: Agent | None = None  # multi-turn rollouts (agent.mode); its tool schemas go into prompts

    @property
    def tool_schemas(self) -> list[dict[str, Any]] | None:
        """The tool schemas the stage's prompts list in their system prompt (None: no tools)."""
        return self.agent.schemas() if self.agent is not None else None


def check_pipeline(config: PipelineConfig, resume: bool = False, overwrite: bool = False) -> dict[str, StageInputs]:
    """Validate every stage of ``config`` and prepare the output folders.

    Returns:
        Each stage's inputs by stage name.

    Raises:
        ConfigError, DataError, PluginError, ValueError: with what to change.
    """
    earlier = earlier_run_outputs(Path(config.output_dir), [Path(s.output_dir) for s in config.stages])
    if earlier and not (resume or overwrite):
        raise _earlier_run_error(config, earlier)
    if resume:
        _check_no_stale_stages(config)
    inputs = {stage.name: stage_inputs(stage) for stage in config.stages}
    for stage in config.stages:
        ensure_writable_dir(Path(stage.output_dir), f"stages[{stage.name}].output_dir")
    if earlier and overwrite:  # only once everything checked out: a bad config never costs the old run
        logger.warning("--overwrite: deleting the earlier run's outputs in %s (%d entries)", config.output_dir,
                       len(earlier))
        remove_run_outputs(earlier)
    return inputs


def stage_inputs(stage: StageConfig) -> StageInputs:
    """Read and validate one stage's data, evaluation data and rewards."""
    where = f"stages[{stage.name}]"
    _check_device(stage, where)
    processes().per_rank(stage.optim.batch_size, f"{where}.optim.batch_size")  # GRPO: whole groups per rank
    if stage.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{where}.logging.wandb_project: logging to Weights & Biases needs the wandb package: "
                          "pip install 'vlreason[wandb]' (or set logging.wandb_project=null)")
    if stage.optim.deepspeed:
        read_deepspeed_file(stage.optim.deepspeed, f"{where}.optim.deepspeed")
    data = read_jsonl(stage.data.train, stage.data.on_bad_sample)
    _check_video(stage, data.video_sources, f"{where}.data.train")
    samples = data.samples[: stage.data.max_samples]
    if stage.data.eval:
        evaluation = read_jsonl(stage.data.eval)
        _check_video(stage, evaluation.video_sources, f"{where}.data.eval")
        _check_eval_metrics(stage, evaluation.samples, where)
    agent = build_agent(stage.agent.mode.value, stage.agent.tools, stage.agent.grounding_prompt)
    check_engine(stage.rollout.engine, stage.rollout.engine_options, f"{where}.rollout")
    _check_memory_window(stage, where)
    rewards: dict[str, RewardFn] = {}
    if stage.kind is StageKind.SFT:
        _check_responses(samples)
    else:
        rewards = {name: get_reward(spec.fn or name, **spec.options) for name, spec in stage.rewards.items()}
        check_columns(rewards, data.columns, stage.data.train, samples)
        if stage.algorithm.temporal_reward is not None and not data.video_sources:
            raise ConfigError(f"{where}.algorithm.temporal_reward: T-GRPO contrasts ordered with shuffled frames, and "
                              f"{stage.data.train} has no videos; remove algorithm.temporal_reward for image data")
    return StageInputs(samples=samples, columns=data.columns, rewards=rewards, agent=agent)


def check_engine(spec: str, options: dict[str, Any], where: str) -> None:
    """The rollout engine resolves, takes ``options`` (checked against its signature, before any
    model loads) and, when it has a ``preflight(**options)`` check (vLLM: installed and matching
    transformers, or its rollout server answering), passes it.

    Raises:
        PluginError: no engine by that name; ConfigError: options it does not take or lacks;
        whatever its own check raises.
    """
    engine = ENGINES.resolve(spec)
    try:
        inspect.signature(engine).bind(None, **options)  # the first argument is the model bundle
    except TypeError as exc:
        accepted = [p for p in list(inspect.signature(engine).parameters)[1:]]
        raise ConfigError(f"{where}.engine_options: {exc} for engine {spec!r} (it takes: "
                          f"{', '.join(accepted) or 'no options'})") from None
    check = getattr(engine, "preflight", None)
    if check is not None:
        check(**options)


def fit_length(vlm: VLM, samples: list[Sample], stage: StageConfig, tools: Sequence[dict[str, Any]] | None = None,
               reader: ClipReader | None = None) -> list[Sample]:
    """The samples within ``data.max_tokens`` (the prompt for GRPO, the whole conversation for
    SFT, image and video tokens and the ``tools`` schemas of the system prompt counted; each video
    is probed, not decoded, with ``reader``, which data with videos needs); longer ones, and ones
    whose videos cannot be opened, stop the run or are skipped per ``data.on_bad_sample``."""
    limit = stage.data.max_tokens
    if limit is None:
        return samples
    whole = stage.kind is StageKind.SFT
    conversations = [s.messages if whole else s.prompt_messages for s in samples]
    videos, problems = _video_prompts(vlm, samples, reader)
    lengths = vlm.token_counts(conversations, [s.image_sizes for s in samples], add_generation_prompt=not whole,
                               tools=tools, videos=videos)
    for index, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
        if n > limit and index not in problems:
            problems[index] = DataProblem(
                *_file_and_line(sample.source), "messages" if whole else "prompt",
                f"{n} tokens (images and videos included) exceed data.max_tokens={limit}; shorten the sample, lower "
                "model.max_pixels (video.max_pixels, video.max_frames), or raise data.max_tokens")
    if not problems:
        return samples
    if stage.data.on_bad_sample is OnBadSample.ERROR:
        raise DataError(list(problems.values()))
    for problem in list(problems.values())[:10]:
        logger.warning("skipped: %s", problem)
    logger.warning("skipped %d sample(s) longer than data.max_tokens=%d or with videos that cannot be opened",
                   len(problems), limit)
    kept = [sample for index, sample in enumerate(samples) if index not in problems]
    if not kept:
        raise ValueError(f"every sample of {stage.data.train} is longer than data.max_tokens={limit} or has videos "
                         "that cannot be opened")
    return kept


def _video_prompts(vlm: VLM, samples: list[Sample], reader: ClipReader | None
                   ) -> tuple[list[list[VideoPrompt]], dict[int, DataProblem]]:
    """Each sample's videos as ``VLM.video_prompt`` sees them (probed), and the problems of the
    samples with a video that cannot be opened (by sample index; their list is empty)."""
    videos: list[list[VideoPrompt]] = []
    problems: dict[int, DataProblem] = {}
    for index, sample in enumerate(samples):
        try:
            videos.append([vlm.video_prompt(path, reader) for path in sample.videos])
        except VideoError as exc:
            videos.append([])
            problems[index] = DataProblem(*_file_and_line(sample.source), "videos", str(exc))
    return videos, problems


def stage_finished(stage: StageConfig) -> bool:
    """Whether the stage trained to its budget in an earlier run (its ``final`` model exists and
    its record reaches ``optim.max_steps``, or it stopped on ``optim.time_budget_s``)."""
    record = read_stage_record(stage.output_dir)
    if record is None or not Path(final_checkpoint(stage.output_dir)).is_dir():
        return False
    budget = stage.optim.time_budget_s
    return record["steps"] >= stage.optim.max_steps or (budget is not None and record["seconds"] >= budget)


def _earlier_run_error(config: PipelineConfig, found: list[Path]) -> ConfigError:
    shown = ", ".join(str(p) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return ConfigError(f"output_dir {config.output_dir} holds an earlier run ({shown}). Continue it with --resume, "
                       "start it over with --overwrite (deletes its checkpoints, logs and models), or choose another "
                       "output_dir.")


def _check_no_stale_stages(config: PipelineConfig) -> None:
    """Resuming must not continue a stage after an earlier one trains further: it was trained
    from the earlier stage's old model."""
    pending = [i for i, stage in enumerate(config.stages) if _trains_further(stage)]
    if not pending:
        return
    first = config.stages[pending[0]]
    for later in config.stages[pending[0] + 1:]:
        if stage_outputs(Path(later.output_dir)):
            raise ConfigError(
                f"resume: stage {first.name} will train further, but stage {later.name} already has outputs in "
                f"{later.output_dir}, trained from {first.name}'s earlier model. Move that folder away (or delete "
                f"it) so {later.name} trains again from the new model, then resume.")


def _trains_further(stage: StageConfig) -> bool:
    """Whether resuming will change the stage's model (a checkpoint at ``max_steps`` without a
    ``final`` model, left by a kill between the two, only needs the final model written)."""
    if stage_finished(stage):
        return False
    saved = checkpoints(stage.output_dir)
    return not saved or checkpoint_step(saved[-1]) < stage.optim.max_steps


def _check_device(stage: StageConfig, where: str) -> None:
    """The stage's device exists here, and the stage can run on it in its dtype."""
    try:
        device = resolve_device(stage.model.device)
    except ValueError as exc:
        raise ConfigError(f"{where}.model.device: {exc}") from None
    if processes().distributed and device.index is not None:
        raise ConfigError(f"{where}.model.device: with several processes each one uses its own GPU (LOCAL_RANK); "
                          "set model.device=auto (or cuda), and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if stage.kind is not StageKind.SFT:
        return
    if device.type == "cuda" and (device.index or 0) > 0:
        raise ConfigError(f"{where}.model.device: SFT trains on the first visible GPU (transformers' Trainer "
                          f"places the model); to use GPU {device.index}, run with CUDA_VISIBLE_DEVICES={device.index} "
                          "and model.device=cuda")
    if device.type == "cpu" and stage.model.dtype == "float16":
        raise ConfigError(f"{where}.model.dtype: float16 training needs a GPU; use bfloat16 or float32 on the CPU")


def _check_video(stage: StageConfig, sources: list[str], key: str) -> None:
    """For data with videos (``sources``: their samples' ``file:line``): the ``video`` settings
    are valid, their decoder is installed, and the rollout engine reads video (the HF engine)."""
    if not sources:
        return
    stage.video.sampling()
    installed = video_backends.available()
    wanted = stage.video.backend
    if not installed or (wanted is not None and wanted not in installed):
        need = f"the video decoder {wanted!r}" if wanted else "a video decoder"
        raise ConfigError(f"{key}: {len(sources)} sample(s) have videos (first: {sources[0]}) and {need} is not "
                          f"installed (installed: {', '.join(installed) or 'none'}): pip install 'vlreason[video]'"
                          + (" or change video.backend" if wanted else ""))
    if stage.kind is not StageKind.SFT and not getattr(ENGINES.resolve(stage.rollout.engine), "takes_video", False):
        raise ConfigError(f"{key}: {len(sources)} sample(s) have videos (first: {sources[0]}); the rollout engine "
                          f"{stage.rollout.engine!r} takes images only: set rollout.engine=hf for video data")


def _check_eval_metrics(stage: StageConfig, samples: list[Sample], where: str) -> None:
    """The chosen evaluation metrics parse, resolve and find their ground truth in ``data.eval``."""
    if not stage.data.eval_metrics:
        return
    try:
        metric_rewards(samples, str(stage.data.eval), metric_spec(stage.data.eval_metrics))
    except (ValueError, PluginError) as exc:
        raise ConfigError(f"{where}.data.eval_metrics: {exc}") from None


def _check_memory_window(stage: StageConfig, where: str) -> None:
    """The visual memory window hides tokens: the rollout engine must be able to, and a training
    forward that checkpoints activations runs a 4-D attention mask (SDPA or eager attention)."""
    if stage.agent.memory_window is None or stage.kind is StageKind.SFT:
        return
    if not getattr(ENGINES.resolve(stage.rollout.engine), "hides_tokens", False):
        raise ConfigError(f"{where}.agent.memory_window: the rollout engine {stage.rollout.engine!r} cannot take "
                          "images out of view; set rollout.engine=hf, or agent.memory_window=null")
    attention = stage.model.attn_implementation
    if stage.optim.gradient_checkpointing and attention not in (None, "sdpa", "eager"):
        raise ConfigError(f"{where}.agent.memory_window with optim.gradient_checkpointing needs "
                          f"model.attn_implementation sdpa or eager, not {attention}")


def _check_responses(samples: list[Sample]) -> None:
    missing = [s.source for s in samples if s.response is None]
    if missing:
        raise ValueError(f"SFT needs a reference response in every sample; {len(missing)} have none "
                         f"(first: {missing[0]}). Add 'response' (or a final assistant message).")


def _file_and_line(source: str) -> tuple[str, int]:
    path, _, line = source.rpartition(":")
    return path, int(line)
