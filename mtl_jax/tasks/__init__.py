"""Task definitions: task types (a registry), presets for common datasets, TaskSpec."""
