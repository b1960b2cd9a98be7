"""nn.Modules users put in their models."""

from .hyper_connection import HyperConnection, SiteCoefficients
from .mhc_layer import MHCLayer
from .rewire import MHCRewire

__all__ = ["HyperConnection", "SiteCoefficients", "MHCLayer", "MHCRewire"]
