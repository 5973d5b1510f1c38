"""The built-in metrics: one module each, registering its `compute(checkpoint, cfg)` with
`editscale.evaluate.registry.metric` (the registry imports every module of this package on first
use). A new built-in metric is a module here plus its section metrics.<name> in schema.yaml."""
