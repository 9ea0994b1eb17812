"""LLM pruning: unstructured and N:M masks (magnitude, Wanda, SparseGPT) and structured shrinking
(MLP channels, attention heads, whole decoder layers), over one layer-by-layer calibration loop.

Modules:

- ``patterns``: sparsity patterns ("0.5", "2:4"), parsed once;
- ``masks``: pure selection, scores -> keep-masks (row, layer, global, N:M);
- ``scoring``: pure importance scores (magnitude, Wanda) and structured unit scores;
- ``sparsegpt``: the pure OBS solver;
- ``calib``: sequential calibration (layer inputs, input statistics, the layer loop);
- ``structured``: unit scores, selection and compensation for structured pruning;
- ``apply``: the only place that mutates modules;
- ``job``: ``run_prune`` and ``run_shrink``, which orchestrate and measure.

Submodules are imported by their users; importing this package is cheap.
"""
