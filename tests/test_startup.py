"""Start-up: ``import hybridvit``, the command line and listing the models load none of torch, timm and
torchvision (seconds each),
the layers defined here so that models need not import timm equal timm's, and the lazy exports."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import pytest
import timm.layers
import torch

import hybridvit
from hybridvit.layers import DropPath, LayerNorm2d, QuickGELU, trunc_normal_


def loaded_after(code: str) -> set[str]:
    """Which of torch, timm and torchvision a fresh interpreter has imported after ``code``."""
    probe = f"import sys\n{code}\nimport json; print(json.dumps([m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_import_and_command_line_load_no_heavy_library():
    assert loaded_after("import hybridvit") == set()
    assert loaded_after("import hybridvit.cli") == set()  # --help and option parsing need none of them


def test_listing_the_models_loads_no_torch():
    """``hybridvit models`` and the registry's metadata (input size, family, class path) without torch."""
    code = ("import io, contextlib\nfrom hybridvit.cli import app\nfrom hybridvit import get_model_info, list_models\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: app(['models'])\n"
            "    except SystemExit as e: assert e.code == 0, e.code\n"
            "info = get_model_info('levit_128s')\n"
            "assert len(list_models()) == 9 and info.family == 'levit' and info.input_size == (3, 224, 224)\n"
            "assert info.class_path == 'hybridvit.models.levit.LeViT'")
    assert loaded_after(code) == set()
    assert loaded_after("from hybridvit import get_model_info\nget_model_info('cvt_13').model_class") == {"torch"}


def test_building_a_model_loads_torch_only():
    code = "import hybridvit\nfor name in ('levit_128s', 'cvt_13'): hybridvit.create_model(name, img_size=32)"
    assert loaded_after(code) == {"torch"}


def test_timm_free_layers_equal_timms():
    for shape, std, a, b in (((64, 33), 0.02, -2.0, 2.0), ((1000,), 1.0, -0.5, 1.5)):
        torch.manual_seed(0)
        reference = timm.layers.trunc_normal_(torch.empty(shape), std=std, a=a, b=b)
        torch.manual_seed(0)
        assert torch.equal(trunc_normal_(torch.empty(shape), std=std, a=a, b=b), reference)
    x = torch.randn(8, 5, 4, 4)
    for p in (0.0, 0.3):
        ours, theirs = DropPath(p).train(), timm.layers.DropPath(p).train()
        torch.manual_seed(1)
        reference = theirs(x)
        torch.manual_seed(1)
        assert torch.equal(ours(x), reference) and repr(ours) == repr(theirs)
        assert torch.equal(ours.eval()(x), x)
    theirs = timm.layers.LayerNorm2d(5)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = LayerNorm2d(5)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(QuickGELU()(x), timm.layers.QuickGELU()(x))


def test_lazy_exports_resolve_as_eager_ones_did():
    assert set(hybridvit.__all__) <= set(dir(hybridvit))
    for name in hybridvit.__all__:
        assert getattr(hybridvit, name).__name__ == name
    importlib.import_module("hybridvit.inference.optimize")  # the submodule of that name must not replace the function
    assert inspect.isfunction(hybridvit.optimize) and inspect.isfunction(hybridvit.inference.optimize)
    assert hybridvit.registry.list_models("levit_128s") == ["levit_128s"]  # submodules resolve too
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hybridvit.nope  # noqa: B018
