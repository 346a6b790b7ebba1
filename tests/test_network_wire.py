"""Wire formats, signatures, secrets and nodes files of the network layer (no processes)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from aumai_fedtrain import LocalUpdate
from aumai_fedtrain.network import (
    JSON,
    SAFETENSORS,
    NodesFileError,
    SecretError,
    TrainRequest,
    WireError,
    load_nodes_file,
    load_secret,
    read_nodes_file,
    sign_update,
    verify_update,
)
from aumai_fedtrain.network.auth import check_nonce, sign_request, tokens_equal, verify_request
from aumai_fedtrain.network.wire import (
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    ModelMismatchError,
    TensorShape,
    decode_nonce,
    decode_request,
    decode_update,
    encode_request,
    encode_update,
    expected_tensors,
    max_update_bytes,
    request_body_bytes,
    response_media_type,
)

KEY = b"k" * 40
# Floats whose text forms are tricky: subnormal, negative zero, huge, tiny, long digits.
AWKWARD = np.array([5e-324, -0.0, 1e16, 1e-05, 0.1 + 0.2, -1.7976931348623157e308, 3.0])


def make_update(**changes: object) -> LocalUpdate:
    fields: dict[str, object] = {
        "node_id": "node-ä",
        "round_id": 3,
        "gradients": {"w": AWKWARD.reshape(7, 1), "b": np.array(0.25), "e": np.zeros(0)},
        "loss": 0.1 + 0.7,
        "samples_used": 320,
    }
    return LocalUpdate.model_validate({**fields, **changes})


@pytest.mark.parametrize("fmt", [JSON, SAFETENSORS])
def test_updates_round_trip_exactly(fmt: str) -> None:
    update = make_update()

    decoded = decode_update(encode_update(update, fmt), fmt + "; charset=utf-8")

    assert decoded == update
    assert decoded.gradients["w"].shape == (7, 1) and decoded.gradients["b"].shape == ()
    assert decoded.gradients["w"].tobytes() == update.gradients["w"].tobytes()  # -0.0 kept


@pytest.mark.parametrize("fmt", [JSON, SAFETENSORS])
def test_requests_round_trip_exactly(fmt: str) -> None:
    request = TrainRequest(round_id=2, global_weights={"w": AWKWARD, "m": np.eye(3)})

    decoded = decode_request(encode_request(request, fmt), fmt)

    assert decoded.round_id == 2
    assert decoded.global_weights.keys() == {"w", "m"}
    for key, value in request.global_weights.items():
        assert decoded.global_weights[key].tobytes() == value.tobytes()


def test_the_guides_json_request_is_accepted() -> None:
    empty = decode_request(b'{"round_id": 1, "global_weights": {}}', JSON)
    nested = decode_request(b'{"round_id": 4, "global_weights": {"w": [[1, 2], [3, 4]]}}', JSON)

    assert empty.round_id == 1 and empty.global_weights == {}
    assert nested.global_weights["w"].dtype == np.float64
    assert nested.global_weights["w"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_safetensors_bodies_keep_each_tensor_dtype() -> None:
    # Prepare: a model of float32, float16 and float64 tensors (safetensors lays them out
    # widest first, then by name, which the computed size must follow)
    weights = {
        "a.w": np.array([[0.1, -2.5]], dtype=np.float32),
        "b.h": np.array([1e-3, 65504.0, -0.0], dtype=np.float16),
        "c.d": np.array([0.1 + 0.2]),
        "z.w": np.arange(5, dtype=np.float32),
    }
    request = TrainRequest(round_id=7, global_weights=weights)

    # Execute
    body = encode_request(request, SAFETENSORS)
    decoded = decode_request(body, SAFETENSORS)

    # Assert: the same dtypes and bytes both ways, and the size computed without the body
    header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])
    assert {name: header[name]["dtype"] for name in weights} == {
        "a.w": "F32", "b.h": "F16", "c.d": "F64", "z.w": "F32"
    }  # fmt: skip
    for name, value in weights.items():
        assert decoded.global_weights[name].dtype == value.dtype
        assert decoded.global_weights[name].tobytes() == value.tobytes()
    assert len(body) == request_body_bytes(7, expected_tensors(weights))


def test_a_float32_models_bodies_are_about_half_a_float64_models() -> None:
    # Prepare
    weights64 = {"w": np.linspace(-1.0, 1.0, 10_000).reshape(100, 100), "b": np.zeros(100)}
    weights32 = {name: value.astype(np.float32) for name, value in weights64.items()}
    update = make_update(gradients=weights32)

    # Execute
    sizes = [len(encode_request(TrainRequest(round_id=1, global_weights=w), SAFETENSORS))
             for w in (weights64, weights32)]  # fmt: skip
    body = encode_update(update, SAFETENSORS)

    # Assert
    assert sizes[1] - sizes[0] / 2 < 200  # the header is the same size; the values half
    assert len(body) <= max_update_bytes(expected_tensors(weights32), SAFETENSORS)
    assert max_update_bytes(expected_tensors(weights32), SAFETENSORS) < max_update_bytes(
        expected_tensors(weights64), SAFETENSORS
    )
    decoded = decode_update(body, SAFETENSORS, expected_tensors(weights32))
    assert decoded == update and decoded.gradients["w"].dtype == np.float32


def request_body(**metadata: str) -> bytes:
    return save({"w": np.zeros(2)}, metadata=metadata)


REQUEST_METADATA = {"aumai-fedtrain": "train-request/1", "round_id": "1"}


def handmade_safetensors(
    metadata: dict[str, str], dtype: str, shape: list[int], data_bytes: int
) -> bytes:
    """A body with one tensor ``w`` of zero bytes, written by hand (``save`` refuses odd ones)."""
    tensor = {"dtype": dtype, "shape": shape, "data_offsets": [0, data_bytes]}
    text = json.dumps({"__metadata__": metadata, "w": tensor}).encode()
    return len(text).to_bytes(8, "little") + text + bytes(data_bytes)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "needle"),
    [
        (b"{}", "text/plain", 415, "unsupported content type 'text/plain'"),
        (b"{}", "", 415, "(none)"),
        (b"{", JSON, 400, "Invalid JSON"),
        (b'{"round_id": 1, "extra": 2}', JSON, 400, "unknown key 'extra'"),
        (b'{"round_id": -1}', JSON, 400, "round_id"),
        (b'{"round_id": 1, "global_weights": {"w": ["a"]}}', JSON, 400, "global_weights.w"),
        (b'{"round_id": 1, "global_weights": {"w": [[1], [2, 3]]}}', JSON, 400, "rectangular"),
        (b"not safetensors", SAFETENSORS, 400, "malformed safetensors body"),
        (request_body(round_id="1"), SAFETENSORS, 400, "is not a train-request/1"),
        (
            request_body(**{"aumai-fedtrain": "local-update/1"}),
            SAFETENSORS,
            400,
            "is not a train-request/1",
        ),
        (request_body(**{"aumai-fedtrain": "train-request/1"}), SAFETENSORS, 400, "'round_id'"),
        (
            request_body(**{"aumai-fedtrain": "train-request/1", "round_id": "one"}),
            SAFETENSORS,
            400,
            "round_id",
        ),
        (
            handmade_safetensors(REQUEST_METADATA, "F64", [1] * 65, 8),  # NumPy's limit is 64
            SAFETENSORS,
            400,
            "malformed safetensors body",
        ),
        (
            handmade_safetensors(REQUEST_METADATA, "F64", [0, 2**62], 0),  # too large for NumPy
            SAFETENSORS,
            400,
            "malformed safetensors body",
        ),
    ],
)
def test_bad_requests_are_named(body: bytes, content_type: str, status: int, needle: str) -> None:
    with pytest.raises(WireError) as caught:
        decode_request(body, content_type)

    assert caught.value.status == status
    assert needle in str(caught.value)


def test_bad_binary_updates_are_named() -> None:
    metadata = {
        "aumai-fedtrain": "local-update/1",
        "node_id": "a",
        "round_id": "1",
        "loss": "nan",
        "samples_used": "3",
    }
    body = encode_update(make_update(), SAFETENSORS)

    with pytest.raises(WireError, match="invalid update: loss"):
        decode_update(save({"w": np.zeros(2)}, metadata=metadata), SAFETENSORS)
    with pytest.raises(WireError, match="malformed safetensors body"):
        decode_update(body[:-1], SAFETENSORS)


def test_unsupported_dtypes_and_reserved_names_are_refused() -> None:
    body = handmade_safetensors(REQUEST_METADATA, "BF16", [1], 2)

    with pytest.raises(WireError, match="unsupported safetensors dtype"):
        decode_request(body, SAFETENSORS)
    with pytest.raises(WireError, match="reserved"):
        encode_request(
            TrainRequest(round_id=1, global_weights={"__metadata__": [1.0]}), SAFETENSORS
        )


def test_the_response_format_follows_the_accept_header() -> None:
    assert response_media_type(None) == JSON
    assert response_media_type("*/*") == JSON
    assert response_media_type("application/json") == JSON
    assert response_media_type(f"application/json;q=0.5, {SAFETENSORS}") == SAFETENSORS


def stdlib_signature(key: bytes, update: LocalUpdate, nonce: str) -> str:
    """The documented signature (version 2), recomputed with the standard library only."""
    layout = b"aumai-fedtrain/wire-digest/v1\n" + struct.pack("<Q", len(update.gradients))
    for name in sorted(update.gradients):
        value = update.gradients[name]
        layout += struct.pack("<Q", len(name)) + name.encode("utf-8")
        layout += struct.pack("<Q", 3) + b"F64"
        layout += struct.pack(f"<Q{value.ndim}Q", value.ndim, *value.shape)
        layout += struct.pack("<Q", value.nbytes) + value.astype("<f8").tobytes()
    message = {
        "v": 2,
        "node_id": update.node_id,
        "round_id": update.round_id,
        "samples_used": update.samples_used,
        "loss": update.loss,
        "gradients_wire_sha256": hashlib.sha256(layout).hexdigest(),
        "nonce": nonce,
    }
    text = json.dumps(message, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return "v2=" + hmac.new(key, text, hashlib.sha256).hexdigest()


def test_the_signature_is_the_documented_hmac() -> None:
    update = make_update()

    signature = sign_update(KEY, update, "00ff")

    assert signature == stdlib_signature(KEY, update, "00ff")
    assert verify_update(KEY, update, signature, "00ff")
    assert verify_update(KEY, update, f"  {signature.upper()}\n", "00ff")


def tampered_w() -> dict[str, np.ndarray]:
    w = AWKWARD.reshape(7, 1).copy()
    w[6, 0] = np.nextafter(w[6, 0], np.inf)  # the smallest possible change
    return {"w": w, "b": np.array(0.25), "e": np.zeros(0)}


@pytest.mark.parametrize(
    "changes",
    [
        {"node_id": "node-b"},
        {"round_id": 4},
        {"samples_used": 321},
        {"loss": np.nextafter(0.1 + 0.7, 1.0)},
        {"gradients": tampered_w()},
        {"gradients": {"w": AWKWARD.reshape(7, 1), "b": np.array(0.25)}},
    ],
)
def test_any_change_breaks_the_signature(changes: dict[str, object]) -> None:
    signature = sign_update(KEY, make_update(), "00ff")

    assert not verify_update(KEY, make_update(**changes), signature, "00ff")


def test_the_signature_binds_the_key_and_the_nonce() -> None:
    update = make_update()
    signature = sign_update(KEY, update, "00ff")

    assert not verify_update(b"x" * 40, update, signature, "00ff")
    assert not verify_update(KEY, update, signature, "00fe")
    assert not verify_update(KEY, update, "", "00ff")
    assert not verify_update(KEY, update, "é" * 64, "00ff")


def test_the_request_signature_is_the_documented_hmac() -> None:
    body = b'{"round_id": 4}'
    digest = hashlib.sha256(body).hexdigest()
    message = (
        f'{{"body_sha256":"{digest}","kind":"train-request","node_id":"node-a",'
        '"node_nonce":"nn","nonce":"","round_id":4,"v":1}'
    ).encode()
    expected = hmac.new(KEY, message, hashlib.sha256).hexdigest()
    request = (KEY, "node-a", 4, "nn", "", digest)
    other_body = hashlib.sha256(body + b" ").hexdigest()
    changed = [
        (b"x" * 40, "node-a", 4, "nn", "", digest),
        (KEY, "node-b", 4, "nn", "", digest),
        (KEY, "node-a", 5, "nn", "", digest),
        (KEY, "node-a", 4, "nm", "", digest),
        (KEY, "node-a", 4, "nn", "00", digest),
        (KEY, "node-a", 4, "nn", "", other_body),
    ]

    assert sign_request(*request) == expected
    assert verify_request(*request, f" {expected.upper()}\n")
    assert not any(verify_request(*fields, expected) for fields in changed)
    assert not verify_request(*request, "é" * 64)


@pytest.mark.parametrize("fmt", [JSON, SAFETENSORS])
def test_any_parser_failure_on_a_body_is_a_wire_error(fmt: str) -> None:
    nested = b'{"a":' + b"[" * 20000 + b"]" * 20000 + b"}"
    bodies = {
        JSON: b'{"round_id": 1, "global_weights": {"w": ' + b"[" * 20000 + b"]" * 20000 + b"}}",
        SAFETENSORS: len(nested).to_bytes(8, "little") + nested,
    }

    with pytest.raises(WireError) as request:
        decode_request(bodies[fmt], fmt)
    with pytest.raises(WireError) as update:
        decode_update(bodies[fmt], fmt)

    assert request.value.status == update.value.status == 400
    needle = "recursion limit exceeded" if fmt == JSON else "(header: RecursionError: maximum"
    assert needle in str(request.value) and needle in str(update.value)


def test_nonce_answers_are_checked() -> None:
    assert decode_nonce(b'{"nonce": "%s"}' % (b"0f" * 16)) == "0f" * 16
    for bad in (b'{"nonce": "XYZ"}', b'{"nonce": 1}', b"[", b'{"nonce": "' + b"0" * 130 + b'"}'):
        with pytest.raises(WireError, match="invalid nonce answer"):
            decode_nonce(bad)


def test_nonces_are_short_lowercase_hex() -> None:
    assert check_nonce("") == ""
    assert check_nonce("0a" * 64) == "0a" * 64
    for bad in ("0a" * 64 + "0", "XYZ", "00 ff"):
        with pytest.raises(ValueError, match="hex"):
            check_nonce(bad)


def test_secrets_are_read_stripped_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.key"
    good.write_text("  " + "ab" * 16 + "\n")
    short = tmp_path / "short.key"
    short.write_text("tooshort\n")

    assert load_secret(good) == b"ab" * 16
    assert tokens_equal("ab" * 16, b"ab" * 16)
    assert not tokens_equal("ab" * 15 + "ac", b"ab" * 16)
    with pytest.raises(
        SecretError, match=r"key file .*short\.key.* has 8 characters; use at least 32"
    ):
        load_secret(short)
    with pytest.raises(SecretError, match=r"cannot read token file .*missing.*No such file"):
        load_secret(tmp_path / "missing", "token")


def write_nodes(folder: Path, entries: object) -> Path:
    path = folder / "nodes.json"
    path.write_text(json.dumps(entries))
    return path


def test_nodes_files_give_nodes_and_keys(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "b.key").write_text("b" * 64 + "\n")
    path = write_nodes(
        tmp_path,
        [
            {"node_id": "a", "address": "10.0.0.1:8750", "key": "a" * 32},
            {
                "node_id": "b",
                "address": "https://b.example:8750/fed",
                "key_file": "keys/b.key",
                "capabilities": {"gpu": True},
            },
        ],
    )

    nodes, keys = load_nodes_file(path)

    assert [(n.node_id, n.address) for n in nodes] == [
        ("a", "10.0.0.1:8750"),
        ("b", "https://b.example:8750/fed"),
    ]
    assert nodes[1].capabilities == {"gpu": True}
    assert keys == {"a": b"a" * 32, "b": b"b" * 64}


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ({"node_id": "a"}, "Input should be a valid array"),
        ([], "it lists no node"),
        ([{"node_id": "a", "key": "a" * 32}], "entry 0: address: Field required"),
        (
            [{"node_id": "a", "address": "h:1", "key": "a" * 32, "port": 1}],
            "entry 0: unknown key 'port'",
        ),
        ([{"node_id": "a", "address": "h:1"}], "entry 0 ('a'): give exactly one of"),
        (
            [{"node_id": "a", "address": "h:1", "key": "a" * 32, "key_file": "k"}],
            "give exactly one of 'key' and 'key_file'",
        ),
        ([{"node_id": "a", "address": "h:1", "key": "short"}], "key has 5 characters"),
        ([{"node_id": "a", "address": "h:1", "key_file": "none.key"}], "cannot read key file"),
        (
            [
                {"node_id": "a", "address": "h:1", "key": "a" * 32},
                {"node_id": "a", "address": "h:2", "key": "b" * 32},
            ],
            "entry 1 ('a'): duplicate node id",
        ),
    ],
)
def test_bad_nodes_files_are_named(tmp_path: Path, entries: object, needle: str) -> None:
    path = write_nodes(tmp_path, entries)

    with pytest.raises(NodesFileError) as caught:
        load_nodes_file(path)

    assert str(caught.value).startswith(f"invalid nodes file {str(path)!r}: ")
    assert needle in str(caught.value)


def test_unreadable_and_non_json_nodes_files_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("[{")

    with pytest.raises(NodesFileError, match=r"cannot read nodes file .*No such file"):
        load_nodes_file(tmp_path / "absent.json")
    with pytest.raises(NodesFileError, match="Invalid JSON"):
        load_nodes_file(broken)


MODEL_SHAPES = {"w": (7, 1), "b": (), "e": (0,)}
FLOAT32_MODEL = {**MODEL_SHAPES, "w": TensorShape((7, 1), "F32")}


def test_honest_updates_fit_the_bound_of_their_model() -> None:
    longest = np.full((7, 1), -1.7976931348623157e308)  # the longest text a float64 has
    update = make_update(gradients={"w": longest, "b": np.array(-2.2250738585072014e-308),
                                    "e": np.zeros(0)})  # fmt: skip

    for fmt in (JSON, SAFETENSORS):
        body = encode_update(update, fmt)
        assert len(body) <= max_update_bytes(MODEL_SHAPES, fmt)
        assert decode_update(body, fmt, MODEL_SHAPES) == update


def many_tensors(count: int) -> bytes:
    metadata = {"aumai-fedtrain": "local-update/1", "node_id": "a", "round_id": "1",
                "loss": "1.0", "samples_used": "1"}  # fmt: skip
    header: dict[str, object] = {"__metadata__": metadata}
    empty = {"dtype": "F64", "shape": [0], "data_offsets": [0, 0]}
    header.update({f"t{i}": empty for i in range(count)})
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


def test_safetensors_headers_are_bounded_before_anything_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import safetensors.numpy

    def no_decoding(body: bytes) -> None:
        raise AssertionError("decoded a refused body")

    monkeypatch.setattr(safetensors.numpy, "load", no_decoding)
    huge = json.dumps({"__metadata__": {"x": "y" * MAX_HEADER_BYTES}}).encode()
    cases = [
        (many_tensors(MAX_TENSORS + 1), None, f"holds {MAX_TENSORS + 1} tensors, more than "),
        (len(huge).to_bytes(8, "little") + huge, None, "exceeds the limit of 16777216 bytes"),
        (many_tensors(4), MODEL_SHAPES, "holds 4 tensors, more than 3"),
        (many_tensors(2), MODEL_SHAPES, "does not match the model: missing keys ['b', 'e',"),
    ]
    body = encode_update(make_update(), SAFETENSORS)
    wrong_shape = {**MODEL_SHAPES, "w": (1, 7)}
    float32 = save({"w": np.zeros((7, 1), np.float32), "b": np.zeros(()), "e": np.zeros(0)},
                   metadata={"aumai-fedtrain": "local-update/1"})  # fmt: skip
    mismatches = [
        (body, wrong_shape, "gradient 'w' has shape (7, 1), the model's is (1, 7)"),
        (float32, MODEL_SHAPES, "tensor 'w' has dtype 'F32'; this model's updates carry F64"),
        (body, FLOAT32_MODEL, "tensor 'w' has dtype 'F64'; this model's updates carry F32"),
    ]
    for data, expected, needle in cases:
        with pytest.raises(WireError, match=re.escape(needle)):
            decode_update(data, SAFETENSORS, expected)
    for data, expected, needle in mismatches:
        with pytest.raises(ModelMismatchError, match=re.escape(needle)):
            decode_update(data, SAFETENSORS, expected)


def test_json_updates_with_more_numbers_than_the_model_are_refused_unparsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fields = '"node_id": "a", "round_id": 1, "loss": 1.0, "samples_used": 1'
    numbers = "[" + ", ".join(["0"] * 1000) + "]"
    nested = "[" + ", ".join(["[0]"] * 100) + "]"
    honest = encode_update(make_update(), JSON)

    def no_parsing(data: bytes) -> None:
        raise AssertionError("parsed a refused body")

    for gradients in (numbers, nested):
        body = f'{{{fields}, "gradients": {{"w": {gradients}}}}}'.encode()
        with (
            pytest.raises(WireError, match="an update of the model has 9 lists of 8 numbers"),
            monkeypatch.context() as patch,
        ):
            patch.setattr(LocalUpdate, "model_validate_json", no_parsing)
            decode_update(body, JSON, MODEL_SHAPES)
    assert decode_update(honest, JSON, MODEL_SHAPES) == make_update()


def test_secret_files_readable_by_others_or_with_little_entropy_are_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    readable = tmp_path / "readable.key"
    readable.write_text("ab" * 32)
    readable.chmod(0o644)
    weak = tmp_path / "weak.key"
    weak.write_text("0123456789abcdef" * 2)  # 32 hex characters: 16 bytes
    weak.chmod(0o600)
    strong = tmp_path / "strong.key"
    strong.write_text("ab" * 32)
    strong.chmod(0o600)
    text = tmp_path / "text.key"
    text.write_text("correct horse battery staple, etc")  # 33 characters: ~33 bytes
    text.chmod(0o600)
    caplog.set_level(logging.WARNING, logger="aumai_fedtrain.network")

    for path in (readable, weak, strong, text, readable, weak):
        load_secret(path)

    assert [record.getMessage() for record in caplog.records] == [
        f"key file {str(readable)!r} may be read by group or others (mode -rw-r--r--); "
        f"run: chmod 600 {str(readable)!r}",
        f"key file {str(weak)!r} holds about 16 bytes of entropy; use at least 32 "
        "(e.g. the output of: openssl rand -hex 32)",
    ]


def test_nodes_files_give_per_node_tokens_and_sample_bounds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.token").write_text("t" * 40)
    (tmp_path / "a.token").chmod(0o600)
    path = write_nodes(
        tmp_path,
        [
            {"node_id": "a", "address": "h:1", "key": "a" * 32, "token_file": "a.token",
             "max_samples": 640},
            {"node_id": "b", "address": "h:2", "key": "b" * 64, "token": "u" * 32},
            {"node_id": "c", "address": "h:3", "key": "c" * 32},
        ],
    )  # fmt: skip
    path.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="aumai_fedtrain.network")

    listed = read_nodes_file(path)

    assert listed.tokens == {"a": b"t" * 40, "b": b"u" * 32}
    assert [node.max_samples for node in listed.nodes] == [640, None, None]
    assert listed.keys == {"a": b"a" * 32, "b": b"b" * 64, "c": b"c" * 32}
    warning = caplog.records[0].getMessage()
    assert warning.startswith(f"nodes file {str(path)!r} (it holds secrets) may be read by group")
    both = {"node_id": "a", "address": "h:1", "key": "a" * 32, "token": "t" * 32,
            "token_file": "a.token"}  # fmt: skip
    with pytest.raises(NodesFileError, match="give exactly one of 'token' and 'token_file'"):
        read_nodes_file(write_nodes(tmp_path, [both]))
