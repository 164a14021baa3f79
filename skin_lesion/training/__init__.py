"""The train stage's code: architectures, image batches, callbacks, the recipes and the linear probe."""
