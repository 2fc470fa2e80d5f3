"""The revocation relay (`keycell relay`, issue 8): SWIM membership and revocation
broadcast over gRPC bidirectional streams, one file per concern as in memberlist.

- profiles: every timing, by named profile (local, lan, wan);
- membership: the member table, incarnations, suspicion (Lifeguard), local health;
- broadcast: the retransmit-limited rumour queue (membership, receipts) and the
  entry store with digests;
- tree: how a revocation is pushed (a tree computed from the member table, acks and
  resends, grafts of what a relay missed);
- faults: loss, delay, partitions between named groups (tests and benchmarks);
- node: one relay (gRPC server, links, probe / gossip / anti-entropy loops);
- cell: what a relay does to its cell (ledger writes, pushes to API processes);
- simulate: a round-based model of the broadcast for 1,000-10,000 nodes.
"""
