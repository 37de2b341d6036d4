"""dfqkit.data: offline datasets (MNIST-5k, digits, photo crops) and real eval sets (CIFAR, ImageNet
folder, unlabelled images).

Every factory returns an :class:`EvalData` and is gin-registered under ``dfqkit.data``, so a
recipe says ``train.data = @data.mnist5k()``.
"""

from dfqkit.data.cifar import cifar
from dfqkit.data.digits import digits
from dfqkit.data.eval_data import EvalData, TensorImageDataset
from dfqkit.data.imagenet_folder import imagenet_folder, timm_data_config, timm_imagenet_folder
from dfqkit.data.mnist5k import mnist5k
from dfqkit.data.photo_crops import photo_crops
from dfqkit.data.saved import save_eval_data, saved
from dfqkit.data.synthetic import synthetic
from dfqkit.data.teacher_labels import label_with_teacher, unlabelled_folder

__all__ = [
    "EvalData",
    "TensorImageDataset",
    "cifar",
    "digits",
    "imagenet_folder",
    "label_with_teacher",
    "mnist5k",
    "photo_crops",
    "save_eval_data",
    "saved",
    "synthetic",
    "timm_data_config",
    "timm_imagenet_folder",
    "unlabelled_folder",
]
