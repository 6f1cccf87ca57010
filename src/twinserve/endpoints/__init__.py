"""Real-time endpoints: config (spec), persisted state, runtimes that run replicas, the router."""
