"""Shared machinery: CPO step numerics, rollouts, monitoring."""
