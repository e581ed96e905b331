"""Style embedding of Complete The Look (Kang et al., CVPR 2019).

Importing this package does not import torch: the numpy distances (`style_model.distances`) are used
by the ranker, whose image has no torch. Modules that need torch import it themselves.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
