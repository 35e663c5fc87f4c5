"""medvol.transforms."""
