"""The codecs of :mod:`aumai_fedtrain.compression`: what they keep, what they lose, their
bodies, error feedback, and the trainer that compresses a node's updates."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aumai_fedtrain import CompressionConfig, DiLoCoCoordinator, TrainingConfig, TrainingResult
from aumai_fedtrain.compression import (
    CODECS,
    Codec,
    CompressingTrainer,
    ErrorFeedback,
    compressing,
    decode,
    decode_body,
    encode,
    encode_body,
)
from aumai_fedtrain.providers import InProcessProvider
from aumai_fedtrain.simulation import (
    SimulationProvider,
    SimulationTrainer,
    initial_model,
    simulated_nodes,
)
from tests.helpers import CLI_TIMEOUT, run_cli

BLOCKWISE = ("int8", "int4", "e3m0")
FLOATS = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
HALF_FLOATS = st.floats(-6e4, 6e4, allow_nan=False, allow_infinity=False, width=32)


def arrays(elements: st.SearchStrategy[float] = FLOATS) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=40), elements=elements)


@given(values=arrays(), codec=st.sampled_from(CODECS), block=st.sampled_from([8, 64, 128]))
@example(values=np.array([1.4e-45]), codec="int8", block=8)  # its scale underflows float32
@settings(max_examples=100, deadline=None)
def test_decoding_gives_the_shape_and_dtype_within_the_codecs_error(
    values: np.ndarray, codec: str, block: int
) -> None:
    chosen = Codec(codec, block)  # type: ignore[arg-type]
    if codec == "fp16" and np.abs(values).max(initial=0.0) >= 65520:
        with pytest.raises(ValueError, match="beyond fp16's range"):
            encode(values, chosen)
        return

    decoded = decode(encode(values, chosen))

    assert decoded.shape == values.shape and decoded.dtype == values.dtype
    error = np.abs(decoded - values)
    if codec == "none":
        assert np.array_equal(decoded, values)
    elif codec == "fp16":
        assert np.array_equal(decoded, values.astype(np.float16).astype(np.float64))
    elif codec == "bf16":  # 8 significant bits, rounded: half a unit of the last place
        assert np.all(error <= np.abs(values.astype(np.float32)) * 2.0**-8 + 1e-38)
    else:
        flat, wrong = values.reshape(-1), error.reshape(-1)
        for start in range(0, flat.size, block):
            absmax = np.abs(flat[start : start + block]).max()
            # int8/int4: half a step of absmax/127 or absmax/7; e3m0: a quarter of absmax;
            # plus what a float32 scale cannot hold: a scale below its smallest subnormal
            # (2^-149) rounds to a multiple of it, up to 127 codes of that (2^-142 in all).
            bound = {"int8": absmax / 254, "int4": absmax / 14, "e3m0": absmax / 4}[codec]
            assert wrong[start : start + block].max() <= bound * (1 + 1e-6) + 2.0**-142


@pytest.mark.parametrize("codec", BLOCKWISE)
def test_a_block_keeps_its_largest_value_and_zeros(codec: str) -> None:
    values = np.array([0.0, -3.0, 1.5, 0.0, 2.0, -0.01, 0.0, 0.5] * 2)

    decoded = decode(encode(values, Codec(codec, 8)))  # type: ignore[arg-type]

    # the float32 scale (absmax / largest code) keeps absmax to float32's precision
    assert decoded[1] == pytest.approx(-3.0, rel=2**-23) and decoded[9] == decoded[1]
    assert np.all(decoded[values == 0.0] == 0.0)


def test_e3m0_rounds_to_the_nearest_power_of_two_of_the_blocks_scale() -> None:
    values = np.array([1.0, 0.74, 0.76, 0.3, 0.0078, 0.0079, -0.5, 2.0**-6])

    decoded = decode(encode(values, Codec("e3m0", 8)))

    assert decoded.tolist() == [1.0, 0.5, 1.0, 0.25, 0.0, 2.0**-6, -0.5, 2.0**-6]


def test_int4_codes_take_half_a_byte_and_scales_one_float32_per_block() -> None:
    values = np.random.default_rng(0).standard_normal(1001)

    encoded = encode(values, Codec("int4", 128))

    assert encoded.codes.nbytes == 501
    assert encoded.scales is not None and encoded.scales.dtype == np.float32
    assert encoded.scales.size == math.ceil(1001 / 128)


def test_float32_values_decode_to_float32() -> None:
    values = np.random.default_rng(1).standard_normal(300).astype(np.float32)

    for codec in CODECS:
        assert decode(encode(values, Codec(codec))).dtype == np.float32


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([1.0, np.nan]), "non-finite"),
        (np.array([1.0, np.inf]), "non-finite"),
        (np.array([1, 2]), "expected floats"),
    ],
)
def test_values_that_cannot_be_encoded_are_refused(values: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode(values, Codec("int8"))


@pytest.mark.parametrize(
    ("name", "block", "message"),
    [("int2", 128, "unknown codec 'int2'"), ("int8", 100, "power of two"), ("int4", 4, "from 8")],
)
def test_bad_codecs_are_named(name: str, block: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Codec(name, block)  # type: ignore[arg-type]


@given(
    values=st.lists(arrays(HALF_FLOATS), min_size=1, max_size=4),
    codec=st.sampled_from(CODECS),
)
@settings(max_examples=40, deadline=None)
def test_a_body_decodes_to_what_was_encoded(values: list[np.ndarray], codec: str) -> None:
    model = {f"t{i}": value for i, value in enumerate(values)}
    encoded = {key: encode(value, Codec(codec, 64)) for key, value in model.items()}  # type: ignore[arg-type]

    body = encode_body(encoded, {"node_id": "node-000"})
    decoded = decode_body(body, model)

    for key in model:
        assert np.array_equal(decode(decoded[key]), decode(encoded[key]))


def test_a_body_for_another_model_is_refused() -> None:
    model = {"w": np.zeros((10, 10))}
    body = encode_body({"w": encode(model["w"], Codec("int8"))}, {})

    with pytest.raises(ValueError, match="too short for tensor 'w'"):
        decode_body(body, {"w": np.zeros((20, 10))})
    with pytest.raises(ValueError, match="more values than the model"):
        decode_body(body, {"w": np.zeros((5, 10))})
    with pytest.raises(ValueError, match="too short"):
        decode_body(b"\x01", model)


def test_error_feedback_sends_what_was_lost_later() -> None:
    rng = np.random.default_rng(2)
    gradients = [{"w": rng.standard_normal(512)} for _ in range(20)]
    feedback = ErrorFeedback(Codec("int4", 128))

    sent = [decode(feedback.encode(g)["w"]) for g in gradients]

    # everything sent plus what is still held back is everything the node computed, exactly
    # up to the rounding of the additions
    total_sent, total = np.sum(sent, axis=0), np.sum([g["w"] for g in gradients], axis=0)
    assert np.allclose(total_sent + feedback.residual["w"], total, rtol=0, atol=1e-12)
    without = ErrorFeedback(Codec("int4", 128), enabled=False)
    plain = np.sum([decode(without.encode(g)["w"]) for g in gradients], axis=0)
    assert np.abs(total_sent - total).max() < np.abs(plain - total).max() / 3
    assert without.residual == {}


def factory(node_id: str, config: TrainingConfig) -> SimulationTrainer:
    return SimulationTrainer(node_id, config)


def test_the_residual_is_node_state_and_resumes_exactly(tmp_path: Path) -> None:
    config = TrainingConfig(num_nodes=3, global_rounds=4, local_steps=3, batch_size=8, seed=5)
    compressed = compressing(factory, Codec("int4", 64))

    def run(rounds: int, resume: bool) -> TrainingResult:
        provider = InProcessProvider(compressed, model_init=initial_model)
        return DiLoCoCoordinator().run_training(
            config.model_copy(update={"global_rounds": rounds}),
            simulated_nodes(3),
            provider,
            checkpoint_dir=str(tmp_path),
            resume=resume,
        )

    straight = DiLoCoCoordinator().run_training(
        config, simulated_nodes(3), InProcessProvider(compressed, model_init=initial_model)
    )
    run(2, resume=False)
    resumed = run(4, resume=True)

    assert straight.final_state is not None and resumed.final_state is not None
    expected, got = straight.final_state.parameters, resumed.final_state.parameters
    assert expected is not None and got is not None
    for key, value in expected.items():
        assert np.array_equal(value, got[key])


def test_a_compressing_trainer_returns_the_decoded_update_and_its_body_size() -> None:
    config = TrainingConfig(num_nodes=1, local_steps=2, batch_size=8)
    plain = SimulationTrainer("node-000", config)
    trainer = CompressingTrainer(SimulationTrainer("node-000", config), Codec("int8"), "node-000")
    start = initial_model(config)

    expected, loss, samples = plain.train(1, start)
    sent, sent_loss, sent_samples = trainer.train(1, start)

    assert (sent_loss, sent_samples) == (loss, samples)
    for key, value in expected.items():
        assert np.array_equal(sent[key], decode(encode(np.asarray(value), Codec("int8"))))
    assert 0 < trainer.last_body_bytes < sum(np.asarray(v).nbytes for v in expected.values()) / 7
    assert any(name.startswith("compression/residual/") for name in trainer.state_dict())


def test_the_compression_experiment_script_prints_its_table(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "compression_diloco.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--quick", "--seeds", "0", "--json", "out.json"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | test loss |")
    assert [row.split(" | ")[0] for row in rows[1:3]] == ["| float64 (none)", "| fp16"]
    results = json.loads((tmp_path / "out.json").read_text())
    by_name = {cell["variant"]: cell for cell in results}
    four_bit = by_name["int4, block 128, error feedback"]
    assert results[0]["variant"] == "float64 (none)"
    assert four_bit["upstream"][0] < results[0]["upstream"][0] / 5


def test_a_runs_compression_config_compresses_every_node_and_counts_compressed_bytes() -> None:
    plain = TrainingConfig(num_nodes=3, global_rounds=3, local_steps=3, batch_size=8, seed=2)
    config = plain.model_copy(update={"compression": CompressionConfig(codec="int4")})

    compressed = DiLoCoCoordinator().run_training(config, simulated_nodes(3), SimulationProvider())
    by_hand = DiLoCoCoordinator().run_training(
        plain,
        simulated_nodes(3),
        InProcessProvider(compressing(factory, Codec("int4")), model_init=initial_model),
    )
    uncompressed = DiLoCoCoordinator().run_training(plain, simulated_nodes(3), SimulationProvider())

    assert compressed.final_state is not None and by_hand.final_state is not None
    for key, value in by_hand.final_state.parameters.items():  # type: ignore[union-attr]
        assert np.array_equal(value, compressed.final_state.parameters[key])  # type: ignore[index]
    for record, reference in zip(compressed.history, uncompressed.history, strict=True):
        assert record.bytes_to_nodes == reference.bytes_to_nodes
        assert record.bytes_from_nodes * 10 < reference.bytes_from_nodes


def test_the_cli_compresses_on_request_and_names_bad_options() -> None:
    ran = run_cli("run", "--nodes", "3", "--rounds", "1", "--compression", "int8", "--json")
    refused = run_cli("run", "--nodes", "3", "--rounds", "1", "--compression-block", "100")

    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["bytes_from_nodes"] < 3 * 11018 * 8 / 5
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "Error: compression options: block_size: must be a power of two from 8 to 65536, got 100"
    )
