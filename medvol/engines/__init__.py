"""medvol.engines."""
