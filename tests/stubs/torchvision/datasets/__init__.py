class _Unavailable:
    def __init__(self, *a, **k):
        raise RuntimeError(f"torchvision stub: datasets.{type(self).__name__} is not available")

class CIFAR10(_Unavailable): pass
class CIFAR100(_Unavailable): pass
class MNIST(_Unavailable): pass
class KMNIST(_Unavailable): pass
class FashionMNIST(_Unavailable): pass
class ImageFolder(_Unavailable): pass
