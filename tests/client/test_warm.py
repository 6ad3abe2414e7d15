"""What a site's process keeps between messages: owned by the process, bounded per kind."""

from __future__ import annotations

import threading

from client.site import Warm


def test_each_kind_keeps_at_most_its_limit_least_recently_used_out():
    warm, made = Warm(limit=2), []

    def maker(key):
        return lambda: made.append(key) or f"value-{key}"

    assert warm.get("model", "a", maker("a")) == "value-a"
    assert warm.get("model", "b", maker("b")) == "value-b"
    assert warm.get("model", "a", maker("a")) == "value-a"  # a hit: not made again, now the newest
    assert warm.get("model", "c", maker("c")) == "value-c"  # evicts b, the least recently used
    assert warm.size("model") == 2 and made == ["a", "b", "c"]
    assert warm.get("model", "b", maker("b")) == "value-b" and made == ["a", "b", "c", "b"]  # b was gone
    assert warm.get("cache", "a", maker("x")) == "value-x"  # kinds are bounded separately
    assert warm.size("model") == 2 and warm.size("cache") == 1


def test_two_messages_at_once_build_an_entry_once():
    warm, made, gate = Warm(limit=2), [], threading.Event()

    def slow():
        gate.wait(5)
        made.append(1)
        return object()

    out = []
    threads = [threading.Thread(target=lambda: out.append(warm.get("model", "k", slow))) for _ in range(2)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert made == [1] and out[0] is out[1]
