"""medvol.apps: the ``medvol`` command line (preprocess, demo) and the batch runner behind it."""
