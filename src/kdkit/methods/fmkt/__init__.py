"""FM-KT / OFM-KT: flow-matching knowledge transfer (schedules, meta-encoders, bridges, losses, the method).

Shao et al., "Precise Knowledge Transfer via Flow Matching" (arXiv 2402.02012).

* :mod:`~kdkit.methods.fmkt.bridge` -- the ``flow`` bridge (logit variant, deployed chain);
* :mod:`~kdkit.methods.fmkt.feature` -- the ``flow_feature`` bridge (feature variant, rewrites its tap);
* :mod:`~kdkit.methods.fmkt.losses` -- ``fmkt``, ``ofmkt``; :mod:`~kdkit.methods.fmkt.feature_loss` -- ``fmkt_feature``;
* :mod:`~kdkit.methods.fmkt.costs` -- what the deployed chains cost; :mod:`~kdkit.methods.fmkt.method` -- the method.
"""

from kdkit.methods.fmkt import feature_loss, losses  # noqa: F401 - register the losses
from kdkit.methods.fmkt.bridge import FlowBridge, FlowEstimates, flow_bridge
from kdkit.methods.fmkt.encoders import TimeEmbedding, build_encoder, sinusoidal
from kdkit.methods.fmkt.feature import FeatureFlow, FeatureFlowBridge, flow_feature_bridge
from kdkit.methods.fmkt.method import FmktMethod
from kdkit.methods.fmkt.schedules import SCHEDULES, Schedule, get_schedule

__all__ = ["SCHEDULES", "FeatureFlow", "FeatureFlowBridge", "FlowBridge", "FlowEstimates", "FmktMethod", "Schedule",
           "TimeEmbedding", "build_encoder", "flow_bridge", "flow_feature_bridge", "get_schedule", "sinusoidal"]
