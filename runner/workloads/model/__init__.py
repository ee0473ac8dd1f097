"""Models: loading (Hub id, local directory, offline bases), the tiny base, registry artifacts, attention kernels."""
