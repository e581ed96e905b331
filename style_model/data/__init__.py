"""Datasets in Shop The Look's on-disk layout, the Complete-The-Look example builder, and `ctl synth`."""
