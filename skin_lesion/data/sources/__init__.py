"""Where the images come from (`download.source`): each source writes its images and returns a manifest."""
