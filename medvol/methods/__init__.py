"""medvol.methods."""
