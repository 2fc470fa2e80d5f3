"""`keycell agent`: the node agent serving the SPIFFE Workload API on a unix socket."""
