"""Bad input on the command line: one ``error: ...`` line naming the value or file, the documented
exit code (README, "Exit codes"), no traceback, and no file written or changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import hybridvit
from hybridvit.checkpoints import HubUnreachableError
from hybridvit.cli import main


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A saved 32x32, 10-class LeViT-128S: what the commands that read a model are given."""
    folder = tmp_path_factory.mktemp("model") / "levit"
    hybridvit.save_model(hybridvit.create_model("levit_128s", img_size=32, num_classes=10), folder)
    return folder


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot create files in (a read-only one; root ignores permission bits,
    so under root: /sys, which no one writes to)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "probe").touch()
            (candidate / "probe").unlink()
        except OSError:
            return candidate
    pytest.skip("no unwritable folder on this machine")


@pytest.fixture
def places(tmp_path, model_folder, unwritable) -> dict[str, str]:
    """What the rows' ``{name}`` fields stand for: a model folder, a scratch folder, a plain file,
    an image and an unwritable folder (``{run}``, a finished run, is added by the rows that use it)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("not a folder")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(scratch / "red.png")
    (scratch / "list.csv").write_text("path\nred.png\n")
    (scratch / "latin1.txt").write_bytes("red.png\ncaf\xe9.png\n".encode("latin-1"))
    pq.write_table(pa.table({"path": ["red.png"]}), scratch / "list.parquet")
    pq.write_table(pa.table({"path": [1, 2]}), scratch / "numbers.parquet")
    (scratch / "fake.parquet").write_text("not a Parquet file at all")
    return {"model": str(model_folder), "tmp": str(scratch), "file": str(scratch / "notes.txt"),
            "image": str(scratch / "red.png"), "ro": str(unwritable)}


def with_run(command: str, places: dict[str, str], request) -> dict[str, str]:
    """``places`` with the session's finished digits run when ``command`` names it (trained once, on demand)."""
    return {**places, "run": str(request.getfixturevalue("digits_run"))} if "{run}" in command else places


def snapshot(places: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Every file and folder below the model, run and scratch folders, with its size and modification time."""
    found = {}
    for folder in (places[k] for k in ("model", "run", "tmp") if k in places):
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(root, name)
                found[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found


# command, exit code, what the one error line must say ({name}: see ``places``)
ROWS = [
    ("train --epochs 0", 2, ["--epochs", "got 0"]),
    ("train --epochs -1", 2, ["--epochs", "got -1"]),
    ("train --lr -1", 2, ["--lr must be greater than 0", "got -1"]),  # as given, not scaled by the batch
    ("train --smoothing 1.5", 2, ["--smoothing", "got 1.5"]),
    ("train --input-width 40", 2, ["--input-width 40 needs --input-size"]),
    ("train --resume --overwrite --output {run}", 2, ["--overwrite", "--resume"]),
    ("train --output {file}", 2, ["{file} is a file"]),
    ("train --output {file}/run", 2, ["{file} is a file"]),
    ("train --output {ro}/run", 2, ["{ro}", "not writable"]),
    ("train --output {run}", 2, ["{run} holds a finished run", "--resume", "--overwrite"]),
    ("experiment grafting --epochs 0 --output {tmp}/exp", 2, ["--epochs", "got 0"]),
    ("experiment grafting --epochs 1 --output {tmp}/exp --bench-seconds 0", 2, ["--bench-seconds", "got 0"]),
    ("eval --checkpoint {model} --input-size -64", 2, ["--input-size", "got -64"]),
    ("eval --checkpoint {model} --input-size 0", 2, ["--input-size", "got 0"]),
    ("eval --checkpoint {model} --input-size 32 --input-width 0", 2, ["--input-width", "got 0"]),
    ("eval --checkpoint {model} --input-width 40", 2, ["--input-width 40 needs --input-size"]),
    ("eval --checkpoint {model} --batch-size 0", 2, ["--batch-size", "got 0"]),
    ("predict {model} {image} --top -1", 2, ["--top", "got -1"]),
    ("predict {model} {image} --top x", 2, ["--top", "got 'x'"]),  # a usage error (typer's), one line too
    ("predict {model} {tmp}/missing.png", 1, ["missing.png"]),  # the run completes; that input failed
    ("predict {model} {tmp}/none/*.png", 1, ["none/*.png", "No such file"]),  # a pattern matching nothing: the same
    ("predict {model} {tmp}/list.csv -o {tmp}/list.csv", 2, ["--output {tmp}/list.csv is one of the run's inputs"]),
    ("predict {model} {tmp}/list.parquet -o {tmp}/list.parquet", 2, ["list.parquet is one of the run's inputs"]),
    ("predict {model} {tmp}/latin1.txt", 2, ["{tmp}/latin1.txt: line 2 is not UTF-8"]),
    ("predict {model} {tmp}/numbers.parquet", 2, ["numbers.parquet: the column 'path' holds int64"]),
    ("predict {model} {tmp}/fake.parquet", 2, ["fake.parquet: not a Parquet file"]),
    ("serve {model} --max-body-mb 0", 2, ["--max-body-mb must be at least"]),  # options spelled as typed
    ("serve {model} --body-timeout-s 0", 2, ["--body-timeout-s must be greater than 0"]),
    ("predict {model} {image} --precision int8-static", 2, ["--precision int8-static needs --calibration"]),
    ("predict {model} {image} --validation {tmp}/missing", 2, ["--validation {tmp}/missing is not a folder"]),
    ("benchmark --threads 0", 2, ["--threads", "got 0"]),
    ("benchmark --batch 0", 2, ["--batch", "got 0"]),
    ("benchmark levit_128s --plot {tmp}", 2, ["{tmp} is a folder"]),
    ("export {model} --opset 3", 2, ["--opset", "14 and 20", "got 3"]),
    ("export {model} --format onnx2", 2, ["onnx2"]),
    ("export {model} --output {tmp}", 2, ["{tmp} is a folder"]),
    ("export {model} --output {file}/model.onnx", 2, ["{file} is a file"]),
    ("export {model} --output {ro}/model.onnx", 2, ["{ro}", "not writable"]),
    ("export {model} --int8 --calibration {tmp}", 2, ["--int8 and --calibration go with --format executorch"]),
    ("export {model} --format executorch --int8", 2, ["--int8 needs --calibration DIR"]),
    ("export {model} --format coreml --output {tmp}/model.pkg", 2, ["NAME.mlpackage, not model.pkg"]),
    ("quantize {model} --calibration {tmp} --output {tmp}", 2, ["{tmp} is a folder"]),
    ("quantize {model} --calibration {tmp} --output {file}/int8.onnx", 2, ["{file} is a file"]),
    ("quantize {model} --calibration {tmp} --output {ro}/int8.onnx", 2, ["{ro}", "not writable"]),
    ("plot filters {model} --output {tmp}", 2, ["{tmp} is a folder"]),
    ("plot filters {model} --output {file}/filters.png", 2, ["{file} is a file"]),
    ("plot block-timings {model} --output {ro}/timings.png", 2, ["{ro}", "not writable"]),
    ("push {model} --repo me/levit --dry-run {file}", 2, ["{file} is a file"]),
    ("push {model} --repo me/levit --dry-run {file}/hub", 2, ["{file} is a file"]),
    ("push levit_128s --pretrained --repo me/levit --dry-run {ro}/hub", 2, ["{ro}", "not writable"]),
    ("info levit_999", 2, ["levit_999"]),
    ("nonsense", 2, ["nonsense"]),
]


def fill(text: str, places: dict[str, str]) -> str:
    return text.format(**places)


def check_failure(out: str, code: int, got: int, wanted: list[str], before: dict, after: dict) -> None:
    assert got == code, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and len(out.strip().splitlines()) == 1, out  # one line, and nothing else
    for text in wanted:
        assert text in errors[0], (text, errors[0])
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


@pytest.mark.parametrize("command, code, wanted", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_with_its_exit_code_and_writes_nothing(command, code, wanted, places, request, capsys,
                                                                    monkeypatch):
    places = with_run(command, places, request)
    monkeypatch.chdir(places["tmp"])  # default outputs (runs/..., the current folder) land where snapshot looks
    before = snapshot(places)
    with pytest.raises(SystemExit) as exit_:
        main(fill(command, places).split())
    out = capsys.readouterr()
    check_failure(out.out + out.err, code, exit_.value.code, [fill(w, places) for w in wanted], before, snapshot(places))


IN_A_PROCESS = ("train --epochs 0", "train --output {run}", "export {model} --opset 3")


@pytest.mark.parametrize("command, code, wanted", [r for r in ROWS if r[0] in IN_A_PROCESS],
                         ids=[r[0] for r in ROWS if r[0] in IN_A_PROCESS])
def test_the_installed_command_behaves_the_same(command, code, wanted, places, request):
    """A few rows through ``python -m hybridvit``: the real entry point, its own process."""
    places = with_run(command, places, request)
    before = snapshot(places)
    done = subprocess.run([sys.executable, "-m", "hybridvit", *fill(command, places).split()], capture_output=True,
                          text=True, cwd=places["tmp"],
                          env={**os.environ, "COLUMNS": "80"})  # a narrow terminal must not wrap the line
    check_failure(done.stdout + done.stderr, code, done.returncode, [fill(w, places) for w in wanted], before,
                  snapshot(places))


@pytest.mark.parametrize("error, code", [
    (HubUnreachableError("cannot reach https://huggingface.co for me/levit"), 4),
    (ConnectionError("cannot reach https://huggingface.co for me/levit"), 4),
    (ImportError("static int8 quantization needs onnx and onnxruntime: pip install hybridvit[export]"), 3),
    (FileNotFoundError("me/levit: no such file"), 2),
    (PermissionError("me/levit: permission denied"), 2),
    (ValueError("me/levit: not a model"), 2),
])
def test_each_kind_of_error_has_its_exit_code(error, code, monkeypatch, capsys):
    def load_source(*args, **kwargs):
        raise error

    monkeypatch.setattr("hybridvit.api.load_source", load_source)  # what export calls first
    with pytest.raises(SystemExit) as exit_:
        main(["export", "hf-hub:me/levit"])
    out = capsys.readouterr()
    assert exit_.value.code == code and out.err == f"error: {error}\n" and out.out == ""  # diagnostics: stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Errors that are not about the input (EXIT_CODES lists those that are) are not hidden."""
    monkeypatch.setattr("hybridvit.api.load_source", lambda *a, **k: {}["bug"])
    with pytest.raises(KeyError):
        main(["export", "hf-hub:me/levit"])


def test_unreadable_images_fail_alone(places, capsys):
    """predict: each unreadable file gets its error line (on standard error), the readable ones
    their results (on standard output), exit 1."""
    bad = Path(places["tmp"]) / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit) as exit_:
        main(["predict", places["model"], str(bad), places["image"]])
    out = capsys.readouterr()
    lines, errors = out.out.splitlines(), out.err.splitlines()
    assert exit_.value.code == 1
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(bad) in errors[0]
    assert lines[0] == places["image"] and len(lines) == 6  # its top-5 follow


def test_finished_and_unfinished_runs_are_kept_unless_asked(tmp_path):
    """The rule behind ``train --output``: resume or overwrite a run already there, never by default."""
    from hybridvit.train import TrainConfig

    run = tmp_path / "run"
    TrainConfig().check_output(run)  # absent: fine
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="holds an unfinished run: add --resume"):
        TrainConfig().check_output(run)
    (run / "model").mkdir()
    with pytest.raises(FileExistsError, match="holds a finished run"):
        TrainConfig().check_output(run)
    for allowed in (TrainConfig(resume="yes"), TrainConfig(resume="auto"), TrainConfig(overwrite=True)):
        allowed.check_output(run)


def test_existing_output_files_are_replaced(tmp_path):
    """Outputs follow torch.save and torch.onnx.export: an existing file is replaced, and checking
    it leaves it as it was."""
    from hybridvit.checks import check_output_file

    old = tmp_path / "model.onnx"
    old.write_bytes(b"old")
    stamp = old.stat().st_mtime_ns
    assert check_output_file(old) == old
    assert old.read_bytes() == b"old" and old.stat().st_mtime_ns == stamp
