"""Plumbing shared by every layer (manifests, flows, tasks, avatar_model): storage URIs, error classes, item ids."""
