"""``conceptseg`` commands on files, and every bad-input kind ending in one clear line.

Run: .venv/bin/pytest tests/models/test_cli.py -q
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conceptseg.cli import main
from conceptseg.samples import sample_references, sample_target


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    sample_target().save(d / "target.png")
    for i, ref in enumerate(sample_references()):
        ref.image.save(d / f"ref{i}.png")
    (d / "broken.png").write_bytes(b"not an image at all")
    Image.new("L", (320, 240)).save(d / "empty_mask.png")
    mask = np.zeros((240, 320), np.uint8)
    mask[40:120, 40:150] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d


def test_segment_writes_mask_and_json(tiny_weights, files, tmp_path, capsys):
    out = tmp_path / "res" / "r"
    code = main(
        [
            "segment",
            "--weights",
            str(tiny_weights),
            "--image",
            str(files / "target.png"),
            "--prompt",
            "the mug with a handle on the table",
            "--max-new-tokens",
            "8",
            "--ref",
            f"{files / 'ref0.png'}:{files / 'mask.png'}",
            "--ref",
            f"{files / 'ref1.png'}:60,40,180,136",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "res" / "r.json").read_text())
    assert (
        result["route"] == "reason"
        and result["tokens"] == 8
        and result["mask_size_hw"] == [480, 640]
    )
    assert {"mllm", "sam3_image", "ctm"} <= set(result["timings_ms"]) and result["versions"][
        "synthetic_weights"
    ]
    assert Image.open(tmp_path / "res" / "r.png").size == (640, 480)
    assert "synthetic" in capsys.readouterr().out


def _error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--image", "{d}/missing.png"], "--image: {d}/missing.png does not exist"),
        (["--image", "{d}/broken.png"], "--image: cannot read {d}/broken.png as an image"),
        (["--prompt", "   "], "prompt: empty"),
        (["--ref", "{d}/ref0.png:1,2,3"], "--ref #1: box '1,2,3' must be four numbers"),
        (["--ref", "{d}/ref0.png:a,b,c,d"], "--ref #1: box 'a,b,c,d' must be four numbers"),
        (
            ["--ref", "{d}/ref0.png:nan,1,5,5"],
            r"references[0]: box (nan, 1.0, 5.0, 5.0) must be 4 finite numbers",
        ),
        (
            ["--ref", "{d}/ref0.png:0,0,999,10"],
            "references[0]: box [0.0, 0.0, 999.0, 10.0] must satisfy",
        ),
        (["--ref", "{d}/ref0.png:{d}/empty_mask.png"], "references[0]: mask is empty"),
        (["--ref", "nocolon"], "--ref #1: 'nocolon' must be IMG:x1,y1,x2,y2"),
        (["--ref", "{d}/ref0.png:1,1,5,5"] * 5, "references: got 5; give 0 to 4 references"),
        (["--max-new-tokens", "99999"], "max_new_tokens <= max_length"),
    ],
)
def test_bad_input(tiny_weights, files, tmp_path, capsys, extra, expected):
    argv = [
        "segment",
        "--weights",
        str(tiny_weights),
        "--image",
        str(files / "target.png"),
        "--prompt",
        "mug",
        "--out",
        str(tmp_path / "x"),
    ]
    for i in range(0, len(extra), 2):  # later flags override, --ref appends
        if extra[i] != "--ref" and extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1].format(d=files)
        else:
            argv += [extra[i], extra[i + 1].format(d=files)]
    assert expected.format(d=files) in _error(argv, capsys)


def test_zero_size_image(tiny_weights, tmp_path, capsys):
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)  # a PNG header claiming 0x0 pixels
    chunk = b"IHDR" + ihdr
    png = (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )
    (tmp_path / "zero.png").write_bytes(png)
    argv = [
        "segment",
        "--weights",
        str(tiny_weights),
        "--image",
        str(tmp_path / "zero.png"),
        "--prompt",
        "mug",
        "--out",
        str(tmp_path / "x"),
    ]
    err = _error(argv, capsys)
    assert "--image:" in err and ("zero size" in err or "cannot read" in err)


@pytest.mark.parametrize(
    "weights, expected", [("{t}/none", "is not a directory"), ("{t}", "lacks config.json")]
)
def test_missing_or_wrong_checkpoints(files, tmp_path, capsys, weights, expected):
    (tmp_path / "mllm").mkdir()
    argv = [
        "segment",
        "--weights",
        weights.format(t=tmp_path),
        "--image",
        str(files / "target.png"),
        "--prompt",
        "mug",
        "--out",
        str(tmp_path / "x"),
    ]
    assert expected in _error(argv, capsys)


def test_installed_entry_point_reports_errors(files):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "conceptseg.cli",
            "segment",
            "--weights",
            "/nonexistent",
            "--image",
            str(files / "target.png"),
            "--prompt",
            "mug",
            "--out",
            "/tmp/x",
        ],
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: --weights")
        and "Traceback" not in proc.stderr
    )


def test_segment_stream_prints_the_reasoning_text_to_stderr(tiny_weights, files, tmp_path, capsys):
    argv = ["segment", "--weights", str(tiny_weights), "--image", str(files / "target.png"),
            "--prompt", "mug", "--no-router", "--max-new-tokens", "6", "--stream",
            "--out", str(tmp_path / "s")]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["route"] == "reason" and captured.err == result["text"] + "\n"
    assert captured.out.startswith("{") and '"route": "reason"' in captured.out  # the summary


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--parts", "sam3_vision,mllm2"], "--parts: unknown ['mllm2']"),
        (["--parts", "mllm", "--mllm-precisions", "int8"], "--mllm-precisions: got 'int8'"),
        (["--mllm-precisions", ","], "--mllm-precisions: got ','"),
    ],
)
def test_export_rejects_unknown_parts_and_precisions(
    tiny_weights, tmp_path, capsys, extra, expected
):
    argv = ["export", "--weights", str(tiny_weights), "--out", str(tmp_path / "engines"), *extra]
    assert expected in _error(argv, capsys)
    assert not (tmp_path / "engines" / "manifest.json").exists()  # refused before any export
