"""prunescope: prune PyTorch / Hugging Face models and look inside them.

Submodules are imported lazily by their users; importing the package itself is cheap and has no
side effects.
"""

__version__ = "0.1.0"
