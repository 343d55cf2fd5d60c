"""The core of every method: layer targets, masks, importance criteria and the `plan`/`prune` verbs."""
