"""Activation sparsity: activations as dynamic pruning, measured (profiler) and put to use
(activation swap / relufication, TEAL-style threshold sparsity), plus a small training study."""
