from enum import Enum

class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"

def __getattr__(name):
    raise AttributeError(f"torchvision stub: transforms.functional.{name} is not available")
