"""Settings profiles: `base` (embedded default), `production`, `test`."""
