"""The data stages' code: sources and downloads, manifests, deduplication, the split, rebalancing."""
