"""The inference stage: scoring files to Parquet (inputs, decoding, the one inference loop, output,
resume). Options: :mod:`cvlib.inference.options`."""
