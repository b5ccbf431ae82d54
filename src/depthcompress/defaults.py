"""Defaults that the library and the command line share, torch-free so the CLI can read them
when it builds its options."""

# peak learning rate of the final fine-tuning (cosine decay to 0), as the demo and
# docs/benchmarks.md use it
FINETUNE_LR = 0.02

NO_REDUCIBLE = "no reducible convolution in this chain: merging alone"
"""What --prune-layers says on a chain where no conv can be pruned (it then merges alone)."""
