"""Checkpoint formats: parity with timm and Hugging Face on randomised weights, safety, errors."""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import shutil

import pytest
import timm
import torch
from conftest import randomize_, rel_err, with_sources
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import hybridvit
from hybridvit.checkpoints import CheckpointError, detect_format, read_checkpoint
from hybridvit.checkpoints.levit import layer_sequence
from hybridvit.cli import app
from hybridvit.model_info import _REGISTRY
from hybridvit.registry import get_model_info, list_models

import transformers  # noqa: E402  (test-only reference implementation)

TIMM_TO_PARTS = {"levit_128s": (2, 3, 4), "levit_256": (4, 4, 4)}


def timm_levit(name: str, seed: int = 0):
    return randomize_(timm.create_model(name), seed).eval()


def official_bias_index(res: int, stride: int) -> torch.Tensor:
    """The official release's index: offsets numbered in order of first appearance."""
    queries = list(itertools.product(range(0, res, stride), repeat=2))
    keys = list(itertools.product(range(res), repeat=2))
    offsets: dict = {}
    idx = [offsets.setdefault((abs(qy - ky), abs(qx - kx)), len(offsets)) for qy, qx in queries for ky, kx in keys]
    return torch.tensor(idx).view(len(queries), len(keys))


def timm_to_official(state: dict, depth: tuple[int, ...]) -> dict:
    """Write a timm state dict with the official release's key names and index buffers."""
    out = {}
    for k, v in state.items():
        for i in range(4):
            k = k.replace(f"stem.conv{i + 1}.linear.", f"patch_embed.{2 * i}.c.").replace(f"stem.conv{i + 1}.bn.", f"patch_embed.{2 * i}.bn.")
        k = k.replace("head.linear.", "head.l.").replace("head_dist.linear.", "head_dist.l.")
        out[k] = v
    flat, res = 0, 14
    renamed = {}
    for s, d in enumerate(depth):
        for j in range(d):
            renamed[f"stages.{s}.blocks.{j}.attn."] = (f"blocks.{flat}.m.", res, 1)
            renamed[f"stages.{s}.blocks.{j}.mlp."] = (f"blocks.{flat + 1}.m.", None, None)
            flat += 2
        if s + 1 < len(depth):
            renamed[f"stages.{s + 1}.downsample.attn_downsample."] = (f"blocks.{flat}.", res, 2)
            res = (res + 1) // 2
            renamed[f"stages.{s + 1}.downsample.mlp."] = (f"blocks.{flat + 1}.m.", None, None)
            flat += 2
    final = {}
    for k, v in out.items():
        for old, (new, r, stride) in renamed.items():
            if k.startswith(old):
                rest = k[len(old):]
                rest = rest.replace("proj.ln.", "proj.1.").replace("q.ln.", "q.1.").replace("ln1.", "0.").replace("ln2.", "2.")
                rest = rest.replace(".linear.", ".c.")
                k = new + rest
                if rest == "attention_biases":
                    final[new + "attention_bias_idxs"] = official_bias_index(r, stride)
                break
        final[k] = v
    return final


@pytest.mark.parametrize("name", ["levit_128s", "levit_256"])
@pytest.mark.parametrize("wrapper", ["plain", "model", "state_dict", "ddp"])
def test_timm_state_dict_parity(name, wrapper, tmp_path, images):
    ref = timm_levit(name)
    state = ref.state_dict()
    if wrapper == "ddp":
        state = {"module." + k: v for k, v in state.items()}
    elif wrapper != "plain":
        state = {wrapper: state, "epoch": 3}
    torch.save(state, tmp_path / "timm.pth")
    model = hybridvit.create_model(name, checkpoint_path=tmp_path / "timm.pth").eval()
    with torch.no_grad():
        assert rel_err(model(images), ref(images)) < 1e-4
    assert detect_format(read_checkpoint(tmp_path / "timm.pth")).name == "levit-timm"


@pytest.mark.parametrize("name", ["levit_128s", "levit_256"])
def test_official_release_parity(name, tmp_path, images):
    ref = timm_levit(name, seed=3)
    official = {"model": timm_to_official(ref.state_dict(), TIMM_TO_PARTS[name])}
    assert "blocks.0.m.attention_biases" in official["model"] and "head_dist.l.weight" in official["model"]
    torch.save(official, tmp_path / "LeViT.pth")
    model = hybridvit.create_model(name)
    assert hybridvit.load_checkpoint(model.eval(), tmp_path / "LeViT.pth") == "levit-official"
    with torch.no_grad():
        assert rel_err(model(images), ref(images)) < 1e-4


def test_official_bias_table_follows_its_index(tmp_path, images):
    """A table stored in another column order loads right when its index says so, and fails when it lies."""
    ref = timm_levit("levit_128s", seed=4)
    state = timm_to_official(ref.state_dict(), (2, 3, 4))
    g = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.endswith("attention_bias_idxs")]:
        table_key = key.replace("attention_bias_idxs", "attention_biases")
        perm = torch.randperm(state[table_key].shape[1], generator=g)
        inverse = torch.argsort(perm)
        state[table_key] = state[table_key][:, perm]  # column c now holds old column perm[c]
        state[key] = inverse[state[key]]
    torch.save({"model": state}, tmp_path / "permuted.pth")
    model = hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "permuted.pth").eval()
    with torch.no_grad():
        assert rel_err(model(images), ref(images)) < 1e-4

    bad = dict(state)
    bad["blocks.0.m.attention_bias_idxs"] = state["blocks.0.m.attention_bias_idxs"].clone()
    bad["blocks.0.m.attention_bias_idxs"][0, :2] = bad["blocks.0.m.attention_bias_idxs"][0, :2].flip(0)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="permuted bias table"):
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "bad.pth")


def hf_levit(distillation: bool = True, seed: int = 0, **cfg):
    config = transformers.LevitConfig(
        hidden_sizes=[128, 256, 384], num_attention_heads=[4, 6, 8], depths=[2, 3, 4], key_dim=[16, 16, 16],
        drop_path_rate=0, **cfg)
    cls = transformers.LevitForImageClassificationWithTeacher if distillation else transformers.LevitForImageClassification
    return randomize_(cls(config), seed).eval()


@pytest.mark.parametrize("distillation", [True, False])
def test_huggingface_folder_parity(distillation, tmp_path, images):
    ref = hf_levit(distillation, num_labels=10)
    ref.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    model = hybridvit.load_model(tmp_path / "hf")
    assert model.model_name == "levit_128s" and model.num_classes == 10 and model.distillation == distillation
    with torch.no_grad():
        assert rel_err(model(images), ref(images).logits) < 1e-4
    same = hybridvit.create_model("levit_128s", num_classes=10, distillation=distillation,
                                  checkpoint_path=tmp_path / "hf").eval()
    with torch.no_grad():
        assert rel_err(same(images), ref(images).logits) < 1e-4


def test_index_buffers_saved_by_older_exports_are_honoured(tmp_path, images):
    """Older transformers and timm releases saved attention_bias_idxs: they must load (and be checked)."""
    hf = hf_levit(num_labels=10, seed=8)
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state.update({f"{name}.attention_bias_idxs": m.attention_bias_idxs.contiguous() for name, m in hf.named_modules()
                  if hasattr(m, "attention_bias_idxs")})
    assert sum(k.endswith("attention_bias_idxs") for k in state) == 2 + 3 + 4 + 2
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with torch.no_grad():
        assert rel_err(hybridvit.load_model(tmp_path / "hf")(images), hf(images).logits) < 1e-4

    ref = timm_levit("levit_128s", seed=9)
    state = ref.state_dict()
    state.update({f"{name}.attention_bias_idxs": m.attention_bias_idxs for name, m in ref.named_modules()
                  if hasattr(m, "attention_bias_idxs")})
    assert sum(k.endswith("attention_bias_idxs") for k in state) == 2 + 3 + 4 + 2
    torch.save(state, tmp_path / "old_timm.pth")
    model = hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "old_timm.pth").eval()
    with torch.no_grad():
        assert rel_err(model(images), ref(images)) < 1e-4


def test_huggingface_folder_of_other_variant_is_refused(tmp_path):
    hf_levit().save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="different architecture"):
        hybridvit.create_model("levit_256", checkpoint_path=tmp_path / "hf")


def test_native_roundtrip(tmp_path, images):
    model = randomize_(hybridvit.create_model("levit_192", num_classes=4, img_size=(160, 192))).eval()
    hybridvit.save_model(model, tmp_path / "native", extra={"classes": ["a", "b", "c", "d"]})
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == ["config.json", "model.safetensors"]
    loaded = hybridvit.load_model(tmp_path / "native")
    assert loaded.config == model.config and loaded.model_name == "levit_192"
    x = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert hybridvit.checkpoints.read_extra(tmp_path / "native") == {"classes": ["a", "b", "c", "d"]}
    # a bare safetensors file of hybridvit keys loads too
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    again = hybridvit.create_model("levit_192", num_classes=4, img_size=(160, 192), checkpoint_path=tmp_path / "w.safetensors")
    assert torch.equal(again.head.linear.weight, model.head.linear.weight)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_code_running_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {"w": _Exploit()}}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "evil.pth")
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_mismatch_errors_list_all_problems(tmp_path):
    state = hybridvit.create_model("levit_128s").state_dict()
    del state["stages.0.blocks.0.attn.qkv.bn.running_var"]
    state["stages.9.extra.weight"] = torch.zeros(1)
    state["stages.1.blocks.0.mlp.up.linear.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "broken.pth")
    msg = str(err.value)
    assert "missing keys (1): stages.0.blocks.0.attn.qkv.bn.running_var" in msg
    assert "unexpected keys (1): stages.9.extra.weight" in msg
    assert "shape mismatch stages.1.blocks.0.mlp.up.linear.weight: checkpoint (3, 3)" in msg


def test_head_mismatch_suggests_num_classes(tmp_path):
    hybridvit.save_model(hybridvit.create_model("levit_128s", num_classes=10), tmp_path / "ten")
    with pytest.raises(CheckpointError, match="num_classes=10"):
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "ten")
    model = hybridvit.create_model("levit_128s")
    hybridvit.load_checkpoint(model, tmp_path / "ten", exclude_head=True)  # fine-tuning start
    assert model.num_classes == 1000


def test_unreadable_and_unknown_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="junk.pth is not a PyTorch checkpoint"):
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "junk.pth")
    (tmp_path / "torn.pth").write_bytes(b"\x80\x02 torn pickle")  # a pickle header, then garbage
    with pytest.raises(CheckpointError, match="torn.pth: refused to load: not a weights-only"):
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "torn.pth")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not found"):
        hybridvit.create_model("levit_128s", checkpoint_path=tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="needs a model folder"):
        hybridvit.load_model(tmp_path / "other.pth")


def test_bias_tables_resampled_for_new_resolution(tmp_path):
    hybridvit.save_model(randomize_(hybridvit.create_model("levit_128s")), tmp_path / "m")
    model = hybridvit.create_model("levit_128s", img_size=288)
    hybridvit.load_checkpoint(model, tmp_path / "m" / "model.safetensors")
    assert model.stages[0].blocks[0].attn.attention_bias.table.shape == (4, 18 * 18)
    assert model.eval()(torch.randn(1, 3, 288, 288)).shape == (1, 1000)


def _serve(tmp_path, name: str, payload_path):
    """Publish a file under a torch.hub-style name carrying its sha256 prefix; return a file:// URL."""
    digest = hashlib.sha256(payload_path.read_bytes()).hexdigest()[:8]
    served = tmp_path / "server" / name.format(digest)
    served.parent.mkdir(exist_ok=True)
    shutil.copy(payload_path, served)
    return served.as_uri()


def test_pretrained_download_with_hash_check(tmp_path, torch_hub_dir, monkeypatch, images):
    ref = timm_levit("levit_128s", seed=7)
    torch.save({"model": timm_to_official(ref.state_dict(), (2, 3, 4))}, tmp_path / "weights.pth")
    url = _serve(tmp_path, "LeViT-128S-{}.pth", tmp_path / "weights.pth")
    info = get_model_info("levit_128s")
    monkeypatch.setitem(_REGISTRY, "levit_128s", with_sources(info, url))
    model = hybridvit.create_model("levit_128s", pretrained=True).eval()
    assert (torch_hub_dir / "checkpoints" / url.rsplit("/", 1)[1]).exists()
    with torch.no_grad():
        assert rel_err(model(images), ref(images)) < 1e-4
    # new classes: everything but the classifier comes from the weights
    ft = hybridvit.create_model("levit_128s", pretrained=True, num_classes=5)
    assert ft.head.linear.out_features == 5
    torch.testing.assert_close(ft.stem.conv1.conv.weight, model.stem.conv1.conv.weight)


def test_pretrained_download_rejects_wrong_hash(tmp_path, torch_hub_dir, monkeypatch):
    torch.save({"model": {}}, tmp_path / "weights.pth")
    url = _serve(tmp_path, "LeViT-128S-{}.pth", tmp_path / "weights.pth").rsplit("-", 1)[0] + "-00000000.pth"
    (tmp_path / "server" / url.rsplit("/", 1)[1]).write_bytes((tmp_path / "weights.pth").read_bytes())
    info = get_model_info("levit_128s")
    monkeypatch.setitem(_REGISTRY, "levit_128s", with_sources(info, url))
    with pytest.raises(CheckpointError, match="failed verification"):
        hybridvit.create_model("levit_128s", pretrained=True)
    assert not (torch_hub_dir / "checkpoints" / "LeViT-128S-00000000.pth").exists()


def test_layer_sequence_order():
    seq = layer_sequence((2, 3, 4))
    assert len(seq) == 2 * (2 + 3 + 4) + 4
    assert seq[4] == (0, "stages.1.downsample.attn", "shrink") and seq[5] == (0, "stages.1.downsample.mlp", "mlp")


def _bias_tables(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith("attention_bias.table")}


def test_non_square_bias_tables_load_at_other_sizes(tmp_path):
    from hybridvit.layers import resize_bias_table

    # 112x144 gives a 7x9 first grid; 144x112 a 9x7 one: the same number of entries, another layout.
    source = randomize_(hybridvit.create_model("levit_128s", num_classes=3, img_size=(112, 144)))
    hybridvit.save_model(source, tmp_path / "m")
    grids = {n: m.key_grid for n, m in source.named_modules() if hasattr(m, "key_grid")}
    for size in [(144, 112), (224, 224), (64, 96)]:
        target = hybridvit.create_model("levit_128s", num_classes=3, img_size=size, checkpoint_path=tmp_path / "m")
        target_grids = {n: m.key_grid for n, m in target.named_modules() if hasattr(m, "key_grid")}
        for key, table in _bias_tables(target).items():
            name = key.removesuffix(".table")
            expected = resize_bias_table(source.state_dict()[key], grids[name], target_grids[name])
            torch.testing.assert_close(table, expected)
        assert not torch.equal(_bias_tables(target)["stages.0.blocks.0.attn.attention_bias.table"],
                               source.state_dict()["stages.0.blocks.0.attn.attention_bias.table"])
    # A bare state dict does not say its grid: a non-square one is refused with the way out.
    save_file(source.state_dict(), tmp_path / "bare.safetensors")
    with pytest.raises(CheckpointError, match="non-square grid that a bare state dict does not name"):
        hybridvit.create_model("levit_128s", num_classes=3, img_size=224, checkpoint_path=tmp_path / "bare.safetensors")


def test_hugging_face_cvt_folder_keeps_its_input_size(tmp_path):
    from hybridvit.checkpoints.cvt import config_from_hf
    from hybridvit.checkpoints.io import Checkpoint

    ref = transformers.CvtForImageClassification(transformers.CvtConfig(num_labels=5)).eval()
    ref.save_pretrained(tmp_path / "cvt-13-384")
    assert hybridvit.load_model(tmp_path / "cvt-13-384").input_hw == (224, 224)  # no preprocessor: the variant's
    (tmp_path / "cvt-13-384" / "preprocessor_config.json").write_text(
        '{"crop_pct": 0.875, "size": {"shortest_edge": 384}, "resample": 3}')
    model = hybridvit.load_model(tmp_path / "cvt-13-384")
    assert model.input_hw == (384, 384) and model.model_name == "cvt_13"
    # W24 (277M parameters: read its config only) is a 384 model even without a preprocessor config.
    w24 = transformers.CvtConfig(embed_dim=[192, 768, 1024], num_heads=[3, 12, 16], depth=[2, 2, 20]).to_dict()
    assert config_from_hf(Checkpoint({}, tmp_path, w24)).img_size == 384


def test_save_model_never_leaves_a_torn_folder(tmp_path, monkeypatch):
    first = randomize_(hybridvit.create_model("levit_128s", num_classes=3), seed=1)
    second = randomize_(hybridvit.create_model("levit_128s", num_classes=3), seed=2)
    hybridvit.save_model(first, tmp_path / "m")
    (tmp_path / "m" / "export.onnx").write_bytes(b"kept")
    real_write = type(tmp_path).write_text

    def crash_on_config(self, *args, **kwargs):
        if self.name == "config.json":
            raise KeyboardInterrupt  # interrupted after the new weights were written
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "write_text", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        hybridvit.save_model(second, tmp_path / "m")
    monkeypatch.undo()
    loaded = hybridvit.load_model(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], first.state_dict()[k]) for k in first.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind
    hybridvit.save_model(second, tmp_path / "m")
    loaded = hybridvit.load_model(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], second.state_dict()[k]) for k in second.state_dict())
    assert (tmp_path / "m" / "export.onnx").read_bytes() == b"kept"


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_backbone_from_foreign_checkpoints_matches_timm_intermediates(layout, tmp_path, images):
    ref = timm_levit("levit_128s", seed=5)
    state = ref.state_dict() if layout == "timm" else {"model": timm_to_official(ref.state_dict(), (2, 3, 4))}
    torch.save(state, tmp_path / "w.pth")
    backbone = hybridvit.create_model("levit_128s", features_only=True, checkpoint_path=tmp_path / "w.pth").eval()
    with torch.no_grad():
        expected = ref.forward_intermediates(images, intermediates_only=True)
        got = backbone(images)
        fused = hybridvit.fuse(backbone)(images)
    assert len(got) == len(expected) == 3
    for g, f, e in zip(got, fused, expected):
        assert g.shape == e.shape and rel_err(g, e) < 1e-4 and rel_err(f, e) < 1e-4


def test_cvt_backbone_from_hugging_face_matches_its_stage_outputs(tmp_path):
    ref = transformers.CvtForImageClassification(transformers.CvtConfig(num_labels=5)).eval()
    ref.save_pretrained(tmp_path / "hf")
    backbone = hybridvit.create_model("cvt_13", features_only=True, checkpoint_path=tmp_path / "hf").eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        hidden = ref.cvt(x, output_hidden_states=True).hidden_states
        got = backbone(x)
    assert [tuple(g.shape) for g in got] == [tuple(h.shape) for h in hidden]
    for g, h in zip(got, hidden):
        assert rel_err(g, h) < 1e-4


def test_a_registered_model_is_listed_created_saved_and_reloaded_by_name(tmp_path):
    from hybridvit import model_info, registry
    from hybridvit.models.levit import LeViT, LeViTConfig

    list_models()  # the built-in families register on first use
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_info, "_REGISTRY", dict(model_info._REGISTRY))  # the store is process-wide: a copy
        config = LeViTConfig((32, 48, 64), (2, 3, 4), (1, 1, 1), key_dim=8, img_size=32, num_classes=4)
        info = registry.register_model(registry.ModelInfo("levit_tiny_test", LeViT, config))
        assert list_models("levit_tiny*") == ["levit_tiny_test"]
        model = randomize_(hybridvit.create_model("levit_tiny_test", num_classes=4)).eval()
        assert model.model_name == "levit_tiny_test" and model.input_hw == (32, 32)
        assert [s.blocks[0].attn.num_heads for s in model.stages] == [2, 3, 4]
        hybridvit.save_model(model, tmp_path / "tiny")
        loaded = hybridvit.load_model(tmp_path / "tiny")
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert loaded.model_name == "levit_tiny_test" and torch.equal(loaded(x), model(x))
        result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["models", "levit_tiny*"])
        assert result.exit_code == 0 and "levit_tiny_test" in result.output and "32x32" in result.output, result.output
        with pytest.raises(ValueError, match="'levit_tiny_test' is already registered"):
            registry.register_model(info)
        with pytest.raises(ValueError, match="no published weights"):
            hybridvit.create_model("levit_tiny_test", pretrained=True)
    assert "levit_tiny_test" not in list_models()  # gone again for the other tests
    with pytest.raises(ValueError, match="unknown model 'levit_tiny_test'"):
        hybridvit.create_model("levit_tiny_test")


def test_a_registered_format_is_detected_and_its_converter_used(tmp_path):
    from hybridvit.checkpoints import formats

    ref = randomize_(hybridvit.create_model("levit_128s", num_classes=3, img_size=32), seed=2).eval()
    state = {"mylib/" + k.replace(".", "/"): v for k, v in ref.state_dict().items()}  # another library's keys
    torch.save({"state_dict": state}, tmp_path / "mylib.pth")
    calls = []

    def convert(theirs, model):
        calls.append(len(theirs))
        return {k.removeprefix("mylib/").replace("/", "."): v for k, v in theirs.items()}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(formats, "_FORMATS", list(formats._FORMATS))  # the formats are process-wide: a copy
        fmt = formats.register_format(formats.CheckpointFormat("mylib", "levit", "mylib/stem/conv1/conv/weight", convert))
        assert detect_format(read_checkpoint(tmp_path / "mylib.pth")) is fmt
        model = hybridvit.create_model("levit_128s", num_classes=3, img_size=32).eval()
        assert hybridvit.load_checkpoint(model, tmp_path / "mylib.pth") == "mylib"
        again = hybridvit.create_model("levit_128s", num_classes=3, img_size=32, checkpoint_path=tmp_path / "mylib.pth")
        assert calls == [len(state)] * 2  # the format's own converter did the loading
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x)) and torch.equal(again.eval()(x), ref(x))
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):  # gone again for the other tests
        hybridvit.create_model("levit_128s", num_classes=3, img_size=32, checkpoint_path=tmp_path / "mylib.pth")
