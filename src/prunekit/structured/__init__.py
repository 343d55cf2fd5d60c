"""Structured pruning: physically remove channels, neurons and attention heads.

`trace` exports the model to an ATen graph, `analyze` finds coupled channel groups with the
op-rule table (`ops/`), `select` scores and picks units, and `ChannelPlan` removes them
atomically through per-layer handlers (`layers.py`). `prunekit.plan(model, ChannelConfig(...),
example_inputs)` drives all of it. Language models have their own units: whole decoder blocks
(`DepthConfig`) and heads, FFN neurons and hidden channels (`WidthConfig`); state-space models
the inner channels of their Mamba blocks (`StateSpaceConfig`); mixture-of-experts models whole
experts and per-expert FFN neurons (`ExpertConfig`); `LowRankConfig` replaces a
layer by two thinner ones.
"""

from __future__ import annotations

from prunekit._moved import moved_name
from prunekit.structured.config import ChannelConfig
from prunekit.structured.depth import DepthConfig, block_influence
from prunekit.structured.groups import DependencyGraph, Group, analyze
from prunekit.structured.layers import get_layer_handler, list_layer_handlers, register_layer_handler
from prunekit.structured.llm import LLMPlan
from prunekit.structured.lowrank import LowRankConfig, LowRankPlan
from prunekit.structured.mha import PrunedMultiheadAttention
from prunekit.structured.moe import ExpertConfig
from prunekit.structured.moe_routing import expert_importance
from prunekit.structured.ops import get_op_rule, list_op_rules, register_op_rule
from prunekit.structured.plan import ChannelPlan, plan_channels
from prunekit.structured.select import (
    bn_scale_penalty,
    get_group_criterion,
    list_group_criteria,
    register_group_criterion,
)
from prunekit.structured.ssm import StateSpaceConfig, ssm_channel_importance
from prunekit.structured.trace import TracedModel, trace
from prunekit.structured.width import WidthConfig


def __getattr__(name: str) -> object:  # prune_iteratively moved to prunekit.train (0.1 path, warns)
    return moved_name(__name__, name)


__all__ = [
    "ChannelConfig",
    "ChannelPlan",
    "DepthConfig",
    "LLMPlan",
    "LowRankConfig",
    "LowRankPlan",
    "WidthConfig",
    "block_influence",
    "DependencyGraph",
    "Group",
    "PrunedMultiheadAttention",
    "TracedModel",
    "analyze",
    "bn_scale_penalty",
    "get_group_criterion",
    "get_layer_handler",
    "get_op_rule",
    "list_group_criteria",
    "list_layer_handlers",
    "list_op_rules",
    "plan_channels",
    "register_group_criterion",
    "register_layer_handler",
    "register_op_rule",
    "StateSpaceConfig",
    "ExpertConfig",
    "expert_importance",
    "ssm_channel_importance",
    "trace",
]
