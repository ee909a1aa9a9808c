"""Rollout engines: sample G completions per prompt behind one protocol (``engine``)."""

from vlreason.rollout.engine import ENGINES, RolloutEngine, Rollouts, SamplingParams, build_engine
from vlreason.rollout.hf import HFEngine
from vlreason.rollout.scripted import ScriptedEngine

__all__ = ["ENGINES", "HFEngine", "RolloutEngine", "Rollouts", "SamplingParams", "ScriptedEngine", "build_engine"]
