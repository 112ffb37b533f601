from .functional import InterpolationMode
from . import functional  # noqa: F401

class _Unavailable:
    def __init__(self, *a, **k):
        raise RuntimeError(f"torchvision stub: transforms.{type(self).__name__} is not available")

class Compose(_Unavailable): pass
class Normalize(_Unavailable): pass
class ToTensor(_Unavailable): pass
class Resize(_Unavailable): pass
class CenterCrop(_Unavailable): pass
class RandomResizedCrop(_Unavailable): pass
class ColorJitter(_Unavailable): pass
class Grayscale(_Unavailable): pass
