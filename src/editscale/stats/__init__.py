"""Stats stage: second moment E[k k^T] of edited modules' inputs over a corpus (`corpus`, `mom2`),
its HDF5 files, and AlphaEdit's null-space projection derived from it.

Nothing is re-exported here: every `editscale` command imports this package to build its parser,
and re-exporting `corpus` / `mom2` would import torch for commands that never touch a tensor."""
