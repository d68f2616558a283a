"""The verifier fleet: verification spread over worker processes, on a Ray cluster or in process.

Only verification runs here (re-runs of sampled steps, zk proof checks); the caller stays the
only writer of the ledger. A Ray cluster is a trusted network (Ray's own security model): only
verifiers run on it, never untrusted nodes (docs/design.md §12).
"""
