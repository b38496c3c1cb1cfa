"""Starting from weights: published ones (``--pretrained``) or any model a command line names
(``--finetune``), and training only part of the model (``--freeze``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..checkpoints import CheckpointError, load_checkpoint, load_state_dict, read_checkpoint
from ..checkpoints.formats import learnt_grids
from .config import TrainConfig

def load_starting_weights(cfg: TrainConfig, model: nn.Module) -> str | None:
    """Load the weights ``cfg`` starts from into ``model`` (built for the run's classes and input
    size); returns what was loaded, or None.

    The classifier comes too when its shape fits (as many classes); otherwise it keeps the
    model's own initialisation, as timm's ``reset_classifier`` gives a new head. Attention-bias
    tables and position embeddings learnt at another input size are resampled.
    """
    if not cfg.starts_from_weights:
        return None
    source = cfg.finetune or cfg.model
    if Path(source).is_file():  # a checkpoint file in any supported format (official, timm, Hugging Face, ours)
        weights = read_checkpoint(source)
        try:
            load_checkpoint(model, weights)
            return f"{source} (with its classifier)"
        except CheckpointError:
            load_checkpoint(model, weights, exclude_head=True)
            return f"{source} (a new classifier)"
    return _from_model(source, cfg, model)


def _from_model(source: str, cfg: TrainConfig, model: nn.Module) -> str:
    """Weights of anything ``load_source`` reads: a model or run folder, ``hf-hub:``, a published name."""
    from ..api import load_source

    loaded, _ = load_source(source, cfg.pretrained, cfg.pretrained_tag)
    if loaded.family != model.family:
        raise CheckpointError(f"{source} holds a {loaded.family} model; --model {cfg.model} is {model.family}")
    state, grids = loaded.state_dict(), learnt_grids(loaded.family, loaded.config)
    try:
        load_state_dict(model, state, source_grids=grids)
        return f"{source} (with its classifier)"
    except CheckpointError:
        load_state_dict(model, state, exclude_head=True, source_grids=grids)
        return f"{source} (a new classifier for {model.num_classes} classes)"


def freeze(model: nn.Module, spec: str | None) -> list[nn.Module]:
    """Stop training all but part of ``model``: ``head`` (the classifier), or ``N`` (the last N
    stages, the final norm and the classifier). Returns the frozen top-level parts, which also
    keep their BatchNorm statistics (the engine holds them in eval mode)."""
    if spec is None:
        return []
    heads = set(getattr(model, "head_names", ("head",)))
    stages = len(model.stages)
    if spec != "head" and int(spec) > stages:
        raise ValueError(f"--freeze {spec}: {model.model_name} has {stages} stages")
    trained = heads | {"norm"} | ({f"stages.{i}" for i in range(stages - int(spec), stages)} if spec != "head" else set())
    frozen = []
    for name, module in model.named_children():
        parts = [(f"{name}.{i}", m) for i, m in enumerate(module)] if name == "stages" else [(name, module)]
        for part, m in parts:
            if part not in trained:
                m.requires_grad_(False)
                frozen.append(m)
    return frozen
