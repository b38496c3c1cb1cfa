"""Training options and the papers' recipes.

Every option left at ``None`` is filled from a recipe: ``levit`` (the official LeViT
``main.py`` defaults), ``cvt`` (the official CvT experiment configs), ``tiny`` (light
defaults that train a small dataset such as the built-in digits in minutes on a laptop
CPU) or ``finetune`` (starting from weights: a small learning rate, light augmentation).
``auto`` picks ``finetune`` when weights are given (``--pretrained``, ``--finetune``), else
``tiny`` for datasets under 20,000 training images, else the model family's recipe. Where the official code differs from its own argument defaults, the recipe
follows what the code does (see ``docs/recipes.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checks import check_output_folder, check_range

if TYPE_CHECKING:
    from ..data.sources import DataSpec

# Shared by the LeViT main.py and the CvT yaml files (both built on DeiT's recipe).
_DEIT = dict(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.25, mixup=0.8, cutmix=1.0,
             smoothing=0.1, hflip=0.5, scale=(0.08, 1.0), warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=5,
             cooldown_epochs=0, lr_step="epoch", model_ema_decay=0.99996)

RECIPES: dict[str, dict[str, Any]] = {
    # lr is per 512 images: the learning rate used is lr * global batch / 512 (LeViT main.py's rule).
    "levit": dict(_DEIT, epochs=1000, batch_size=256, lr=5e-4, weight_decay=0.025, repeated_aug=True,
                  clip_grad=0.01, clip_mode="agc", distillation="hard", model_ema=True),
    # CvT: 2.5e-4 per GPU at 256 images (CvT-13), 1.25e-4 at 128 (CvT-21, W24), times 8 GPUs: 5e-4 per 512.
    "cvt": dict(_DEIT, epochs=300, batch_size=256, lr=5e-4, weight_decay=0.05, repeated_aug=False,
                clip_grad=None, clip_mode="norm", distillation="none", model_ema=False),
    # DeiT (the grafting experiment, LeViT paper section 3): its main.py defaults, hard distillation with a teacher.
    "deit": dict(_DEIT, epochs=300, batch_size=128, lr=5e-4, weight_decay=0.05, repeated_aug=True, clip_grad=None,
                 clip_mode="norm", distillation="hard", model_ema=True),
    # Fine-tuning published or earlier weights on a small dataset: 1e-4 at batch 32, a light augmentation,
    # no teacher; the model's own input size.
    "finetune": dict(epochs=30, batch_size=32, lr=1.6e-3, weight_decay=0.05, warmup_epochs=1, warmup_lr=1e-6,
                     min_lr=1e-6, cooldown_epochs=0, lr_step="update", auto_augment=None, color_jitter=0.0, reprob=0.0,
                     mixup=0.0, cutmix=0.0, smoothing=0.1, hflip=0.5, scale=(0.5, 1.0), repeated_aug=False,
                     clip_grad=None, clip_mode="norm", distillation="none", model_ema=False, model_ema_decay=0.9998),
    "tiny": dict(epochs=30, batch_size=64, lr=8e-3, weight_decay=0.025, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5,
                 cooldown_epochs=0, lr_step="update", auto_augment=None, color_jitter=0.0, reprob=0.0, mixup=0.0,
                 cutmix=0.0, smoothing=0.1, hflip=0.0, scale=(0.75, 1.0), repeated_aug=False, clip_grad=None,
                 clip_mode="norm", distillation="hard", input_size=64, model_ema=False, model_ema_decay=0.9998),
}
# Per-variant differences of the official CvT configs (cvt-21-224x224.yaml, cvt-w24-384x384.yaml).
_CVT_VARIANTS = {"cvt_21": dict(weight_decay=0.1, batch_size=128, repeated_aug=True),
                 "cvt_w24": dict(weight_decay=0.1, batch_size=128)}
TINY_DATASET = 20_000
CHOICES = {"amp": ("auto", "bf16", "fp16", "none"), "device": ("auto", "cpu", "cuda"),
           "clip_mode": ("norm", "value", "agc"), "distillation": ("hard", "soft", "none"),
           "lr_step": ("epoch", "update"), "resume": ("no", "yes", "auto"),
           "tracker": ("tensorboard", "mlflow", "wandb")}


# What each numeric option may be (check_range's bounds), checked as given, before any recipe
# fills or scales it: an error then names the user's own value.
RANGES: dict[str, dict[str, Any]] = {
    "epochs": dict(low=1), "cooldown_epochs": dict(low=0), "batch_size": dict(low=1), "lr": dict(low=0, low_open=True),
    "weight_decay": dict(low=0), "warmup_epochs": dict(low=0), "warmup_lr": dict(low=0), "min_lr": dict(low=0),
    "input_size": dict(low=1), "input_width": dict(low=1), "workers": dict(low=0), "progress_interval": dict(low=0),
    "smoothing": dict(low=0, high=1, high_open=True), "color_jitter": dict(low=0), "reprob": dict(low=0, high=1),
    "mixup": dict(low=0), "cutmix": dict(low=0), "hflip": dict(low=0, high=1),
    "drop_path": dict(low=0, high=1, high_open=True), "clip_grad": dict(low=0, low_open=True),
    "model_ema_decay": dict(low=0, high=1), "distillation_tau": dict(low=0, low_open=True),
    "val_split": dict(low=0, high=1, low_open=True, high_open=True), "layer_decay": dict(low=0, high=1, low_open=True),
    "grad_accum_steps": dict(low=1), "early_stop": dict(low=1), "threshold": dict(low=0, high=1, low_open=True, high_open=True),
}


def check_choice(option: str, value: str | None) -> None:
    """``ValueError`` naming the valid values of ``option`` (a one-line CLI error, not a traceback)."""
    choices = CHOICES[option]
    valid = value is None or value in choices or (option == "device" and value.startswith("cuda:"))
    if not valid:
        raise ValueError(f"--{option.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")


def input_hw(height: int | None, width: int | None) -> tuple[int, int] | None:
    """``--input-size`` and ``--input-width`` as ``(height, width)``, ``None`` when neither is given."""
    if width is not None and height is None:
        raise ValueError(f"--input-width {width} needs --input-size (the height)")
    return None if height is None else (height, height if width is None else width)


@dataclass
class TrainConfig:
    """Everything ``hybridvit train`` accepts; ``None`` means "from the recipe"."""

    model: str = field(default="levit_128s", metadata={"help": "registered model name"})
    model_args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "model config options as JSON, e.g. '{\"ablation\": \"A3\"}' or '{\"resnet_stages\": 2}'"})
    data: str | None = field(default=None, metadata={"help": (
        "training images: an ImageNet-layout folder (ROOT/train, ROOT/val), a folder of class folders, a "
        "CSV/TSV/Parquet manifest of paths and labels, a Hugging Face dataset (save_to_disk folder or Parquet "
        "shards), WebDataset shards (train-{000..099}.tar, local or http://); default: built-in digits")})
    val_data: str | None = field(default=None, metadata={"help": "validation images, in any of --data's layouts "
                                                           "(default: the data's own validation split)"})
    val_split: float | None = field(default=None, metadata={"help": (
        "hold out this fraction of each class for validation (seeded by --seed; written to OUTPUT/val_split.json "
        "so that --resume and eval use the same split)")})
    path_column: str | None = field(default=None, metadata={"help": "manifests and tables: the column of image "
                                                              "paths (or bytes); default: path, image, file, ..."})
    label_column: str | None = field(default=None, metadata={"help": "manifests and tables: the column of labels; "
                                                               "default: label, class, target, ..."})
    multi_label: bool = field(default=False, metadata={"help": (
        "several labels per image ('a;b' cells or list columns): sigmoid outputs and binary cross-entropy; "
        "validation reports mAP and F1 at --threshold")})
    threshold: float = field(default=0.5, metadata={"help": "--multi-label: the probability from which a label "
                                                            "counts as predicted (F1; predict and serve keep it)"})
    output: str | None = field(default=None, metadata={"help": "run folder (default runs/<model>-<data>)"})
    recipe: str = field(default="auto", metadata={"help": "auto, levit, cvt, deit, tiny or finetune"})
    epochs: int | None = field(default=None, metadata={"help": "epochs of the cosine schedule"})
    cooldown_epochs: int | None = field(default=None, metadata={"help": "extra epochs at --min-lr after the cosine"})
    batch_size: int | None = field(default=None, metadata={"help": "images per process"})
    lr: float | None = field(default=None, metadata={"help": "learning rate per 512 images (scaled by the global batch)"})
    lr_step: str | None = field(default=None, metadata={"help": "epoch (official: lr fixed within an epoch) or update"})
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    warmup_lr: float | None = None
    min_lr: float | None = None
    input_size: int | None = field(default=None, metadata={"help": "training/eval resolution (default: the model's)"})
    input_width: int | None = field(default=None, metadata={"help": "width, when it differs from --input-size"})
    workers: int | None = field(default=None, metadata={
        "help": "data loading processes per training process (default: from the cores, at most 8)"})
    smoothing: float | None = None
    auto_augment: str | None = field(default=None, metadata={"help": "timm RandAugment spec, or 'none'"})
    color_jitter: float | None = field(default=None, metadata={"help": "ignored when RandAugment is on (as in timm)"})
    reprob: float | None = field(default=None, metadata={"help": "random erasing probability"})
    mixup: float | None = None
    cutmix: float | None = None
    hflip: float | None = None
    repeated_aug: bool | None = None
    drop_path: float | None = field(default=None, metadata={"help": "default: the model's (paper) rate"})
    clip_grad: float | None = None
    clip_mode: str | None = field(default=None, metadata={"help": "norm, value or agc"})
    model_ema: bool | None = field(default=None, metadata={"help": "keep an EMA of the weights (written to OUTPUT/ema)"})
    model_ema_decay: float | None = None
    teacher: str | None = field(default=None, metadata={"help": "teacher: timm or hybridvit model name, or a model/run folder"})
    teacher_checkpoint: str | None = field(default=None, metadata={"help": "weights for a named teacher"})
    teacher_pretrained: bool = field(default=False, metadata={"help": "download a named teacher's published weights"})
    distillation: str | None = field(default=None, metadata={"help": "hard, soft or none (used when a teacher is given)"})
    distillation_tau: float = 1.0
    amp: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPU; on CPU bf16 where a measured training step is faster), bf16, fp16 or none"})
    channels_last: bool | None = field(default=None, metadata={
        "help": "images and convolution weights in NHWC memory layout (default: where a measured step is faster)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training model (pays off on long runs)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    seed: int = 0
    resume: str = field(default="no", metadata={
        "help": "yes (bare --resume): continue from OUTPUT/checkpoint.pt; auto: continue if it exists, else start"})
    pretrained: bool = field(default=False, metadata={"help": "start from --model's published weights"})
    pretrained_tag: str | None = field(default=None, metadata={"help": "which published weights (see `hybridvit "
                                                                "models`; default: the first)"})
    finetune: str | None = field(default=None, metadata={
        "help": "start from these weights: a model or run folder, checkpoint file (any supported format), "
                "hf-hub:ORG/NAME, or a model name with --pretrained (their classifier when the number of classes "
                "matches, else a new one)"})
    layer_decay: float | None = field(default=None, metadata={
        "help": "layer-wise learning-rate decay: each block's rate is this times the next one's (stem lowest)"})
    freeze: str | None = field(default=None, metadata={
        "help": "train only part of the model: 'head' (the classifier), or N (the last N stages and the head)"})
    grad_accum_steps: int = field(default=1, metadata={
        "help": "batches per optimizer step (the learning rate follows the effective batch)"})
    early_stop: int | None = field(default=None, metadata={
        "help": "stop after this many epochs without a better validation top-1 (its best weights are in OUTPUT/best)"})
    class_weights: str | None = field(default=None, metadata={
        "help": "weigh the loss per class: auto (inverse class frequency) or a file of weights (JSON list or one "
                "per line, in class order)"})
    balanced_sampler: bool = field(default=False, metadata={
        "help": "draw training images with replacement, each class equally often"})
    tracker: str = field(default="tensorboard", metadata={"help": "tensorboard, mlflow or wandb (offline)"})
    tracker_uri: str | None = field(default=None, metadata={
        "help": "mlflow: tracking URI (default: sqlite:///OUTPUT/../mlflow.db, artifacts in OUTPUT/../mlartifacts); "
                "wandb: the folder of its offline runs (default: OUTPUT)"})
    progress_interval: float = field(default=1.0, metadata={
        "help": "seconds between progress.json updates within an epoch (0: every step)"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh in an OUTPUT that holds a run (its weights, metrics and curves are replaced)"})
    scale: tuple[float, float] | None = None
    jpeg_draft: bool = field(default=True, metadata={
        "help": "decode a training JPEG at 1/2 to 1/8 scale when its crop is that many times the input size"})

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):  # the Python API's resume=True / False
            self.resume = "yes" if self.resume else "no"
        for option in ("amp", "device", "clip_mode", "distillation", "lr_step", "resume", "tracker"):
            check_choice(option, getattr(self, option))
        for option, bounds in RANGES.items():
            check_range(option, getattr(self, option), **bounds)
        input_hw(self.input_size, self.input_width)
        if self.resume != "no" and self.overwrite:
            raise ValueError("--overwrite starts afresh and --resume continues: give one of them")
        if self.freeze is not None and self.freeze != "head" and not (self.freeze.isdigit() and int(self.freeze) > 0):
            raise ValueError(f"--freeze must be 'head' or a number of last stages to train (1, 2, ...); got {self.freeze!r}")
        if self.pretrained_tag is not None and not self.pretrained:
            raise ValueError("--pretrained-tag goes with --pretrained")
        if self.multi_label:
            for option, value in (("mixup", self.mixup), ("cutmix", self.cutmix)):
                if value:
                    raise ValueError(f"--{option} mixes one label per image: not with --multi-label")
            if self.teacher is not None or self.balanced_sampler:
                raise ValueError("--multi-label trains without a teacher or --balanced-sampler (one label per image)")

    @property
    def starts_from_weights(self) -> bool:
        return self.pretrained or self.finetune is not None

    @property
    def data_spec(self) -> "DataSpec":
        """Where the images are and how to read them."""
        from ..data.sources import DataSpec  # imports torch: not at the command line's start

        return DataSpec(self.data, self.val_data, self.val_split, self.path_column, self.label_column, self.seed,
                        self.multi_label)

    def check_output(self, output: Path) -> None:
        """Before any work: ``output`` can hold the run, and a run already there is not replaced
        unless ``resume`` continues it or ``overwrite`` says so."""
        check_output_folder(output)
        if self.resume != "no" or self.overwrite:
            return
        if (output / "model").exists():
            held = "a finished run"
        elif (output / "checkpoint.pt").exists():
            held = "an unfinished run"
        else:
            return
        raise FileExistsError(f"{output} holds {held}: add --resume to continue it, --overwrite to replace it, "
                              f"or choose another --output")

    def resolved(self, num_train_images: int, family_recipe: str) -> "TrainConfig":
        """A copy with every ``None`` recipe option filled in (``family_recipe``: the model's paper recipe)."""
        name = self.recipe
        if name == "auto":
            name = "finetune" if self.starts_from_weights else "tiny" if num_train_images < TINY_DATASET \
                else family_recipe
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose auto, {', '.join(RECIPES)}")
        recipe = dict(RECIPES[name])
        if name == "cvt":
            recipe.update(_CVT_VARIANTS.get(self.model, {}))
        if self.multi_label:  # Mixup and CutMix mix one label per image
            recipe.update(mixup=0.0, cutmix=0.0)
        changes = {k: v for k, v in recipe.items() if getattr(self, k, None) is None}
        out = dataclasses.replace(self, recipe=name, **changes)
        if out.auto_augment == "none":
            out.auto_augment = None
        return out
