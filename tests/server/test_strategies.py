"""The Guard around Flower's strategies, with hand-computed arrays (no Ray, no network)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvgM
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from server.guard import Guard, RoundFailed
from server.strategies import export_state, import_state, make_strategy
from tests.helpers import GLOBAL, arrays, guard, reply


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_aggregate_is_the_example_weighted_mean():
    a, b, c = arrays(1), arrays(2), arrays(3)
    out, _ = guard().aggregate_train(1, [reply(1, a, 10), reply(2, b, 30), reply(3, c, 60)])
    w = np.array([10, 30, 60]) / 100
    for k in ("w", "b"):
        expected = w[0] * a[k] + w[1] * b[k] + w[2] * c[k]
        np.testing.assert_allclose(out[k].numpy(), expected, rtol=1e-6)


def test_reply_order_does_not_change_the_aggregate():
    reps = lambda: [reply(1, arrays(1), 10), reply(2, arrays(2), 30), reply(3, arrays(3), 60)]  # noqa: E731
    x, _ = guard().aggregate_train(1, reps())
    y, _ = guard().aggregate_train(1, reps()[::-1])
    for k in x:
        np.testing.assert_array_equal(x[k].numpy(), y[k].numpy())


@pytest.mark.parametrize("bad,why", [
    ({**arrays(9), "w": np.full((2, 3), np.nan, np.float32)}, "NaN or Inf"),
    ({**arrays(9), "b": np.full(3, np.inf, np.float32)}, "NaN or Inf"),
    ({**arrays(9), "w": np.zeros((3, 3), np.float32)}, "shape"),
    ({k: v for k, v in arrays(9).items() if k != "b"}, "missing"),
    ({**arrays(9), "extra": np.zeros(1, np.float32)}, "unexpected"),
])
def test_bad_updates_are_rejected_and_the_rest_aggregated(bad, why, caplog):
    g = guard()
    a, b = arrays(1), arrays(2)
    out, _ = g.aggregate_train(1, [reply(1, a, 10), reply(2, b, 30), reply(4, bad, 50)])
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k].numpy(), 0.25 * a[k] + 0.75 * b[k], rtol=1e-6)
    assert "site-4" in g.rounds[1].rejected and why in g.rounds[1].rejected["site-4"]
    assert "site-4" in caplog.text and "rejected" in caplog.text


def test_inflated_example_count_is_rejected():
    g = guard(limits={f"site-{k}": 100 for k in range(1, 6)})
    a, b = arrays(1), arrays(2)
    out, _ = g.aggregate_train(1, [reply(1, a, 50), reply(2, b, 50), reply(3, arrays(3), 10_000)])
    np.testing.assert_allclose(out["w"].numpy(), 0.5 * a["w"] + 0.5 * b["w"], rtol=1e-6)
    assert "exceeds the site's training partition (100)" in g.rounds[1].rejected["site-3"]


def test_failing_site_is_named_and_quorum_enforced(caplog):
    g = guard()
    out, _ = g.aggregate_train(1, [reply(1, arrays(1), 10), reply(2, arrays(2), 10),
                                   reply(3, {}, 0, error="Exception: disk full")])
    assert out is not None and "disk full" in g.rounds[1].failed["site-3"]
    assert "[site site-3] failed: Exception: disk full" in caplog.text
    assert "site-4" in g.rounds[1].failed  # sampled, never answered
    g2 = guard(min_fit_clients=3)
    with pytest.raises(RoundFailed, match=r"only 2 valid update\(s\) of 4 sampled sites, at least 3"):
        g2.aggregate_train(1, [reply(1, arrays(1), 10), reply(2, arrays(2), 10), reply(3, {}, 0, error="x")])


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategy_resists_a_scaled_sign_flipped_update(strategy):
    honest = [arrays(k) for k in (1, 2, 3, 4)]
    attack = {k: (-50 * v if v.dtype.kind == "f" else v) for k, v in arrays(5).items()}
    reps = [reply(k + 1, a, 10) for k, a in enumerate(honest)] + [reply(5, attack, 10)]
    g = guard(strategy)
    g._log(1).sampled.append("site-5")
    out, _ = g.aggregate_train(1, reps)
    ws = np.stack([h["w"] for h in honest] + [attack["w"]])
    if strategy == "fedmedian":
        expected = np.median(ws, axis=0)
    elif strategy == "fedtrimmedavg":  # beta 0.2 of 5 updates: one trimmed at each end, per coordinate
        expected = np.sort(ws, axis=0)[1:4].mean(axis=0)
    else:  # krum keeps one honest update whole
        expected = next(h["w"] for h in honest if np.allclose(h["w"], out["w"].numpy(), rtol=1e-6))
    np.testing.assert_allclose(out["w"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(out["w"].numpy()).max() < 5  # the attacker did not drag the model away
    naive = guard("fedavg")  # and FedAvg, for contrast, is dragged far
    naive._log(1).sampled.append("site-5")
    fresh = [reply(k + 1, a, 10) for k, a in enumerate(honest)] + [reply(5, attack, 10)]  # the guard
    avg, _ = naive.aggregate_train(1, fresh)  # drops aggregated replies' weights, so new messages
    assert np.abs(avg["w"].numpy()).max() > 5


def test_half_precision_on_the_wire_is_decoded_to_float32():
    from common.training import wire

    a, b = arrays(1), arrays(2)
    g = guard(update_dtype="bfloat16")
    out, _ = g.aggregate_train(1, [reply(1, wire.encode(a, "bfloat16"), 10), reply(2, wire.encode(b, "bfloat16"), 10)])
    assert out["w"].numpy().dtype == np.float32
    np.testing.assert_allclose(out["w"].numpy(), 0.5 * (a["w"] + b["w"]), rtol=1e-2, atol=1e-2)


def test_strategy_state_survives_export_and_import():
    c = RunConfig(strategy="fedadam", clients=2)
    s1 = make_strategy(c, 2)
    s1.current_arrays = {"w": np.ones(3)}
    s1.m_t, s1.v_t = {"w": np.full(3, 0.1)}, {"w": np.full(3, 0.2)}
    s2 = make_strategy(c, 2)
    import_state(s2, export_state(s1))
    np.testing.assert_array_equal(s2.m_t["w"], s1.m_t["w"])
    np.testing.assert_array_equal(s2.v_t["w"], s1.v_t["w"])
    np.testing.assert_array_equal(s2.current_arrays["w"], s1.current_arrays["w"])


@pytest.mark.parametrize("v", [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(5, np.int64),
                               np.zeros((0, 3), np.float32), np.arange(6, dtype=np.uint16),
                               np.asfortranarray(np.ones((3, 4), np.float32))],
                         ids=["float32", "0-d int64", "empty", "uint16", "fortran"])
def test_weights_read_and_written_without_copies_are_flowers_own_bytes(v):
    from common.training import wire

    mine, flowers = wire.to_array(v), Array(v)
    if v.flags.c_contiguous:
        assert mine.data == flowers.data  # what Array(v) would have sent, byte for byte
    for a in (mine, flowers):
        got = wire.view(a)
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got, v)
    if v.size and v.flags.c_contiguous:
        assert np.shares_memory(wire.view(flowers), np.frombuffer(flowers.data, np.uint8))  # no copy


def test_a_corrupt_weights_payload_is_an_error_not_a_wrong_view():
    from common.training import wire

    good = Array(np.ones((2, 3), np.float32))
    bad = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"\x00" * len(good.data))
    with pytest.raises(ValueError):
        wire.view(bad)
    lying = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=good.data)  # header says (2, 3)
    assert wire.view(lying).shape == (2, 3)  # falls back to numpy's reading of the header


def test_in_place_mean_is_flowers_aggregate_byte_for_byte():
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from server.strategies import weighted_average

    contents = [reply(k, arrays(k), 10.0 * k + 3).content for k in range(1, 5)]
    a, b = aggregate_arrayrecords(contents, "num-examples"), weighted_average(contents, "num-examples")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].data == b[k].data, k


def test_fused_site_evaluation_is_recorded_for_the_previous_round():
    g = guard(rounds=3)
    grid = type("G", (), {"get_node_ids": lambda self: [1, 2, 3, 4, 5]})()
    cfg = ConfigRecord({})
    g.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), cfg, grid)
    assert cfg["evaluate-first"] == 0  # round 1 gets the initial model: nothing to evaluate
    g.configure_train(2, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), cfg, grid)
    assert cfg["evaluate-first"] == 1
    assert list(g.configure_evaluate(2, ArrayRecord(), ConfigRecord({}), grid)) == []  # no phase of its own
    r = reply(1, arrays(1), 10)
    r.content["val"] = ConfigRecord({"roc_auc": 0.75, "loss": 0.4, "num-examples": 9.0})
    g.aggregate_train(2, [r, *(reply(k, arrays(k), 10) for k in (2, 3, 4))])
    assert g.rounds[1].evaluate == {"site-1": {"roc_auc": 0.75, "loss": 0.4, "num-examples": 9.0}}
    assert "site-1" not in g.rounds[2].evaluate
    sep, cfg = guard(rounds=3, site_eval="separate"), ConfigRecord({})
    sep.configure_train(2, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), cfg, grid)
    assert cfg["evaluate-first"] == 0
    assert len(list(sep.configure_evaluate(2, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                           ConfigRecord({}), grid))) == 5  # Flower's own phase, every site


def _fedavgm_guard(**cfg) -> Guard:
    c = RunConfig(strategy="fedavgm", clients=2, server_lr=2.0, server_momentum=0.5, **cfg)
    ref = {"w": np.zeros((2, 3), np.float32), "bn.running_var": np.ones(3, np.float32)}
    return Guard(make_strategy(c, 2), c, ref, {1: "site-1", 2: "site-2"}, {"site-1": 1000, "site-2": 1000})


def _fedavgm_round(g: Guard, rnd: int, current: dict, seeds: tuple[int, int]) -> dict:
    grid = type("G", (), {"get_node_ids": lambda self: [1, 2]})()
    g.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in current.items()}), ConfigRecord({}), grid)
    g._log(rnd).sampled = ["site-1", "site-2"]
    reps = []
    for node, s in zip((1, 2), seeds, strict=True):
        rng = np.random.default_rng(s)
        reps.append(reply(node, {"w": rng.normal(size=(2, 3)).astype(np.float32),
                                 "bn.running_var": rng.uniform(0.01, 0.1, 3).astype(np.float32)}, 10 * node))
    out, _ = g.aggregate_train(rnd, reps)
    return {k: v.numpy() for k, v in out.items()}


def test_fedavgm_steps_with_server_momentum_and_keeps_statistics_averaged():
    """FedAvgM by hand: v_1 = g_1, v_2 = beta v_1 + g_2, w <- w - lr v (g = w - mean of the
    sites); running statistics are the sites' plain mean, never stepped (momentum would
    carry a falling variance below zero)."""
    g = _fedavgm_guard()
    w0 = {"w": np.zeros((2, 3), np.float32), "bn.running_var": np.ones(3, np.float32)}

    def mean(seeds):
        ws = [np.random.default_rng(s) for s in seeds]
        draws = [(r.normal(size=(2, 3)).astype(np.float32), r.uniform(0.01, 0.1, 3).astype(np.float32)) for r in ws]
        return (draws[0][0] * (1 / 3) + draws[1][0] * (2 / 3), draws[0][1] * (1 / 3) + draws[1][1] * (2 / 3))

    w1 = _fedavgm_round(g, 1, w0, (1, 2))
    m1, s1 = mean((1, 2))
    v1 = w0["w"] - m1
    np.testing.assert_allclose(w1["w"], w0["w"] - 2.0 * v1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w1["bn.running_var"], s1, rtol=1e-6)
    w2 = _fedavgm_round(g, 2, w1, (3, 4))
    m2, s2 = mean((3, 4))
    v2 = 0.5 * v1 + (w1["w"] - m2)
    np.testing.assert_allclose(w2["w"], w1["w"] - 2.0 * v2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w2["bn.running_var"], s2, rtol=1e-6)
    assert (w2["bn.running_var"] > 0).all()


def test_fedavgm_momentum_survives_export_and_import():
    """A checkpoint after round 1 (export_state) restored into a fresh strategy gives round 2
    bit for bit, momentum included; without it round 2 would be plain FedAvg's first step."""
    w0 = {"w": np.zeros((2, 3), np.float32), "bn.running_var": np.ones(3, np.float32)}
    whole = _fedavgm_guard()
    w1 = _fedavgm_round(whole, 1, w0, (1, 2))
    saved = export_state(whole.inner)
    assert any(k.endswith("momentum_vector") for k in saved)
    w2 = _fedavgm_round(whole, 2, w1, (3, 4))
    resumed = _fedavgm_guard()
    import_state(resumed.inner, saved)
    w2r = _fedavgm_round(resumed, 2, w1, (3, 4))
    fresh = _fedavgm_round(_fedavgm_guard(), 2, w1, (3, 4))
    for k in w2:
        np.testing.assert_array_equal(w2r[k], w2[k])
    assert not np.allclose(fresh["w"], w2["w"])  # the restored momentum is what made the difference


def test_the_training_deadline_starts_after_the_wait_for_a_restarting_site():
    """A round first waits (up to --node-timeout) for every site that joined; a site that
    reconnects late must still get the whole --round-timeout to train."""
    g = guard(rounds=2, round_timeout=30.0, node_timeout=60.0)

    class Rejoining:  # site-5 is back only after a few polls of the node list
        polls = 0

        def get_node_ids(self):
            self.polls += 1
            return [1, 2, 3, 4, 5] if self.polls > 3 else [1, 2, 3, 4]

    cfg = ConfigRecord({})
    g.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), cfg, Rejoining())
    import time

    waited = time.time() - g.rounds[1].started
    assert waited >= 1.0  # the round did wait for site-5 (polls every 0.5 s)
    assert cfg["deadline"] >= g.rounds[1].started + waited + 30.0 - 0.5


def test_a_failed_reply_without_a_reason_is_named_not_a_crash(caplog):
    from server.guard import short_reason

    assert short_reason(None) == short_reason("") == "the site gave no reason"
    assert short_reason("Traceback\n  File x\nValueError: disk full") == "ValueError: disk full"


def test_one_registry_of_strategies_and_their_own_settings():
    import argparse
    from dataclasses import fields

    from common.config import STRATEGY_SETTINGS, add_arguments
    from server.strategies import BUILDERS

    assert list(BUILDERS) == list(STRATEGY_SETTINGS)  # every name has exactly one builder
    known = {f.name for f in fields(RunConfig)}
    assert all(set(own) <= known for own in STRATEGY_SETTINGS.values())
    p = argparse.ArgumentParser()
    add_arguments(p, only=("strategy",))
    assert "--strategy" in p.format_help()
    help_text = next(f.metadata["help"] for f in fields(RunConfig) if f.name == "strategy")  # what --help shows
    assert "fedprox (--proximal-mu)" in help_text and "fedavgm (--server-lr, --server-momentum)" in help_text
    for name in STRATEGY_SETTINGS:  # each builds a real Flower strategy of its kind
        s = make_strategy(RunConfig(strategy=name, clients=8), 8)
        assert name.replace("fedtrimmedavg", "fedtrimmed").lower() in type(s).__name__.lower().lstrip("_")
    with pytest.raises(ValueError, match="choose --strategy fedavg or fedprox, not fedadam"):
        RunConfig(strategy="fedadam", dp="central", norm="group")
    # the default (issue 16): Flower's FedAvgM stepping twice the sites' mean change, no momentum
    s = make_strategy(RunConfig(clients=8), 8)
    assert isinstance(s, FedAvgM) and (s.server_learning_rate, s.server_momentum) == (2.0, 0.0)
    with pytest.raises(ValueError, match=r"not fedavgm \(the default\)"):
        RunConfig(dp="central", norm="group")


def test_the_guard_samples_sites_with_its_own_generator():
    """--fraction-fit: the same sites for the same seed and round, whatever state the global
    `random` is in (the guard no longer seeds the global generator for Flower's sampling)."""
    import random

    def sampled(rnd: int, global_seed: int, seed: int = 0) -> list[str]:
        g = guard(fraction_fit=0.5, seed=seed, rounds=3)
        random.seed(global_seed)
        grid = type("G", (), {"get_node_ids": lambda self: [1, 2, 3, 4, 5]})()
        msgs = g.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord({}), grid)
        return [g.site_of(m.metadata.dst_node_id) for m in msgs]

    a = sampled(1, global_seed=1)
    assert len(a) == 2 and a == sorted(a)  # int(5 x 0.5) sites, sent in site order
    assert sampled(1, global_seed=2) == a
    assert {tuple(sampled(r, 1, seed=s)) for r in (1, 2, 3) for s in (0, 1)} != {tuple(a)}  # it does vary
