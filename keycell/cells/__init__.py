"""Cells under partition (issue 9): home-cell writes, replicated reads with bounded
staleness, and the cell directory, over the relay mesh.

- control_plane.replicas: homes (claim, fence), export and apply of replicas, ages;
- control_plane.directory: the directory CRDT (LWW map, hybrid logical clocks);
- control_plane.cellkeys: each cell's sealing key (values cross cells sealed to it);
- agent: the `Cells` gRPC service every relay also serves (push, digest, fetch,
  forwarded writes, directory gossip) and its loops;
- api: the regional API's side (write forwarding, replica age, max staleness).
"""
