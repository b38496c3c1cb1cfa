"""Bad or unusual input on the loading side: wide images scaled rather than clipped, model folders
whose config.json is wrong, teachers and metrics files that are missing or broken, one-class data
(one error naming the file and the value, a ValueError or FileNotFoundError: the CLI's exit code 2),
and an unreachable Hub (found by one probe, then a fast HubUnreachableError: exit code 4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_image_folder, with_sources
from hub_server import hub  # noqa: F401  (the local Hub fixture)
from PIL import Image

import hybridvit
from hybridvit.checkpoints import CheckpointError, HubUnreachableError, read_checkpoint
from hybridvit.checkpoints.formats import detect_format
from hybridvit.data import DataError, build_datasets, load_image
from hybridvit.model_info import _REGISTRY

# --- images: 16-bit and float pixels are scaled, not clipped --------------------------------------


def _digit(size: int = 32) -> np.ndarray:
    """A validation digit (scikit-learn's, as the digits run saw them) upscaled to ``size``, 8-bit,
    spanning the full 0-255 range."""
    from hybridvit.data.datasets import digits_split

    images, targets, _, val = digits_split()
    index = next(i for i in val if images[i].min() == 0 and images[i].max() == 16)
    pixels = Image.fromarray((images[index] * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(pixels)


def _write_variants(folder, digit: np.ndarray) -> dict[str, object]:
    """The same picture as 8-bit PNG and in the wider encodings tools write."""
    wide = digit.astype(np.uint16) * 257  # 255 -> 65535
    files = {"8-bit.png": Image.fromarray(digit),
             "16-bit.png": Image.fromarray(wide),  # mode I;16
             "16-bit-big-endian.tif": Image.frombytes("I;16B", digit.shape[::-1], wide.astype(">u2").tobytes()),
             "32-bit-int.tif": Image.fromarray(wide.astype(np.int32)),  # mode I, 16-bit data
             "float-0-1.tif": Image.fromarray((digit / 255).astype(np.float32)),
             "float-0-255.tif": Image.fromarray(digit.astype(np.float32)),  # what Pillow's convert("F") gives
             "float-minus1-1.tif": Image.fromarray((digit / 127.5 - 1).astype(np.float32))}  # min-max
    for name, image in files.items():
        image.save(folder / name)
    return {name: folder / name for name in files}


def test_wide_images_decode_like_the_8bit_file(tmp_path):
    digit = _digit()
    files = _write_variants(tmp_path, digit)
    assert Image.open(files["16-bit.png"]).mode == "I;16" and Image.open(files["float-0-1.tif"]).mode == "F"
    reference = np.asarray(load_image(files["8-bit.png"])).astype(int)
    assert (reference[..., 0] == digit).all() and reference.std() > 50  # a real picture, not a flat one
    for name, path in files.items():
        decoded = np.asarray(load_image(path))
        assert decoded.shape == reference.shape and decoded.dtype == np.uint8, name
        assert np.abs(decoded.astype(int) - reference).max() <= 1, name  # equal up to rounding
    dim = digit * 0.8  # floats within [0, 1] or [0, 255] keep their brightness: only other ranges are stretched
    for scale in (1 / 255, 1):
        Image.fromarray((dim * scale).astype(np.float32)).save(tmp_path / "dim.tif")
        assert np.abs(np.asarray(load_image(tmp_path / "dim.tif"))[..., 0] - dim).max() <= 0.5 + 1e-4, scale


def test_images_beyond_a_known_range_are_refused(tmp_path):
    nan = np.ones((16, 16), np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    Image.fromarray(np.full((16, 16), 70000, np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"cannot read image .*nan\.tif: float pixels that are NaN or infinite"):
        load_image(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"cannot read image .*wide\.tif: I pixels span 70000\.\.70000, beyond 16 bits"):
        load_image(tmp_path / "wide.tif")


@pytest.mark.slow
def test_wide_images_get_the_8bit_files_predictions(digits_run, tmp_path):
    from hybridvit.serving.predict import Predictor

    files = _write_variants(tmp_path, _digit())
    names = ["8-bit.png", "16-bit.png", "float-0-1.tif"]
    predictions = Predictor(digits_run).predict([files[n] for n in names], k=10)
    reference = dict(predictions[0].top)
    assert max(reference.values()) > 0.5  # a confident prediction, which a white or black image would change
    for name, prediction in zip(names[1:], predictions[1:]):
        assert prediction.top[0][0] == predictions[0].top[0][0], name
        got = dict(prediction.top)
        assert max(abs(got[c] - p) for c, p in reference.items()) < 1e-5, name


# --- model folders whose config.json is wrong ---------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("folder") / "levit"
    hybridvit.save_model(hybridvit.create_model("levit_128s", num_classes=3, img_size=32), path)
    hybridvit.load_model(path)  # the folder as saved loads
    return path


def _edited(model_folder, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    return folder


def _set(section, key, value):
    def edit(config):
        (config[section] if section else config)[key] = value
        return config
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], r"config\.json: expected a JSON object \{\.\.\.\}, found list"),
    (_set("config", "embed_dim", [-128, 256, 384]), r'config\.json: "config\.embed_dim" is \[-128, 256, 384\]; it cannot be negative'),
    (_set("config", "key_dim", "sixteen"), r"config\.json: \"config\.key_dim\" is 'sixteen', expected int$"),
    (_set("config", "depth", [2.5, 3, 4]), r'config\.json: "config\.depth" is \[2\.5, 3, 4\], expected tuple\[int, \.\.\.\]'),
    (_set("config", "distillation", 1), r'config\.json: "config\.distillation" is 1, expected bool'),
    (_set("config", "img_size", "32"), r"config\.json: \"config\.img_size\" is '32', expected int \| tuple\[int, int\]"),
    (_set("config", "widths", [1]), r"config\.json: LeViTConfig has no field\(s\) widths; its fields: embed_dim, "),
    (_set(None, "config", [1]), r'config\.json: "config" must be an object of LeViTConfig fields, got \[1\]'),
    (_set(None, "family", "resnet"), r'config\.json: "family": unknown model family \'resnet\'; known families: levit, cvt, graft$'),
    (_set(None, "format_version", 99), r'config\.json: "format_version" 99 is newer than this hybridvit reads \(up to 1\)'),
    (_set("config", "key_dim", 0), r"edited: cannot build the model its config\.json describes \(ZeroDivisionError"),
])
def test_bad_config_json_is_one_error_naming_file_and_field(model_folder, tmp_path, edit, message):
    folder = _edited(model_folder, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as error:
        hybridvit.load_model(folder)
    assert str(folder) in str(error.value)


def test_unrecognised_layout_lists_each_format_once(tmp_path):
    from safetensors.torch import save_file
    import torch

    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout") as error:
        detect_format(read_checkpoint(tmp_path / "odd.safetensors"))
    known = str(error.value).split("known formats: ")[1].split(", ")
    assert len(known) == len(set(known)) and {"hybridvit", "levit-official", "cvt-huggingface"} <= set(known)


# --- teachers, metrics files, one-class data ----------------------------------------------------


def test_a_teacher_path_that_does_not_exist_is_not_found(tmp_path):
    from hybridvit.train.config import TrainConfig
    from hybridvit.train.teacher import build_teacher

    missing = str(tmp_path / "runs" / "teacher")
    with pytest.raises(FileNotFoundError, match=f"--teacher {missing} not found: no such file or folder"):
        build_teacher(TrainConfig(teacher=missing), ["a", "b"], (32, 32))
    with pytest.raises(ValueError, match="--teacher resnet18 has no weights"):  # a model name still means a model
        build_teacher(TrainConfig(teacher="resnet18"), ["a", "b"], (32, 32))


def test_a_broken_metrics_file_names_file_and_line(tmp_path):
    from hybridvit.figures import read_metrics

    good = json.dumps({"epoch": 0, "train_loss": 1.0})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n\n{{\"epoch\": 1, \"train_loss\": \n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3: not valid JSON \(Expecting value, column 28\)"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: expected one epoch's record.*got \[1, 2\]"):
        read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n")
    assert read_metrics(tmp_path) == [{"epoch": 0, "train_loss": 1.0}]


def test_one_class_data_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("cat",), per_class=2)
    with pytest.raises(DataError, match=r"data/train has a single class \('cat'\): a classifier needs at least 2"):
        build_datasets(root)
    make_image_folder(tmp_path / "two", classes=("cat", "dog"), per_class=2)
    assert build_datasets(tmp_path / "two").classes == ["cat", "dog"]


# --- the Hub unreachable: one probe, then one clear error; the cache still serves ---------------


@pytest.fixture
def connections(monkeypatch):
    """The address of every TCP connection this process opens from now on (huggingface_hub's,
    urllib's, the probe's), with no unreachable host remembered from earlier tests. Were
    huggingface_hub to retry, its back-off does not sleep, so the count says so at once."""
    import socket

    import huggingface_hub.utils._http as http

    from hybridvit.checkpoints import hub

    opened, connect = [], socket.create_connection

    def counting(address, *args, **kwargs):
        opened.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counting)
    monkeypatch.setattr(hub, "_unreachable", {})
    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)
    return opened


def test_unreachable_hub_fails_at_once_after_one_connection_attempt(connections, torch_hub_dir, monkeypatch, caplog):
    info = _REGISTRY["levit_128s"]  # the official release's host unreachable too (the conftest's dead endpoint)
    monkeypatch.setitem(_REGISTRY, "levit_128s", with_sources(info, "http://127.0.0.1:9/LeViT-128S-96703c44.pth",
                                                                *info.pretrained[0].sources[1:]))
    with pytest.raises(HubUnreachableError, match="could not get the published weights from any source") as error:
        hybridvit.create_model("levit_128s", pretrained=True)
    assert isinstance(error.value, ConnectionError)  # the CLI's exit code 4
    for source in ("LeViT-128S-96703c44.pth cannot be reached", "facebook/levit-128S is not in the Hub cache",
                   "timm/levit_128s.fb_dist_in1k is not in the Hub cache"):
        assert source in str(error.value)
    with pytest.raises(HubUnreachableError, match=r"^the Hugging Face Hub at http://127\.0\.0\.1:9 cannot be reached "
                       r"\(127\.0\.0\.1:9: Connection refused\) and org/name is not in the Hub cache .*"
                       r"HF_HUB_OFFLINE=1 .*HF_ENDPOINT at a reachable mirror"):
        hybridvit.load_model("hf-hub:org/name")
    assert connections == [("127.0.0.1", 9)]  # one probe for a release, two Hub copies and a Hub folder
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")]  # no retry messages


def test_cached_hub_folder_loads_with_the_hub_unreachable(hub, model_folder, connections, monkeypatch):
    import torch

    hub.add_folder("me/tiny", model_folder)
    online = hybridvit.load_model("hf-hub:me/tiny")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    served, opened = len(hub.requests), len(connections)
    offline = hybridvit.load_model("hf-hub:me/tiny")
    assert len(hub.requests) == served and connections[opened:] == [("127.0.0.1", 9)]  # the probe; the cache served
    for key, value in online.state_dict().items():
        assert torch.equal(offline.state_dict()[key], value), key


def test_hub_that_fails_every_request_fails_quietly_then_at_once(connections, monkeypatch, caplog):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Unavailable(BaseHTTPRequestHandler):  # reachable (the probe passes), then 503 to everything
        def do_HEAD(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(HubUnreachableError, match=r"cannot be reached \(its requests failed\) and org/name is not in"):
            hybridvit.load_model("hf-hub:org/name")  # huggingface_hub retries 5xx answers, without a word now
        tried = len(connections)
        with pytest.raises(HubUnreachableError, match="org/other is not in the Hub cache"):
            hybridvit.load_model("hf-hub:org/other")
        assert len(connections) == tried  # remembered: no second round of attempts
    finally:
        server.shutdown()
        server.server_close()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")]  # no retry messages


# --- the same errors from the command line: one line, the agreed exit code ---------------------


def test_cli_gives_one_error_line_and_the_agreed_exit_code(model_folder, tmp_path, capsys):
    from hybridvit.cli import main
    from hybridvit.data import example_image

    image = tmp_path / "x.png"
    example_image(64).save(image)
    folder = _edited(model_folder, tmp_path, _set("config", "key_dim", "sixteen"))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1,\n')
    one_class = make_image_folder(tmp_path / "data", classes=("cat",), per_class=2)
    cases = [
        (["predict", "hf-hub:org/name", str(image)], 4, "the Hugging Face Hub at http://127.0.0.1:9 cannot be reached"),
        (["predict", str(folder), str(image)], 2, f"{folder}/config.json: \"config.key_dim\" is 'sixteen', expected int"),
        (["train", "--teacher", str(tmp_path / "none"), "--output", str(tmp_path / "run")], 2,
         f"--teacher {tmp_path / 'none'} not found"),
        (["train", "--data", str(one_class), "--output", str(tmp_path / "run")], 2, "has a single class ('cat')"),
        (["plot", "curves", str(tmp_path / "metrics.jsonl"), "--output", str(tmp_path / "c.png")], 2,
         "metrics.jsonl, line 2: not valid JSON"),
    ]
    for args, code, message in cases:
        with pytest.raises(SystemExit) as done:
            main(args)
        out = capsys.readouterr()
        lines = (out.out + out.err).strip().splitlines()
        assert done.value.code == code and len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        assert message in lines[0], (args, lines)
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.png").exists()
