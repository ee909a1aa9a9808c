"""Rollouts: engines sample model turns behind one protocol (``engine``); the agent loop turns
them into trajectories with tool calls and observations (``agent``)."""

from vlreason.rollout.agent import Agent, AgentLoop, GroundingAgent, Observation, ToolAgent
from vlreason.rollout.engine import (
    ENGINES,
    EncodedObservation,
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
from vlreason.rollout.vllm import VLLMEngine

__all__ = ["ENGINES", "Agent", "AgentLoop", "EncodedObservation", "EngineSession", "GroundingAgent", "HFEngine",
           "ModelTurn", "Observation", "PromptBatch", "RolloutEngine", "SamplingParams", "ScriptedEngine", "StopReason",
           "ToolAgent", "Trajectories", "VLLMEngine", "build_engine", "encode_prompts"]
