"""Encoded updates in the streamed mean: ``WeightedSum.fold_encoded`` on both backends is, bit
for bit, ``fold`` of the decoded updates in any interleaving with plain folds; screening an
:class:`EncodedUpdate` from its codes and scales gives the outcome of screening its decoded
values (hostile scales and codes included); the spool keeps codes and scales, never decoded
values; the coordinator folds encoded updates with ``fold_encoded``."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, LocalUpdate, TrainingConfig
from aumai_fedtrain.backend import get_backend
from aumai_fedtrain.compression import (
    Codec,
    Encoded,
    EncodedUpdate,
    decode,
    encode,
    max_abs_encoded,
)
from aumai_fedtrain.models import CompressionConfig
from aumai_fedtrain.providers.base import Arrivals, UpdateProvider
from aumai_fedtrain.robust import RobustAggregator
from aumai_fedtrain.screening import RoundScreen, screen_updates
from aumai_fedtrain.spool import UpdateSpool
from tests.test_benches import BENCHES, run_bench
from tests.test_dequant_parity import (
    ANY_ENCODINGS,
    PARITY_SETTINGS,
    WEIGHTS,
    raw_encoding,
    same_bits,
)

ENCODED_CODECS = ("fp16", "bf16", "int8", "int4", "e3m0")
DTYPES = (np.float16, np.float32, np.float64)


def decoded(update: dict[str, Encoded]) -> dict[str, np.ndarray]:
    with np.errstate(all="ignore"):
        return {key: decode(value) for key, value in update.items()}


@given(codec=st.sampled_from(ENCODED_CODECS), **ANY_ENCODINGS)
@PARITY_SETTINGS
def test_folding_encoded_updates_is_folding_them_decoded_in_any_interleaving(
    backend_name: str,
    data: st.DataObject,
    codec: str,
    block: int,
    dtype: type,
    shape: tuple[int, ...],
    nodes: int,
) -> None:
    """Arbitrary codes and scales (NaN, infinite and negative ones too), a second key of
    another dtype and codec; each update folded plain or encoded, in batches cut anywhere."""
    chosen = Codec(codec, block)  # type: ignore[arg-type]
    other = Codec(data.draw(st.sampled_from(ENCODED_CODECS)), 8)  # type: ignore[arg-type]
    updates = [
        {
            "w": raw_encoding(data, chosen, shape, np.dtype(dtype)),
            "b": raw_encoding(data, other, (13,), np.dtype(np.float32)),
        }
        for _ in range(nodes)
    ]
    weights = data.draw(st.lists(WEIGHTS, min_size=nodes, max_size=nodes).filter(any))
    plain = data.draw(st.lists(st.booleans(), min_size=nodes, max_size=nodes))
    cuts = sorted(data.draw(st.sets(st.integers(1, nodes), max_size=3)) | {nodes})
    backend = get_backend(backend_name)
    expected = backend.weighted_average([decoded(update) for update in updates], weights)

    running = backend.WeightedSum()
    start = 0
    for end in cuts:
        # within a batch, runs of plain and of encoded updates, in order
        at = start
        while at < end:
            stop = at + 1
            while stop < end and plain[stop] == plain[at]:
                stop += 1
            labels = [f"node-{i}" for i in range(at, stop)]
            if plain[at]:
                maps: list[Any] = [decoded(update) for update in updates[at:stop]]
                running.fold(maps, weights[at:stop], labels)
            else:
                running.fold_encoded(updates[at:stop], weights[at:stop], labels)
            at = stop
        start = end
    got = running.finish()

    assert list(got) == list(expected)
    for key in expected:
        same_bits(got[key], expected[key])


@pytest.mark.parametrize("codec", ENCODED_CODECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_backends_fold_real_encodings_alike_across_threads(codec: str, dtype: type) -> None:
    """Keys large enough for the native kernel to split them across threads and blocks."""
    rng = np.random.default_rng(3)
    chosen = Codec(codec, 64)  # type: ignore[arg-type]
    shapes = {"big": (300_007,), "w": (33, 61)}
    updates = [
        {
            key: encode((rng.standard_normal(shape) * 3).astype(dtype), chosen)
            for key, shape in shapes.items()
        }
        for _ in range(9)
    ]
    weights = [float(n) + 0.5 for n in range(9)]
    results = []
    for name in ("native", "python"):
        running = get_backend(name).WeightedSum()
        running.fold_encoded(updates[:4], weights[:4])
        running.fold([decoded(update) for update in updates[4:5]], weights[4:5])
        running.fold_encoded(updates[5:], weights[5:])
        results.append(running.finish())
    for key in shapes:
        assert results[0][key].dtype == np.dtype(dtype)
        assert results[0][key].tobytes() == results[1][key].tobytes()


def test_a_bad_encoded_fold_names_the_key_and_update_and_adds_nothing(backend_name: str) -> None:
    backend = get_backend(backend_name)
    good = encode(np.arange(16, dtype=np.float32), Codec("int8", 8))
    short = Encoded(good.codec, good.codes[:15], good.scales, good.shape, good.dtype)
    running = backend.WeightedSum()
    running.fold_encoded([{"w": good}], [1.0], ["node-a"])
    with pytest.raises(ValueError, match=r"gradient 'w' .*from node-b"):
        running.fold_encoded([{"w": short}], [1.0], ["node-b"])
    with pytest.raises(ValueError, match=r"'w'.*\(4, 4\) from node-c.*\(16,\) from node-a"):
        running.fold_encoded(
            [{"w": Encoded(good.codec, good.codes, good.scales, (4, 4), good.dtype)}],
            [1.0],
            ["node-c"],
        )
    plain = encode(np.ones(16, dtype=np.float32), Codec("none"))
    with pytest.raises(ValueError, match=r"gradient 'w' from node-d: codec \"none\" has no codes"):
        running.fold_encoded([{"w": plain}], [1.0], ["node-d"])
    with pytest.raises(TypeError, match="node-e: gradient 'w' is ndarray, expected Encoded"):
        running.fold_encoded([{"w": np.ones(16)}], [1.0], ["node-e"])
    with pytest.raises(ValueError, match=r"weight #1 is -1\.0"):
        running.fold_encoded([{"w": good}], [-1.0], ["node-f"])
    result = running.finish()
    same_bits(result["w"], decode(good))


@given(
    data=st.data(),
    codec=st.sampled_from(ENCODED_CODECS),
    block=st.sampled_from([8, 16, 64]),
    dtype=st.sampled_from(DTYPES),
    count=st.integers(0, 150),
)
@settings(max_examples=300, deadline=None)
@example(data=None, codec="int4", block=8, dtype=np.float32, count=9)  # a padding nibble
def test_the_largest_magnitude_of_an_encoding_is_that_of_its_decoded_values(
    data: st.DataObject | None, codec: str, block: int, dtype: type, count: int
) -> None:
    """Any codes (padding nibbles, int8 -128, NaN and infinite halves) and any scales."""
    chosen = Codec(codec, block)  # type: ignore[arg-type]
    if data is None:  # the explicit example: every code -7, the padding nibble 0 (code -8)
        codes = np.full(5, 0x11, np.uint8)
        codes[-1] = 0x01
        scales = np.ones(2, np.float32)
        encoded = Encoded(chosen, codes, scales, (9,), np.dtype(dtype))
    else:
        encoded = raw_encoding(data, chosen, (count,), np.dtype(dtype))
    expected = get_backend("native").max_abs([decoded({"w": encoded})])[0]
    got = max_abs_encoded({"w": encoded})
    assert [math.isnan(x) for x in got] == [math.isnan(x) for x in expected]
    assert [x for x in got if not math.isnan(x)] == [x for x in expected if not math.isnan(x)]


CONFIG = TrainingConfig(num_nodes=2, max_abs_update=100.0)
NODES = {f"node-{i}": FederatedNode(node_id=f"node-{i}") for i in range(2)}
MODEL = {"w": np.zeros((4, 8), np.float32), "b": np.zeros(8, np.float64)}


def encoded_update(node: str, encoded: dict[str, Encoded]) -> EncodedUpdate:
    return EncodedUpdate(
        node_id=node, round_id=1, gradients={}, loss=0.5, samples_used=8, encoded=encoded
    )


def honest(codec: Codec, scale: float = 1.0) -> dict[str, Encoded]:
    rng = np.random.default_rng(0)
    return {
        key: encode((rng.standard_normal(value.shape) * scale).astype(value.dtype), codec)
        for key, value in MODEL.items()
    }


def with_scale(encoded: dict[str, Encoded], key: str, scale: float) -> dict[str, Encoded]:
    tensor = encoded[key]
    assert tensor.scales is not None
    scales = tensor.scales.copy()
    scales[-1] = scale
    return {**encoded, key: Encoded(tensor.codec, tensor.codes, scales, tensor.shape, tensor.dtype)}


HOSTILE = {
    "honest": honest(Codec("int8", 8)),
    "NaN scale": with_scale(honest(Codec("int8", 8)), "w", math.nan),
    "inf scale": with_scale(honest(Codec("int4", 8)), "b", math.inf),
    "beyond max_abs_update": with_scale(honest(Codec("e3m0", 8)), "b", 1e3),
    "beyond float32": with_scale(honest(Codec("int8", 8)), "w", 3e38),
    "fp16 beyond max_abs_update": honest(Codec("fp16"), scale=500.0),
    "bf16 beyond float32": {
        **honest(Codec("bf16")),
        "w": Encoded(
            Codec("bf16"), np.full(32, 0x7F80, np.uint16), None, (4, 8), np.dtype(np.float32)
        ),
    },
    "wrong shape": {
        **honest(Codec("int8", 8)),
        "w": encode(np.ones((8, 4), np.float32), Codec("int8", 8)),
    },
    "missing key": {"b": honest(Codec("int8", 8))["b"]},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_an_encoded_update_is_screened_as_its_decoded_values(backend_name: str, case: str) -> None:
    encoded = encoded_update("node-0", HOSTILE[case])
    plain = encoded.decoded()
    screen = RoundScreen(NODES, expected_round=1, parameters=MODEL, config=CONFIG)
    got, expected = screen.check([encoded, plain])
    if case == "honest":
        assert got is encoded  # counted as it is, still encoded
        assert isinstance(expected, LocalUpdate)
    else:
        assert isinstance(got, str) and got == expected
    accepted, dropped = screen_updates(
        [encoded], NODES, expected_round=1, parameters=MODEL, config=CONFIG
    )
    if case == "honest":  # a round's list holds the decoded update
        assert dropped == {} and accepted == [plain]
    else:
        assert accepted == [] and dropped == {"node-0": expected}


def test_encoded_updates_of_another_dtype_count_decoded_in_the_models() -> None:
    values = {key: np.full(value.shape, 0.25, np.float64) for key, value in MODEL.items()}
    encoded = encoded_update("node-1", {k: encode(v, Codec("int8", 8)) for k, v in values.items()})
    screen = RoundScreen(NODES, expected_round=1, parameters=MODEL, config=CONFIG)
    [outcome] = screen.check([encoded])
    assert not isinstance(outcome, (str, EncodedUpdate))
    assert {key: value.dtype for key, value in outcome.gradients.items()} == {
        key: value.dtype for key, value in MODEL.items()
    }


def test_the_spool_keeps_codes_and_scales_and_gives_them_back(tmp_path: Any) -> None:
    update = encoded_update(
        "node-0", {**honest(Codec("int4", 8)), "e": encode(np.ones(0), Codec("int4"))}
    )
    spool = UpdateSpool(tmp_path)
    try:
        spooled = spool.put(update)
        assert spool._end == update.nbytes  # codes and scales: never decoded values
        assert not isinstance(spooled.update, EncodedUpdate) or all(
            t.codes.size == 0 for t in spooled.update.encoded.values()
        )
        back = spool.take(spooled)
    finally:
        spool.close()
    assert isinstance(back, EncodedUpdate)
    assert back.without_tensors() == update.without_tensors()
    for key, tensor in update.encoded.items():
        got = back.encoded[key]
        assert (got.codec, got.shape, got.dtype) == (tensor.codec, tensor.shape, tensor.dtype)
        assert got.codes.tobytes() == tensor.codes.tobytes()
        assert got.codes.dtype == tensor.codes.dtype
        assert (got.scales is None) == (tensor.scales is None)
        if tensor.scales is not None:
            assert got.scales is not None and got.scales.tobytes() == tensor.scales.tobytes()


class EncodingProvider(UpdateProvider):
    """Two nodes whose updates arrive encoded, the second node's first (it waits for the first
    in the reorder buffer, or on disk)."""

    def __init__(self, codec: Codec, encoded: bool) -> None:
        self.codec = codec
        self.encoded = encoded

    def initial_parameters(self, config: TrainingConfig) -> dict[str, np.ndarray]:
        return {key: value.copy() for key, value in MODEL.items()}

    def updates(self, round_id: int) -> list[LocalUpdate]:
        result: list[LocalUpdate] = []
        for index in (1, 0):
            rng = np.random.default_rng([round_id, index])
            values = {
                key: rng.standard_normal(value.shape).astype(value.dtype)
                for key, value in MODEL.items()
            }
            update = encoded_update(
                f"node-{index}", {k: encode(v, self.codec) for k, v in values.items()}
            )
            update = update.model_copy(update={"round_id": round_id, "samples_used": 3 + index})
            result.append(update if self.encoded else update.decoded())
        return result

    def get_updates(self, round_id: int, state: Any, nodes: Any) -> list[LocalUpdate]:
        return self.updates(round_id)[::-1]

    def iter_updates(self, round_id: int, state: Any, nodes: Any) -> Any:
        for update in self.updates(round_id):
            yield Arrivals([update])


class FoldSpy:
    """A running sum that notes which of ``fold`` and ``fold_encoded`` it is asked for."""

    def __init__(self, inner: Any, calls: list[str]) -> None:
        self.inner = inner
        self.calls = calls

    def fold(self, *args: Any) -> None:
        self.calls.append("fold")
        self.inner.fold(*args)

    def fold_encoded(self, *args: Any) -> None:
        self.calls.append("fold_encoded")
        self.inner.fold_encoded(*args)

    def finish(self) -> Any:
        return self.inner.finish()


def spy_on_folds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folds that the coordinator's running sums are asked for, from now on."""
    calls: list[str] = []
    making = RobustAggregator.running_sum
    monkeypatch.setattr(RobustAggregator, "running_sum", lambda self: FoldSpy(making(self), calls))
    return calls


@pytest.mark.parametrize("waiting_memory", [0, 1 << 30])
def test_the_coordinator_folds_encoded_updates_encoded_with_the_decoded_result(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    waiting_memory: int,
    tmp_path: Any,
) -> None:
    calls = spy_on_folds(monkeypatch)
    config = CONFIG.model_copy(
        update={"global_rounds": 2, "compression": CompressionConfig(codec="int8")}
    )
    nodes = list(NODES.values())
    results = []
    for encoded in (True, False):
        calls.clear()
        coordinator = DiLoCoCoordinator(waiting_memory=waiting_memory, spill_dir=tmp_path)
        provider = EncodingProvider(Codec("int8", 8), encoded)
        with caplog.at_level(logging.INFO, logger="aumai_fedtrain"):
            caplog.clear()
            results.append(coordinator.run_training(config, nodes, provider))
        assert set(calls) == {"fold_encoded" if encoded else "fold"}
        spilled = [r for r in caplog.records if getattr(r, "event", None) == "spilled"]
        assert len(spilled) == (2 if waiting_memory == 0 else 0)
    got, expected = results
    assert got.final_state.parameters is not None and expected.final_state.parameters is not None
    for key, value in expected.final_state.parameters.items():
        assert got.final_state.parameters[key].tobytes() == value.tobytes()
    assert got.history[-1].num_participants == 2


def test_the_coordinator_memory_benchmark_runs_real_nodes_with_compression() -> None:
    script = str(BENCHES / "bench_coordinator_memory.py")
    flags = ("--compression", "int8", "--block-size", "64", "--waiting-memory-mb", "0")
    output = run_bench(script, "--nodes", "2", "--values", "1000", "--rounds", "1", *flags)

    assert "round 1: 2 updates," in output
    assert "waiting memory 0 MiB, compression int8" in output
    assert "\n| 1 | " in output
    assert "load average before:" in output
