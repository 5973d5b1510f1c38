"""Model stage: fetching/building models, the architecture registry and module tracing."""
