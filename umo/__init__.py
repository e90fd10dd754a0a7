"""umo: multi-identity consistency for image customization via the matching reward (UMO)."""

__version__ = "0.1.0"
