"""Checks on what a figure draws, shared by the figure tests and the browser test."""
from __future__ import annotations


def traces(fig, role: str, model: str | None = None) -> list:
    """The traces whose ``meta`` has ``role`` (and ``model``)."""
    return [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("role") == role
            and (model is None or t.meta.get("model") == model)]


def drawn_nodes(fig, model: str) -> dict[str, tuple[float, float]]:
    """``str(node) -> (x, y)`` of the circuit nodes drawn for ``model``."""
    (nodes,) = traces(fig, "nodes", model)
    return {name: (x, y) for name, x, y in zip(nodes.customdata, nodes.x, nodes.y)}


def drawn_ports(fig, model: str) -> dict[tuple[str, str], tuple[float, float]]:
    """``(str(node), port) -> (x, y)`` of the ports drawn for ``model``."""
    (ports,) = traces(fig, "ports", model)
    return {(node, port): (x, y) for (node, port), x, y in zip(ports.customdata, ports.x, ports.y)}


def assert_edges_end_on_drawn_nodes(fig) -> None:
    """Every edge leaves a node drawn in its own model's panel, enters a drawn port of the port
    it reads, and ends on the drawn destination node."""
    for model in ("teacher", "student"):
        nodes, ports = drawn_nodes(fig, model), drawn_ports(fig, model)
        for t in traces(fig, "edge", model):
            m = t.meta
            start, port, end = (t.x[0], t.y[0]), (t.x[-2], t.y[-2]), (t.x[-1], t.y[-1])
            assert m["src"] in nodes and start == nodes[m["src"]], f"{model} edge {m['edge']} starts off its source node"
            assert m["dst"] in nodes and end == nodes[m["dst"]], f"{model} edge {m['edge']} ends where no node is drawn"
            assert ports.get((m["dst"], m["port"])) == port, f"{model} edge {m['edge']} misses its {m['port']} port"
        for (node, _), _xy in ports.items():
            assert node in nodes, f"{model} port of {node} drawn without its node"
