"""Server and sites must agree before any training: the real ClientApp answers the real
handshake through an in-process grid (no Ray, no network)."""

from __future__ import annotations

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from common.config import RunConfig
from common.training.model import build_model, signature
from server.federation import HandshakeError, handshake, setup


class InProcessGrid:
    """Delivers messages straight to the ClientApp, each node with its own node config."""

    def __init__(self, node_configs: dict[int, dict], app=client_app) -> None:
        self.app = app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config={})
                         for n, cfg in node_configs.items()}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        return [self._deliver(m) for m in messages]

    def _deliver(self, m: Message) -> Message:
        try:
            return self.app(message=m, context=self.contexts[m.metadata.dst_node_id])
        except Exception as exc:  # as Flower's runtimes do: a ClientApp that raises answers with an error
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                           reply_to=m)


@pytest.fixture
def server_run(tiny_cfg):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    sr = setup(tiny_cfg.replace(run_name="hs"), progress=False)
    return sr


def nodes(n: int, **pins) -> dict[int, dict]:
    return {10 + k: {"partition-id": k, "num-partitions": n, **pins} for k in range(n)}


def test_agreeing_sites_join_with_their_names_and_sizes(server_run):
    sig = signature(build_model(server_run.cfg.arch, server_run.cfg.norm))
    node_sites, info, excluded = handshake(InProcessGrid(nodes(2)), server_run, sig)
    assert node_sites == {10: "site-0", 11: "site-1"} and excluded == {}
    assert all(d["train-size"] > 0 and d["val-size"] > 0 for d in info.values())


def test_a_site_that_requires_dp_is_refused_when_the_server_runs_without(server_run):
    sig = signature(build_model(server_run.cfg.arch, server_run.cfg.norm))
    grid = InProcessGrid({10: {"partition-id": 0, "num-partitions": 2},
                          11: {"partition-id": 1, "num-partitions": 2, "dp": "local"}})
    with pytest.raises(HandshakeError, match="site-1 requires dp=local, the server runs dp=off"):
        handshake(grid, server_run, sig)


def test_different_model_or_input_size_is_named_with_both_values(server_run):
    dp_sig = signature(build_model(server_run.cfg.arch, "group"))  # a server with the DP (GroupNorm) model
    with pytest.raises(HandshakeError, match=r"site-0 builds a different model .* than the server \(signature "
                                             + dp_sig):
        handshake(InProcessGrid(nodes(2)), server_run, dp_sig)
    sig = signature(build_model(server_run.cfg.arch, server_run.cfg.norm))
    with pytest.raises(HandshakeError, match="site-0 requires image-size=64, the server runs image-size=32"):
        handshake(InProcessGrid({10: {"partition-id": 0, "image-size": 64}, 11: {"partition-id": 1}}),
                  server_run, sig)


def test_missing_sites_time_out_clearly(server_run):
    from server.guard import NodesUnavailable

    sr = server_run
    sr.cfg = sr.cfg.replace(node_timeout=1.0)
    with pytest.raises(NodesUnavailable, match="only 1 of the 2 sites connected within --node-timeout 1s"):
        handshake(InProcessGrid(nodes(1)), sr, "x")


def test_config_refuses_dp_without_group_norm():
    with pytest.raises(ValueError, match="--dp local needs --norm group"):
        RunConfig(dp="local", norm="batch")


def test_a_site_with_a_corrupted_scan_reports_it_and_one_that_cannot_read_its_data_is_left_out(
        server_run, tiny_root, tmp_path, caplog):
    import shutil

    # hospital-x (deployment style: its own data-path) has one truncated .raw
    site_x = tmp_path / "hospital-x"
    shutil.copytree(tiny_root, site_x)
    victim = next((site_x / "subset4").glob("*.raw"))
    victim.write_bytes(victim.read_bytes()[:5000])
    grid = InProcessGrid({
        10: {"partition-id": 0, "num-partitions": 2},
        11: {"site-name": "hospital-x", "data-path": str(site_x), "cache-path": str(tmp_path / "cx")},
        12: {"site-name": "hospital-y", "data-path": str(tmp_path / "nothing-here"),
             "cache-path": str(tmp_path / "cy")},
    })
    sig = signature(build_model(server_run.cfg.arch, server_run.cfg.norm))
    node_sites, info, excluded = handshake(grid, server_run, sig)
    assert node_sites == {10: "site-0", 11: "hospital-x"}
    assert victim.stem in info["hospital-x"]["skipped_scans"]  # reported by name...
    assert "truncated" in info["hospital-x"]["skipped_scans"][victim.stem]
    assert info["hospital-x"]["train-size"] > 0  # ...and it trains on the rest
    assert f"[site hospital-x] skipped scan {victim.stem}" in caplog.text
    assert list(excluded) == [12] and "data-path" in excluded[12] and "nothing-here" in excluded[12]
    # a site that must fail on bad data (on-bad-scan=fail in its node config) is left out, named
    grid.contexts[11].node_config["on-bad-scan"] = "fail"
    grid.contexts[11].node_config["cache-path"] = str(tmp_path / "cx2")
    _, _, excluded = handshake(grid, server_run, sig)
    assert set(excluded) == {11, 12} and victim.stem in excluded[11]


def test_a_hospital_refuses_a_run_that_sets_a_rehearsal_setting_and_names_it(server_run):
    from sim.faults import app as rehearsal_app

    sig = signature(build_model(server_run.cfg.arch, server_run.cfg.norm))
    server_run.cfg = server_run.cfg.replace(inject="site-1:signflip", fail_prob=0.2)
    with pytest.raises(HandshakeError, match="only 0 of 2 sites can take part") as err:
        handshake(InProcessGrid(nodes(2)), server_run, sig)
    assert err.value.args[0].count("refuses the run") == 2
    assert "inject='site-1:signflip'" in str(err.value) and "fail-prob=0.2" in str(err.value)
    # the simulation's wrapper (sim/faults.py) clears them before the hospital's code sees the run
    node_sites, _, excluded = handshake(InProcessGrid(nodes(2), app=rehearsal_app), server_run, sig)
    assert excluded == {} and sorted(node_sites.values()) == ["site-0", "site-1"]


def test_a_server_of_another_release_is_named_with_both_versions(server_run, monkeypatch):
    import common
    import server.federation

    sig = signature(build_model(server_run.cfg.arch, server_run.cfg.norm))
    monkeypatch.setattr(server.federation, "__version__", "0.0.9")
    with pytest.raises(HandshakeError, match="only 0 of 2 sites") as err:
        handshake(InProcessGrid(nodes(2)), server_run, sig)
    assert f"the server runs luna-fl 0.0.9, this site runs luna-fl {common.__version__}" in str(err.value)


def test_a_deployed_site_names_the_release_of_its_own_image(server_run):
    """In deployment the ClientApp's code comes in the server's app bundle: the site's release is
    the one its SuperNode was started with (``luna-fl-version`` in its node config)."""
    import common

    sig = signature(build_model(server_run.cfg.arch, server_run.cfg.norm))
    grid = InProcessGrid({n: {**node, "luna-fl-version": "0.2.0"} for n, node in nodes(2).items()})
    with pytest.raises(HandshakeError, match="only 0 of 2 sites") as err:
        handshake(grid, server_run, sig)
    assert f"the server runs luna-fl {common.__version__}, this site runs luna-fl 0.2.0" in str(err.value)


def test_the_release_is_the_package_version():
    import tomllib

    import common
    from tests.helpers import ROOT

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert common.__version__ == pyproject["project"]["version"]


def test_settings_out_of_range_are_refused_naming_the_option():
    for bad, name in ((dict(dp_epsilon=-3.0), "--dp-epsilon must be >= 0"), (dict(dp_clip=0.0), "--dp-clip"),
                      (dict(dp_delta=1.0), "--dp-delta"), (dict(server_lr=-0.1), "--server-lr"),
                      (dict(trim_beta=0.5), "--trim-beta"), (dict(round_timeout=-1.0), "--round-timeout")):
        with pytest.raises(ValueError, match=name):
            RunConfig(**bad)


def test_a_hospital_refuses_rehearsal_settings_even_inside_a_tampered_run_configuration(server_run):
    """A server that sends rehearsal settings inside the run configuration itself (a modified
    server; ours sends a site only the settings it receives) is refused all the same."""
    from flwr.app import ConfigRecord
    from flwr.common import MessageType

    import common

    rogue = server_run.cfg.replace(fail_prob=0.5)
    rec = ConfigRecord({"run-config": rogue.to_json(), "luna-fl-version": common.__version__,
                        "plan-path": str(server_run.run.path / "sites.json"),
                        "cache-path": str(server_run.prepared.cache.path)})
    msg = Message(RecordDict({"config": rec}), dst_node_id=10, message_type=MessageType.QUERY)
    reply = InProcessGrid(nodes(1))._deliver(msg)
    assert reply.has_error() and "refuses the run" in reply.error.reason and "fail-prob=0.5" in reply.error.reason
    assert "inject" not in server_run.cfg.for_site() and "fail_prob" not in server_run.cfg.for_site()
