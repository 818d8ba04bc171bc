"""Example third-party services: what a service outside the system five looks like."""
