"""Publishing a model on the Hugging Face Hub: the folder, its model card, the upload.

``save_for_hub`` writes what ``push_to_hub`` uploads, so the folder can be inspected (or
uploaded by other means) first. Where the architecture maps, the folder is a transformers
folder (``from_pretrained`` reads it); otherwise it is hybridvit's own. Both load with
``hybridvit.load_model("hf-hub:ORG/NAME")``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .checkpoints import load_trained, save_model
from .checkpoints.errors import HubUnreachableError
from .checkpoints.hf_folder import save_transformers_folder
from .checkpoints.hub import unreachable_reason
from .checks import check_output_folder
from .figures import read_metrics
from .flops import count_macs, count_params
from .registry import architecture, get_model_info, list_models

_FIGURES = ("training_curve.png", "benchmark.png", "speed_accuracy.png")  # copied from a run folder when present


def _run_folder(source: Path) -> Path | None:
    """The training run a model folder belongs to (it holds ``train_config.json``), if any."""
    for folder in (source, source.parent):
        if (folder / "train_config.json").exists():
            return folder
    return None


_PAPERS = {"levit": "LeViT (Graham et al., ICCV 2021)", "cvt": "CvT (Wu et al., ICCV 2021)",
           "graft": "the LeViT paper's grafted ResNet-50/DeiT-S (Graham et al., ICCV 2021)"}
_TRAIN_KEYS = ("model", "model_args", "data", "recipe", "epochs", "batch_size", "lr", "weight_decay", "input_size",
               "teacher", "seed")
_METRICS = (("val_top1", "top-1 (%)"), ("val_top5", "top-5 (%)"), ("best_top1", "best top-1 (%)"), ("val_loss", "loss"))


def _macs(model: nn.Module) -> int:
    """MACs at the model's input size, counted on a twin built on the meta device: shapes only,
    where a real forward would take seconds (a 384x384 CvT)."""
    with torch.device("meta"):
        twin = type(model)(model.config)  # type: ignore[call-arg, attr-defined]
    return count_macs(twin)


def _model_section(model: nn.Module, extra: dict[str, Any]) -> list[str]:
    name = getattr(model, "model_name", None)
    info = get_model_info(name) if name in list_models() else None
    family = model.family  # type: ignore[attr-defined]
    variant = name or f"{family} (unregistered configuration)"
    ablation = getattr(model.config, "ablation", None)  # type: ignore[attr-defined]
    ours = architecture(model.config)  # type: ignore[attr-defined]
    changes = {k: v for k, v in ours.items() if info is not None and architecture(info.config).get(k) != v}
    h, w = model.input_hw  # type: ignore[attr-defined]
    classes = extra.get("class_names") or extra.get("classes") or []
    shown = f" ({', '.join(map(str, classes[:5]))}{', ...' if len(classes) > 5 else ''})" if classes else ""
    lines = [f"A {variant} image classifier from {_PAPERS.get(family, family)}, published with hybridvit.", "",
             "## Model", "", "| | |", "|---|---|",
             f"| architecture | {variant}{f', ablation {ablation}' if ablation else ''} |",
             *([f"| differs from {name} in | {', '.join(f'{k}={v}' for k, v in changes.items())} |"] if changes else []),
             f"| parameters | {count_params(model) / 1e6:.2f}M |",
             f"| multiply-adds | {_macs(model) / 1e6:,.0f}M at {h}x{w} |",
             f"| input | {h}x{w}, crop {extra.get('crop_pct', info.crop_pct if info else 'n/a')}, "
             f"mean {extra.get('mean', list(info.mean) if info else 'n/a')}, std {extra.get('std', list(info.std) if info else 'n/a')} |",
             f"| classes | {len(classes) or model.num_classes}{shown} |", ""]  # type: ignore[attr-defined]
    if info is not None and info.paper_top1 is not None:
        lines += [f"The paper reports {info.paper_top1}% ImageNet-1k top-1 for {name} (with its own recipe and data).", ""]
    return lines


def _use_section(repo_id: str, transformers_layout: bool) -> list[str]:
    lines = ["## Use", "", "```python", "import hybridvit", "", f'model = hybridvit.load_model("hf-hub:{repo_id}")', "```", ""]
    if transformers_layout:
        lines += ["The folder is also a transformers folder:", "", "```python",
                  "from transformers import AutoModelForImageClassification, AutoImageProcessor", "",
                  f'model = AutoModelForImageClassification.from_pretrained("{repo_id}")',
                  f'processor = AutoImageProcessor.from_pretrained("{repo_id}")', "```", ""]
    return lines


def _run_sections(run: Path) -> list[str]:
    """The run's settings (``train_config.json``) and its last epoch's metrics."""
    lines = []
    train = json.loads((run / "train_config.json").read_text())
    train["data"] = train.get("data") or "the built-in digits (scikit-learn)"
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(train[k]) if isinstance(train[k], (dict, list)) else train[k]} |"
              for k in _TRAIN_KEYS if train.get(k) not in (None, {}, "")]
    lines += ["", "The full settings are in `train_config.json`.", ""]
    epochs = read_metrics(run) if (run / "metrics.jsonl").exists() else []
    if epochs:
        last = epochs[-1]
        lines += ["## Results", "", f"After epoch {last.get('epoch', 0) + 1} on the run's validation split:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {last[key]:.2f} |" for key, label in _METRICS if isinstance(last.get(key), (int, float))]
        lines.append("")
    return lines


def model_card(model: nn.Module, repo_id: str, extra: dict[str, Any], transformers_layout: bool,
               run: Path | None = None, figures: Sequence[str] = ()) -> str:
    """A README.md for the Hub: what the model is, how to load it, how it was trained and how it scored."""
    tags = ["image-classification", "hybridvit", model.family]  # type: ignore[attr-defined]
    lines = ["---", "library_name: hybridvit", "pipeline_tag: image-classification", "tags:", *(f"- {t}" for t in tags),
             "---", "", f"# {repo_id.split('/')[-1]}", ""]
    lines += _model_section(model, extra) + _use_section(repo_id, transformers_layout)
    if run is not None:
        lines += _run_sections(run)
    for figure in figures:
        lines += [f"![{figure.removesuffix('.png').replace('_', ' ')}]({figure})", ""]
    return "\n".join(lines)


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub accepts it as ``ORG/NAME`` (huggingface_hub's own rules), else a
    ``ValueError`` naming it: the id goes into the model card and the upload, so it is checked first."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"invalid Hub repository id {repo_id!r}: expected ORG/NAME of letters, digits, '-', '_' and '.' "
                         f"(not starting or ending with '-' or '.', no '--' or '..', at most 96 characters)")
    return repo_id


def save_for_hub(source: nn.Module | str | Path, folder: str | Path, repo_id: str = "ORG/NAME",
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the folder ``push_to_hub`` uploads: weights, config, class names, preprocessing and a model card.

    ``source``: a model, or a model folder, training run folder or ``checkpoint.pt`` (then the
    run's ``train_config.json``, last metrics and figures go into the card and the folder).
    The folder appears whole or not at all: it is written beside its place and moved there.
    """
    check_repo_id(repo_id)
    folder = check_output_folder(folder)
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; save_for_hub writes a new folder")
    if isinstance(source, nn.Module):
        model, stored, run = source, {}, None
    else:
        path = Path(source)
        model, stored = load_trained(path)
        run = _run_folder(path if path.is_dir() else path.parent)
    extra = {**stored, **(extra or {})}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp:
        staged = Path(tmp) / folder.name
        _write_hub_folder(model.eval(), staged, repo_id, extra, run)
        os.replace(staged, folder)  # onto an absent or empty folder
    return folder


def _write_hub_folder(model: nn.Module, folder: Path, repo_id: str, extra: dict[str, Any], run: Path | None) -> None:
    is_transformers = save_transformers_folder(model, folder, extra)
    if not is_transformers:
        save_model(model, folder, extra=extra)
    figures = []
    if run is not None:
        shutil.copy(run / "train_config.json", folder / "train_config.json")
        for name in _FIGURES:
            if (run / name).exists():
                shutil.copy(run / name, folder / name)
                figures.append(name)
    (folder / "README.md").write_text(model_card(model, repo_id, extra, is_transformers, run, figures))


def push_to_hub(source: nn.Module | str | Path, repo_id: str, private: bool = False, commit_message: str | None = None,
                token: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """Upload a model (or a model folder, training run or ``checkpoint.pt``) to the Hub repository
    ``repo_id``, creating it if needed; returns the commit's URL. ``HF_ENDPOINT`` picks the Hub.

    A Hub that cannot be reached is found before the folder is built (``HubUnreachableError``);
    a refused upload (no or a wrong token) is a ``PermissionError``; each is one line naming the repository.
    """
    from huggingface_hub import HfApi, constants

    check_repo_id(repo_id)
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if constants.is_offline_mode():
        raise HubUnreachableError(f"cannot push to {repo_id}: offline (HF_HUB_OFFLINE=1)")
    reason = unreachable_reason(endpoint)
    if reason is not None:
        raise HubUnreachableError(f"cannot push to {repo_id}: the Hugging Face Hub at {endpoint} cannot be reached ({reason})")
    api = HfApi(endpoint=endpoint, token=token, library_name="hybridvit")
    with tempfile.TemporaryDirectory(prefix="hybridvit-push-") as tmp:
        folder = save_for_hub(source, Path(tmp) / "folder", repo_id, extra)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder,
                                     commit_message=commit_message or "Upload with hybridvit")
        except Exception as e:
            error = _upload_error(e, repo_id, endpoint)
            if error is None:
                raise
            raise error from e
    return str(info.commit_url)


def _upload_error(error: Exception, repo_id: str, endpoint: str) -> Exception | None:
    """The one-line error for a failed upload (None: not an upload failure, a bug to show as it is)."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status in (401, 403):
            return PermissionError(f"the Hub at {endpoint} refused to push to {repo_id} (HTTP {status}): log in with "
                                   f"`hf auth login` or set HF_TOKEN to a token that may write there")
        answer = f"the Hub at {endpoint} answered HTTP {status} to the upload to {repo_id}: {str(error).splitlines()[0]}"
        return HubUnreachableError(answer) if status >= 500 else ValueError(answer)
    if isinstance(error, httpx2.TransportError):  # the connection failed or broke during the upload
        return HubUnreachableError(f"cannot push to {repo_id}: the Hugging Face Hub at {endpoint} cannot be reached "
                                   f"({type(error).__name__}: {error})")
    return None
