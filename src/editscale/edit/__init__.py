"""Edit stage: editing methods, the segmented edit chain and exact replay."""
