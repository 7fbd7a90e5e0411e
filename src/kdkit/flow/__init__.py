"""FM-KT / OFM-KT: flow-matching knowledge transfer (schedules, meta-encoders, the ``flow`` bridge).

Shao et al., "Precise Knowledge Transfer via Flow Matching" (arXiv 2402.02012). The losses that train the
bridge are :mod:`kdkit.losses.fmkt` (``fmkt``, ``ofmkt``).
"""

from kdkit.flow.bridge import FlowBridge, FlowEstimates, flow_bridge
from kdkit.flow.encoders import TimeEmbedding, build_encoder, sinusoidal
from kdkit.flow.schedules import SCHEDULES, Schedule, get_schedule

__all__ = ["SCHEDULES", "FlowBridge", "FlowEstimates", "Schedule", "TimeEmbedding", "build_encoder",
           "flow_bridge", "get_schedule", "sinusoidal"]
