"""Minimum s-t cuts, for the `auto` recompute policy (rnnc/passes/policy.py)."""
from __future__ import annotations

from collections import deque


class FlowNetwork:
    """Capacities on directed edges; max flow by Dinic's algorithm.

    Each phase labels vertices with their distance from the source over edges
    with capacity left, then saturates every shortest path at once (a blocking
    flow): a depth-first search along edges that go one level up, each edge
    given up for the phase once it is saturated or leads nowhere, so a phase
    costs about one pass over the edges plus the paths it fills. A step's
    graph needs few phases (its values are rebuilt from nearby ones), so the
    cut of a 10,000-node step takes well under a second. The search keeps its
    path in a list: a chain of values is as deep as it is long."""

    def __init__(self):
        self.capacity: dict = {}  # u -> {v: capacity left}, with the reverse edges

    @property
    def nodes(self):
        return self.capacity.keys()

    def add(self, u, v, capacity):
        self.capacity.setdefault(u, {})
        self.capacity.setdefault(v, {})
        self.capacity[u][v] = self.capacity[u].get(v, 0) + capacity
        self.capacity[v].setdefault(u, 0)  # the residual edge

    def _levels(self, source) -> dict:
        """Distance from the source of every vertex it reaches over edges with capacity left."""
        level, queue = {source: 0}, deque([source])
        while queue:
            u = queue.popleft()
            for v, cap in self.capacity.get(u, {}).items():  # a step without nodes has no source
                if cap > 0 and v not in level:
                    level[v] = level[u] + 1
                    queue.append(v)
        return level

    def _blocking_flow(self, source, sink, level: dict):
        capacity = self.capacity
        # the edges each vertex may still push along this phase (tried from the end)
        ahead = {u: [v for v, cap in capacity[u].items() if cap > 0 and level.get(v) == level[u] + 1]
                 for u in level}
        path = [source]
        while path:
            u = path[-1]
            if u == sink:
                edges = list(zip(path, path[1:]))
                # finite: every path to the sink crosses some value's store edge
                push = min(capacity[a][b] for a, b in edges)
                for a, b in edges:
                    capacity[a][b] -= push
                    capacity[b][a] += push
                first_full = next(i for i, (a, b) in enumerate(edges) if capacity[a][b] == 0)
                del path[first_full + 1:]  # resume from the tail of the first saturated edge
                continue
            edges_left = ahead[u]
            while edges_left and capacity[u][edges_left[-1]] <= 0:
                edges_left.pop()
            if edges_left:
                path.append(edges_left[-1])
            else:  # a dead end for this phase: its parent stops trying it
                path.pop()
                if path:
                    ahead[path[-1]].pop()

    def min_cut(self, source, sink) -> set:
        """The source side of a minimum cut (capacities are consumed)."""
        while sink in (level := self._levels(source)):
            self._blocking_flow(source, sink, level)
        return set(level)
