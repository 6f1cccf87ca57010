"""Asynchronous inference and batch transform: queue, results, notifications, workers, transform."""
