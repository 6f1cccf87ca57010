"""An endpoint's router: the app, its replica pool, health checks, metrics and process entry point."""
