"""Layer 3, the records a job is made of and the one runtime that executes them: the job
document (``job``), the step planner (``plan``), the onnxruntime sessions (``runtime``, the only
onnxruntime importer in the package apart from the benchmark's plain baseline), tolerances and
tolerance profiles (``tolerance``), verdicts (``verdict``), bundles (``bundle``) and zk circuit
specs (``circuit``).

May import: ``verimesh.signing``, ``verimesh.core``, ``verimesh.errors``.
"""
