"""The live model: ``everseg serve``'s HTTP app, the feedback store, the update worker, metrics."""
