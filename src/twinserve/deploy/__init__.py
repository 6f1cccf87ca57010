"""Platform-neutral deployment: the endpoint spec, model pinning, policies, the state store, events,
and the `Platform` protocol every platform (local, sagemaker, ray) implements."""
