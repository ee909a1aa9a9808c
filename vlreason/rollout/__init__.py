"""Rollouts: engines sample model turns behind one protocol (``engine``); the agent loop turns
them into trajectories with tool calls and observations (``agent``)."""

from vlreason.rollout.agent import Agent, AgentLoop, GroundingAgent, Observation, ToolAgent
from vlreason.rollout.engine import (
    ENGINES,
    EngineSession,
    ModelTurn,
    PromptBatch,
    RolloutEngine,
    SamplingParams,
    StopReason,
    Trajectories,
    build_engine,
    encode_prompts,
)
from vlreason.rollout.hf import HFEngine
from vlreason.rollout.scripted import ScriptedEngine

__all__ = ["ENGINES", "Agent", "AgentLoop", "EngineSession", "GroundingAgent", "HFEngine", "ModelTurn", "Observation",
           "PromptBatch", "RolloutEngine", "SamplingParams", "ScriptedEngine", "StopReason", "ToolAgent",
           "Trajectories", "build_engine", "encode_prompts"]
