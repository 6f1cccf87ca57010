"""The local platform: replica processes behind a router, a controller per endpoint, blue/green by
weights, and a SageMaker-Runtime-compatible gateway."""
