"""Server and sites must agree before any training: the real ClientApp answers the real
handshake through an in-process grid (no Ray, no network)."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from common.config import RunConfig
from common.model import build_model, signature
from server.federation import HandshakeError, handshake, setup


class InProcessGrid:
    """Delivers messages straight to the ClientApp, each node with its own node config."""

    def __init__(self, node_configs: dict[int, dict]) -> None:
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config={})
                         for n, cfg in node_configs.items()}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        return [client_app(message=m, context=self.contexts[m.metadata.dst_node_id]) for m in messages]


@pytest.fixture
def server_run(tiny_cfg):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    sr = setup(tiny_cfg.replace(run_name="hs"), progress=False)
    return sr


def nodes(n: int, **pins) -> dict[int, dict]:
    return {10 + k: {"partition-id": k, "num-partitions": n, **pins} for k in range(n)}


def test_agreeing_sites_join_with_their_names_and_sizes(server_run):
    sig = signature(build_model(server_run.cfg.arch, server_run.cfg.norm))
    node_sites, info = handshake(InProcessGrid(nodes(2)), server_run, sig)
    assert node_sites == {10: "site-0", 11: "site-1"}
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
    from server.strategy import NodesUnavailable

    sr = server_run
    sr.cfg = sr.cfg.replace(node_timeout=1.0)
    with pytest.raises(NodesUnavailable, match="only 1 of the 2 sites connected within --node-timeout 1s"):
        handshake(InProcessGrid(nodes(1)), sr, "x")


def test_config_refuses_dp_without_group_norm():
    with pytest.raises(ValueError, match="--dp local needs --norm group"):
        RunConfig(dp="local", norm="batch")
