"""Layer 7, the assurance tools built on the public workflows: tolerance calibration
(``calibrate``), the red team of cheating workers (``redteam``), the built-in tamper set
(``tamper``), proof regression suites for CI (``regress``) and the benchmarks (``bench``).

May import: everything below the CLI (workflows, settlement, mechanisms, records, primitives).
"""
