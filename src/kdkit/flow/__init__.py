"""FM-KT / OFM-KT: flow-matching knowledge transfer (schedules, meta-encoders, the ``flow`` and ``flow_feature``
bridges).

Shao et al., "Precise Knowledge Transfer via Flow Matching" (arXiv 2402.02012). The losses that train the
bridges are :mod:`kdkit.losses.fmkt` (``fmkt``, ``ofmkt``) and :mod:`kdkit.losses.fmkt_feature`.
"""

from kdkit.flow.bridge import FlowBridge, FlowEstimates, flow_bridge
from kdkit.flow.encoders import TimeEmbedding, build_encoder, sinusoidal
from kdkit.flow.feature import FeatureFlow, FeatureFlowBridge, flow_feature_bridge  # registers `flow_feature`
from kdkit.flow.schedules import SCHEDULES, Schedule, get_schedule

__all__ = ["SCHEDULES", "FeatureFlow", "FeatureFlowBridge", "FlowBridge", "FlowEstimates", "Schedule",
           "TimeEmbedding", "build_encoder", "flow_bridge", "flow_feature_bridge", "get_schedule", "sinusoidal"]
