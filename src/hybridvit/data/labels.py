"""Class labels of the ImageNet heads the published weights carry (the lists ship with timm)."""

from __future__ import annotations

# Head size -> timm's name for the label set (ImageNet-22k's Fall 2011 release; Google's 21k order).
_SUBSETS = {1000: "imagenet-1k", 21841: "imagenet-22k", 21843: "imagenet-21k-goog"}


def imagenet_labels(num_classes: int) -> tuple[list[str], list[str]] | None:
    """``(synsets, descriptions)`` of the ImageNet label set with ``num_classes`` classes, else None.

    The synsets (``n01440764``, ...) are the class folder names of an ImageNet-layout dataset;
    the descriptions (``tench, Tinca tinca``, ...) are what a prediction shows.
    """
    subset = _SUBSETS.get(num_classes)
    if subset is None:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo(subset)
    synsets = [info.index_to_label_name(i) for i in range(num_classes)]
    return synsets, [info.label_name_to_description(s) for s in synsets]
