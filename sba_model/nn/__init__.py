"""SBA modules: the drop-in `SBAttention` layer, the `SBABlock`, the `SBATransformer`
forecasting model, and spatial sharding of a model over processes (`sba_model.nn.distributed`).
"""

from .layers import InterAttention, IntraAttention, SBABlock, SBAttention
from .model import SBATransformer

__all__ = ["IntraAttention", "InterAttention", "SBAttention", "SBABlock", "SBATransformer"]
