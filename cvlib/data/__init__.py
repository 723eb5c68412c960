"""The data stage: reading images, ingesting a folder into a manifest (listing, inspection,
near-duplicates, splits), datasets and transforms. Options: :mod:`cvlib.data.options`."""
