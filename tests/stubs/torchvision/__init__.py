"""Minimal torchvision stub: just enough for `import timm` / `import open_clip` and model construction.
Image transforms / datasets are placeholders that raise if instantiated."""
__version__ = "0.0.0+stub"
from . import ops, transforms, datasets  # noqa: F401
