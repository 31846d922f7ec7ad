"""Data: uint8 image tensors served by the batch, long-tailed splits and data sources.

``load_data("cifar10:PATH", imbalance=100)`` gives the long-tailed train, balanced val and
official test sets as :class:`ImageTensorDataset` objects; ``load_data("demo")`` is a small
Fashion-MNIST-LT subset shipped with the package. Any other ``(x, y)`` torch data set is
usable through :func:`as_tensor_dataset`. Image folders too large for memory are streamed
from disk by worker processes (:class:`StreamingImageDataset`). Semi-supervised splits
(labelled, unlabelled pool with hidden labels, validation) come from
:func:`semi_supervised_split`.
"""

from selmix.data.augment import (
    imagenet_eval_transform,
    imagenet_train_transform,
    normalize,
    random_crop_flip,
)
from selmix.data.image_folder import load_image_folder
from selmix.data.longtail import long_tail_counts, long_tail_split
from selmix.data.readers import read_idx
from selmix.data.semisup_split import (
    UNLABELLED_DISTRIBUTIONS,
    SemiSupervisedData,
    SemiSupervisedSplit,
    UnlabelledDataset,
    semi_supervised_data,
    semi_supervised_split,
    unlabelled_distribution,
)
from selmix.data.sources import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataSplits,
    load_cifar10,
    load_data,
    load_demo,
    load_fashion_mnist,
)
from selmix.data.streaming import StreamingImageDataset, WorkerPool, default_num_workers
from selmix.data.tensor_dataset import (
    DatasetAdapter,
    ImageTensorDataset,
    as_tensor_dataset,
    channel_stats,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "UNLABELLED_DISTRIBUTIONS",
    "DataSplits",
    "DatasetAdapter",
    "ImageTensorDataset",
    "SemiSupervisedData",
    "SemiSupervisedSplit",
    "StreamingImageDataset",
    "UnlabelledDataset",
    "WorkerPool",
    "as_tensor_dataset",
    "channel_stats",
    "default_num_workers",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "load_cifar10",
    "load_data",
    "load_demo",
    "load_fashion_mnist",
    "load_image_folder",
    "long_tail_counts",
    "long_tail_split",
    "normalize",
    "random_crop_flip",
    "read_idx",
    "semi_supervised_data",
    "semi_supervised_split",
    "unlabelled_distribution",
]
