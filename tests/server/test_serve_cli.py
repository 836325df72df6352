"""``conceptseg client`` against the session's server, and ``conceptseg serve`` started, asked
and stopped with Ctrl-C (SIGINT) as a person would (that server runs the ort-genai MLLM).

Run: .venv/bin/pytest tests/server/test_serve_cli.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conceptseg.cli import main
from conceptseg.samples import sample_references, sample_target


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("client")
    sample_target().save(d / "target.png")
    sample_target().save(d / "target.jpg", quality=95)
    for i, ref in enumerate(sample_references()):
        ref.image.save(d / f"ref{i}.png")
    return d


def test_client_writes_the_segment_outputs(triton, files, tmp_path, capsys):
    ref = f"{files / 'ref1.png'}:60,40,180,136"
    prefix = tmp_path / "out" / "r"
    url = triton.cfg.urls["grpc"]
    argv = [
        "client",
        "--url",
        f"grpc://{url}",
        "--image",
        str(files / "target.jpg"),
        "--prompt",
        "mug",
    ]
    assert main([*argv, "--ref", ref, "--mask-format", "rle", "--out", str(prefix)]) == 0
    result = json.loads((tmp_path / "out" / "r.json").read_text())
    assert (tmp_path / "out" / "r.png").exists() and result["mask_size_hw"] == [480, 640]
    assert {"route", "presence", "threshold", "answer", "bbox", "check", "timings_ms"} <= set(
        result
    )
    assert "mask: " in capsys.readouterr().out


def test_client_rejected_request_exits_2_with_the_servers_message(triton, files, tmp_path, capsys):
    argv = ["client", "--url", triton.cfg.urls["http"], "--image", str(files / "target.png")]
    code = main([*argv, "--prompt", "   ", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: server: prompt: empty"), err
    assert "Traceback" not in err and not (tmp_path / "r.json").exists()


def test_client_unreachable_server_is_one_line(files, tmp_path, capsys):
    from conceptseg.serving.server import free_port

    argv = ["client", "--url", f"127.0.0.1:{free_port()}", "--image", str(files / "target.png")]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--prompt", "mug", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.startswith("error: ") and "Traceback" not in err, err


def test_serve_starts_answers_and_stops_on_ctrl_c(tiny_weights, tiny_engines, triton):
    from conceptseg.build import build_pipeline
    from conceptseg.client import Client
    from conceptseg.config import from_name
    from conceptseg.samples import sample_request
    from conceptseg.serving.server import free_port

    ports = [str(free_port()) for _ in range(3)]
    command = [sys.executable, "-m", "conceptseg.cli", "serve", "--engines", str(tiny_engines)]
    command += ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    command += ["--mllm-backend", "ort-genai", "--preset", "test", "--max-new-tokens", "8"]
    # Ctrl-C as in a terminal: a runner started in the background by a shell without job control
    # passes SIGINT down ignored, and Python keeps an ignored SIGINT ignored
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            lines.append(process.stdout.readline())
            if lines[-1].startswith("ready:"):
                break
        assert lines and lines[-1].startswith("ready:"), "".join(lines)
        assert (
            f"HTTP 127.0.0.1:{ports[0]}" in lines[-1] and f"gRPC 127.0.0.1:{ports[1]}" in lines[-1]
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/models/conceptseg/ready") as r:
            assert r.status == 200
        config = from_name("test", max_new_tokens=8)
        request = sample_request()
        expected = build_pipeline(
            tiny_weights,
            backend="onnxruntime",
            mllm_backend="ort-genai",
            engines=tiny_engines,
            config=config,
        ).run(request)
        with Client(f"127.0.0.1:{ports[1]}", protocol="grpc") as client:
            refs = [(r.image, r.box) for r in request.references]
            served = client.segment(request.image, request.question, refs)
        assert served.result["route"] == "reason" and served.result["text"] == expected.text
        assert int((served.mask != expected.mask).sum()) <= expected.mask.size // 10_000
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, out
        assert "stopped (exit status 0)" in out and "Traceback" not in out, out
    finally:
        if process.poll() is None:  # stop it as a person would; its server dies with it anyway
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


def test_every_address_is_loopback_unless_asked(tmp_path):
    from conceptseg.serving.server import ServeConfig, _command

    cfg = ServeConfig(engines=tmp_path)
    command = _command(cfg, tmp_path / "bin", tmp_path, tmp_path, "k", "p_")
    addresses = [a for a in command if "-address=" in a]
    assert addresses == [f"--{k}-address=127.0.0.1" for k in ("http", "grpc", "metrics")]
    assert "--model-control-mode=explicit" in command and "--load-model=*" in command
    restricted = [a for a in command if "-restricted-" in a]
    assert len(restricted) == 2 and all(a.endswith(":conceptseg-api-key=k") for a in restricted)
    assert "--backend-config=python,shm-region-prefix-name=p_" in command
    other = _command(
        ServeConfig(engines=tmp_path, host="0.0.0.0"), tmp_path, tmp_path, tmp_path, "k", "p_"
    )
    assert "--http-address=0.0.0.0" in other, "an explicit --host binds elsewhere"


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [("mllm_slots", -1, "--mllm-slots"), ("mllm_queue", -2, "--mllm-queue"),
     ("mllm_prefill_chunk", 0, "--mllm-prefill-chunk")],  # fmt: skip
)
def test_bad_mllm_numbers_name_their_flag(tiny_engines, tmp_path, field, value, flag):
    from conceptseg.serving.server import ServeConfig, Server
    from conceptseg.types import RequestError

    server = Server(ServeConfig(engines=tiny_engines, **{field: value}))
    try:
        with pytest.raises(RequestError, match=f"{flag}.*>= "):
            server.prepare()
    finally:
        shutil.rmtree(server.workdir, ignore_errors=True)
