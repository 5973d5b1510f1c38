"""editscale: sequential knowledge editing at scale, as a cached Snakemake study."""

__version__ = "0.1.0"
