"""dfqkit.models: teachers (offline zoo, pytorchcv-layout CIFAR ResNet-20, MobileNet v1,
ShuffleNet v1 and SqueezeNext, torchvision/timm adapters).

Importing this package registers every model factory under ``dfqkit.models`` (gin:
``@models.mnist_resnet()``).
"""

from dfqkit.models.architecture import Architecture, callable_model, find_architecture
from dfqkit.models.cifar_resnet20 import cifar_resnet20
from dfqkit.models.mnist_resnet import mnist_resnet
from dfqkit.models.mnist_vit import mnist_vit
from dfqkit.models.pytorchcv_imagenet import mobilenet_w1, shufflenet_g1_w1, sqnxt23_w2
from dfqkit.models.timm_model import timm_model
from dfqkit.models.torchvision_model import torchvision_model
from dfqkit.models.weights import load_weights, read_state_dict

__all__ = [
    "Architecture",
    "callable_model",
    "cifar_resnet20",
    "find_architecture",
    "load_weights",
    "mnist_resnet",
    "mnist_vit",
    "mobilenet_w1",
    "read_state_dict",
    "shufflenet_g1_w1",
    "sqnxt23_w2",
    "timm_model",
    "torchvision_model",
]
